"""Runs untrusted Python (a model's code: code rewards, the ``python`` tool) in a child process.

The child is a fresh ``python -I`` in an empty temporary folder with no inherited environment,
under limits on wall time, CPU time, address space and file size, in its own process group (a
time-out ends everything it started). Before the untrusted code runs, an audit hook refuses
what it must not do: make network connections, start processes (no fork bombs), load C libraries
through ctypes, or write, delete or rename anything outside its folder. Where the kernel lets an
unprivileged process make one, the child also runs in a network namespace with no interfaces
(``unshare -rn``). Everything the child does wrong comes back as a result, never an exception.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

MEMORY_LIMIT = 1 << 30  # bytes of address space the child may map
FILE_LIMIT = 1 << 24  # bytes any file the child writes may grow to (its output included)
OUTPUT_CHARS = 4000  # characters of stdout / stderr kept in a result

# Runs first in the child; the audit hook cannot be removed by the code that follows.
GUARD = r"""
import os as _os, sys as _sys
_HOME = _os.getcwd()
_WRITES = _os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_APPEND | _os.O_TRUNC

def _inside(path):
    try:
        path = _os.fsdecode(path) if not isinstance(path, int) else None
    except TypeError:
        return False
    if path is None:
        return True  # a file descriptor this process already holds
    real = _os.path.realpath(_os.path.join(_HOME, path))
    return real == _HOME or real.startswith(_HOME + _os.sep)

_REFUSED = {
    "os.fork": "starting processes", "os.forkpty": "starting processes",
    "os.system": "starting processes", "os.exec": "starting processes",
    "os.posix_spawn": "starting processes", "os.spawn": "starting processes",
    "subprocess.Popen": "starting processes", "os.kill": "signalling processes",
    "os.killpg": "signalling processes", "ctypes.dlopen": "loading C libraries",
    "socket.connect": "network access", "socket.bind": "network access",
    "socket.getaddrinfo": "network access", "socket.sendto": "network access",
    "socket.sendmsg": "network access", "socket.gethostbyname": "network access",
}
_PATHS = {"os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.chmod", "os.chown",
          "os.symlink", "os.link", "os.truncate", "os.utime", "shutil.rmtree", "os.replace"}

def _hook(event, args):
    if event in _REFUSED:
        raise PermissionError(f"sandbox: {_REFUSED[event]} is not allowed")
    if event == "open":
        path, mode, flags = args
        writes = (mode and any(c in mode for c in "wax+")) or (flags & _WRITES)
        if writes and not _inside(path):
            raise PermissionError(f"sandbox: writing outside the working folder ({path})")
    elif event in _PATHS:
        for path in args[:2]:
            if isinstance(path, (str, bytes, _os.PathLike)) and not _inside(path):
                raise PermissionError(f"sandbox: {event} outside the working folder ({path})")

_sys.addaudithook(_hook)
del _hook
"""


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


@functools.cache
def isolation_prefix() -> tuple[str, ...]:
    """``unshare -rn`` where the kernel lets an unprivileged process make a network namespace,
    else nothing (the audit hook still refuses network access)."""
    try:
        ok = subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return ("unshare", "-rn") if ok.returncode == 0 else ()


def _limits(timeout: float, memory: int) -> None:
    """In the child, before it runs: memory, CPU time and file size."""
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    cpu = math.ceil(timeout) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))


def _read(path: Path) -> str:
    text = path.read_text(errors="replace")
    return text if len(text) <= OUTPUT_CHARS else text[:OUTPUT_CHARS] + "\n... (output cut)"


def run_python(code: str, timeout: float = 5.0, memory: int = MEMORY_LIMIT) -> SandboxResult:
    """Run ``code`` in a sandboxed child process and return how it ended."""
    env = {"PATH": os.defpath, "PYTHONHASHSEED": "0"}
    command = [*isolation_prefix(), sys.executable, "-I", "-B", "-c", f"{GUARD}\n{code}\n"]
    # output goes to files outside the child's folder: a pipe would grow without a limit
    with tempfile.TemporaryDirectory() as home, tempfile.TemporaryDirectory() as folder:
        out, err = Path(home) / "stdout", Path(home) / "stderr"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            process = subprocess.Popen(
                command,
                cwd=folder,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,  # its own process group: a time-out ends its children
                preexec_fn=functools.partial(_limits, timeout, memory),
            )
            try:
                returncode = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        return SandboxResult(returncode, _read(out), _read(err), timeout)
