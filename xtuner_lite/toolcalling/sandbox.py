"""Runs untrusted Python (a model's code: the ``python`` tool, ``code_tests`` rewards) isolated by
the operating system, or not at all.

Each run is a fresh ``python -I`` started by bubblewrap (``bwrap``, the sandbox Flatpak uses) in
new user/mount/PID/network/IPC/UTS namespaces. The child sees a read-only ``/usr`` and the
Python installation, a new ``/proc`` and minimal ``/dev``, and one writable folder: a tmpfs of
``Limits.disk`` bytes. Nothing else of the host's files exists for it (no ``/etc``, no home, no
project). It runs as an unprivileged user (uid 65534, really so when the caller is root: the
privileges are dropped by ``setpriv`` after the mounts) with no capabilities and
``no_new_privs``, under rlimits on CPU time, address space, processes, open files and file size,
and a wall-clock limit after which its whole PID namespace is killed. Where bubblewrap or the
kernel's namespaces are missing, nothing runs: :class:`SandboxUnavailable` says what is missing.

Why bubblewrap: it is a small setuid-free C program made for exactly this, in every distribution
(``apt-get install bubblewrap``). nsjail adds seccomp and cgroups but is rarely packaged;
Landlock + seccomp need kernel ≥ 5.13 and Python bindings that are not maintained on PyPI, and
still leave the PID and network namespaces to build by hand. An in-process audit hook (what this
module used before) cannot contain code that runs in the same interpreter.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from xtuner_lite.errors import XtunerError

OUTPUT_CHARS = 4000  # characters of stdout / stderr kept in a result
HOME = "/sandbox"  # the child's one writable folder (its working folder, HOME and TMPDIR)
NOBODY = 65534  # the uid and gid the child runs as
BWRAP_ENV = "XTUNER_BWRAP"  # path to bwrap, where it is not on PATH


class SandboxUnavailable(XtunerError):
    """The machine cannot isolate untrusted code; it is refused rather than run unguarded."""


@dataclass(frozen=True)
class Limits:
    timeout: float = 5.0  # wall-clock seconds
    memory: int = 1 << 30  # bytes of address space
    disk: int = 64 << 20  # bytes in the writable folder, all files together
    file_size: int = 16 << 20  # bytes any one file may grow to
    processes: int = 32  # processes and threads of the sandbox user
    open_files: int = 256


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None  # None: stopped at the time limit
    stdout: str
    stderr: str
    timeout: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        """What happened, for a person or a model: output, then how the run ended."""
        parts = [self.stdout.rstrip()] if self.stdout.strip() else []
        if self.timed_out:
            parts.append(f"stopped: the time limit of {self.timeout:g} s was reached")
        elif self.returncode != 0:
            last = self.stderr.strip().splitlines()[-1:] or [f"exit status {self.returncode}"]
            if self.returncode < 0:
                last = [f"killed by signal {signal.Signals(-self.returncode).name}"]
            parts.append(f"error: {last[0]}")
        return "\n".join(parts) or "(no output)"


# --------------------------------------------------------------------------- the command
def _bwrap() -> str | None:
    path = os.environ.get(BWRAP_ENV) or shutil.which("bwrap")
    return path if path and os.path.isfile(path) and os.access(path, os.X_OK) else None


def _python_mounts() -> list[str]:
    """The interpreter's installation (and the virtualenv's), read-only at the same paths, with
    the folders above them traversable (bwrap would make them 0700: closed to uid 65534)."""
    roots = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()}
    roots.add(Path(sys.executable).resolve().parent.parent)
    roots = sorted(r for r in roots if r != Path("/usr") and Path("/usr") not in r.parents)
    above = {p for r in roots for p in r.parents if p != Path("/")}
    folders = sorted(above, key=lambda p: len(p.parts))
    mounts = [arg for folder in folders for arg in ("--perms", "0755", "--dir", str(folder))]
    for root in roots:
        mounts += ["--ro-bind", str(root), str(root)]
    return mounts


def _system_mounts() -> list[str]:
    """``/usr`` read-only, and ``/bin``, ``/lib``... as the host has them (links or folders)."""
    mounts = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64"):
        path = Path("/") / name
        if path.is_symlink():
            mounts += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            mounts += ["--ro-bind", str(path), str(path)]
    return mounts


def _identity() -> list[str]:
    """Who the child is: as root, bwrap mounts with root's rights and ``setpriv`` then becomes
    uid 65534 for real; as anyone else, a user namespace maps them to 65534 inside."""
    if os.geteuid() != 0:
        return ["--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY)]
    return []


def _util_linux(name: str) -> str:
    return shutil.which(name) or f"/usr/bin/{name}"


def _drop_root() -> list[str]:
    if os.geteuid() != 0:
        return []
    return [_util_linux("setpriv"), f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]  # fmt: skip


def _process_limit(limits: Limits) -> list[str]:
    """RLIMIT_NPROC set inside the namespaces: set before, it would count every process the
    calling user already runs (a desktop user's hundreds), and bwrap could not even start."""
    n = limits.processes
    return [_util_linux("prlimit"), f"--nproc={n}:{n}", "--"]


def sandbox_command(argv: list[str], limits: Limits) -> list[str]:
    """The bwrap command line that runs ``argv`` isolated."""
    bwrap = _bwrap()
    if bwrap is None:
        raise SandboxUnavailable("bubblewrap (bwrap) is not installed")
    return [
        bwrap,
        *_identity(),
        "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
        "--die-with-parent", "--new-session",
        *_system_mounts(), *_python_mounts(),
        "--proc", "/proc", "--dev", "/dev",
        "--perms", "1777", "--size", str(limits.disk), "--tmpfs", HOME,
        "--chdir", HOME, "--clearenv",
        "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", HOME, "--setenv", "TMPDIR", HOME,
        "--setenv", "PYTHONHASHSEED", "0",
        "--",
        *_drop_root(), *_process_limit(limits), *argv,
    ]  # fmt: skip


def _rlimits(limits: Limits) -> None:
    """In the child before bwrap starts (inherited by everything the sandbox starts); the
    process limit is set inside (:func:`_process_limit`)."""
    cpu = math.ceil(limits.timeout) + 1
    for which, value in (
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_AS, limits.memory),
        (resource.RLIMIT_FSIZE, limits.file_size),
        (resource.RLIMIT_NOFILE, limits.open_files),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(which, (value, value))


@functools.cache
def isolation_problem() -> str | None:
    """Why this machine cannot run the sandbox, or None where it can (checked once, by running
    an empty program in it)."""
    if _bwrap() is None:
        where = os.environ.get(BWRAP_ENV)
        found = f"{BWRAP_ENV}={where} is not a program" if where else "not on PATH"
        return f"bubblewrap (bwrap) is not installed ({found}; e.g. apt-get install bubblewrap)"
    if os.geteuid() == 0 and not Path(_util_linux("setpriv")).is_file():
        return "running as root and setpriv (util-linux) is missing to drop to an unprivileged user"
    if not Path(_util_linux("prlimit")).is_file():
        return "prlimit (util-linux) is missing to limit the sandbox's processes"
    result = _launch([sys.executable, "-I", "-c", "pass"], b"", Limits(timeout=30))
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no message"])[-1]
        return f"bubblewrap cannot create its namespaces here ({reason})"
    return None


def require_isolation(what: str) -> None:
    """Raise :class:`SandboxUnavailable` naming ``what`` where the sandbox cannot run."""
    problem = isolation_problem()
    if problem is not None:
        raise SandboxUnavailable(
            f"{what} refuses to run untrusted code without isolation: {problem}"
        )


# --------------------------------------------------------------------------- running
def _read(path: Path) -> str:
    with path.open("rb") as f:
        data = f.read(OUTPUT_CHARS * 4 + 1)
    text = data.decode(errors="replace")
    if len(text) > OUTPUT_CHARS or len(data) > OUTPUT_CHARS * 4:
        return text[:OUTPUT_CHARS] + "\n... (output cut)"
    return text


def _launch(argv: list[str], stdin: bytes, limits: Limits, pass_fds: tuple[int, ...] = ()):
    """Run ``argv`` in the sandbox with ``stdin``; stops it at the time limit."""
    command = sandbox_command(argv, limits)
    # output goes to files outside the sandbox, each capped by RLIMIT_FSIZE: a pipe would grow
    # without a limit
    with tempfile.TemporaryDirectory() as host, tempfile.TemporaryFile() as source:
        source.write(stdin)
        source.seek(0)
        out, err = Path(host) / "stdout", Path(host) / "stderr"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            process = subprocess.Popen(
                command,
                stdin=source,
                stdout=stdout,
                stderr=stderr,
                pass_fds=pass_fds,
                env={},
                start_new_session=True,  # its own process group: a time-out ends it whole
                preexec_fn=functools.partial(_rlimits, limits),
            )
            try:
                returncode = process.wait(timeout=limits.timeout)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                # bwrap's death ends the PID namespace, and so everything the code started
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        return SandboxResult(returncode, _read(out), _read(err), limits.timeout)


def run_python(code: str, timeout: float = 5.0, memory: int = Limits.memory) -> SandboxResult:
    """Run ``code`` in the sandbox and return how it ended (never raises for what the code
    does; raises :class:`SandboxUnavailable` where there is no sandbox)."""
    require_isolation("the python sandbox")
    limits = Limits(timeout=timeout, memory=memory)
    return _launch([sys.executable, "-I", "-B", "-"], code.encode(errors="replace"), limits)


# The harness of run_tests. It reads the nonce first, then the code and the tests, and only then
# runs the code: each test's outcome is written by the harness, with the nonce, to a pipe the code
# never needs. Code that exits early (os._exit, SystemExit, atexit) leaves no report: 0.
HARNESS = r"""
import json, os, sys
def _harness(fd):
    nonce = sys.stdin.buffer.readline().strip()
    job = json.loads(sys.stdin.buffer.read())
    os.close(0)
    scope = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(job["code"], "<completion>", "exec"), scope)
    except BaseException as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return
    for i, test in enumerate(job["tests"]):
        try:
            exec(compile(test, f"<test {i}>", "exec"), scope)
        except BaseException as exc:
            print(f"test {i}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        os.write(fd, nonce + b" %d\n" % i)
_harness(int(sys.argv[1]))
"""


def run_tests(code: str, tests: list[str], timeout: float = 5.0) -> list[bool]:
    """Run ``code``, then each test statement after it, in one sandboxed process; whether each
    passed, as the harness (not the code) reports it."""
    require_isolation("code_tests")
    nonce = secrets.token_hex(16).encode()
    job = json.dumps({"code": code, "tests": tests}).encode()
    read, write = os.pipe()
    with os.fdopen(read, "rb") as reports:
        try:
            argv = [sys.executable, "-I", "-B", "-c", HARNESS, str(write)]
            _launch(argv, nonce + b"\n" + job, Limits(timeout=timeout), pass_fds=(write,))
        finally:
            os.close(write)  # the harness has ended: reading now reaches the end of its reports
        lines = reports.read().split(b"\n")
    passed = {int(line.split()[1]) for line in lines if line.startswith(nonce + b" ")}
    return [i in passed for i in range(len(tests))]
