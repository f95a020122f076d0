"""The sandbox behind the ``python`` tool and ``code_tests``: every escape of the hostile-input
sweep, through the entry point the chat uses (``ToolBox.run``) and through ``code_tests``; the
harness's own report; the calculator's bounds; refusing to run where there is no isolation."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xtuner_lite.errors import XtunerError
from xtuner_lite.objectives.grpo.rewards import build_rewards, code_tests
from xtuner_lite.toolcalling import ToolBox, ToolError, builtin, load_tools
from xtuner_lite.toolcalling.builtin import Tool, calculator
from xtuner_lite.toolcalling.sandbox import (
    BWRAP_ENV,
    SandboxUnavailable,
    isolation_problem,
    run_python,
)

from conftest import ROOT, needs_sandbox


@pytest.fixture
def sandbox():
    needs_sandbox()


@pytest.fixture
def outside(tmp_path):
    """A host folder the code must not touch, with a file in it."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "victim").write_text("keep me")
    (folder / "secret").write_text("s3cret")
    os.chmod(folder / "secret", 0o600)
    return folder


def escapes(out: Path) -> dict[str, str]:
    """The sweep's escapes, each aimed at the host folder ``out`` (hex-free, one line each)."""
    return {
        "old guard cleared, shell": (
            "_REFUSED = {}; _PATHS = set(); _inside = lambda p: True\n"
            f"import os; os.system('id > {out}/f')"
        ),
        "chdir then relative write": (
            f"import os; os.chdir({str(out)!r}); open('f', 'w').write('x')"
        ),
        "dir_fd write and unlink": (
            f"import os; fd = os.open({str(out)!r}, os.O_RDONLY)\n"
            "os.close(os.open('f', os.O_WRONLY | os.O_CREAT, dir_fd=fd))\n"
            "os.unlink('victim', dir_fd=fd)"
        ),
        "fork_exec a shell": (
            "import _posixsubprocess, os\n"
            "r, w = os.pipe()\n"
            "_posixsubprocess.fork_exec([b'/bin/sh', b'-c', b'echo x > " + str(out) + "/f'], "
            "[b'/bin/sh'], True, (), None, None, -1, -1, -1, -1, -1, -1, r, w, True, True, 0, "
            "None, None, None, -1, None, False)\n"
            "import time; time.sleep(0.5)"
        ),
        "kill the caller": (
            "import os, signal\n"
            "signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)\n"
            f"os.kill({os.getpid()}, signal.SIGKILL)"
        ),
        "read secrets": (
            f"print(open({str(out / 'secret')!r}).read())\n"
            "print(open('/etc/shadow').read())\nimport os; print(os.listdir('/root'))"
        ),
        "fifo outside": f"import os; os.mkfifo({str(out / 'fifo')!r})",
        "fill the disk": (
            "for i in range(40):\n"
            "    with open(f'big{i}', 'wb') as f:\n"
            "        f.write(b'x' * (12 << 20))\n"
        ),
        "network": "import socket\nsocket.create_connection(('127.0.0.1', 22), 1)",
        "fork bomb": "import os\nwhile True:\n    os.fork()",
        "10 GB": "x = bytearray(10 << 30)",
    }


def host_untouched(out: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == ["secret", "victim"]
    assert (out / "victim").read_text() == "keep me"


def python_box(timeout: float = 30.0) -> ToolBox:
    return ToolBox(load_tools("python"), timeout=timeout)


@pytest.mark.parametrize(
    "case",
    ["old guard cleared, shell", "chdir then relative write", "dir_fd write and unlink",
     "fork_exec a shell", "kill the caller", "read secrets", "fifo outside", "fill the disk",
     "network", "fork bomb", "10 GB"],
)  # fmt: skip
def test_python_tool_contains_every_escape(case, outside, sandbox):
    """Through ``ToolBox.run``, as ``xtuner chat --tools python`` runs a call: nothing outside
    the sandbox changes, nothing secret is read, the caller survives."""
    result = python_box().run({"name": "python", "arguments": {"code": escapes(outside)[case]}})
    host_untouched(outside)
    assert "s3cret" not in result and "root:" not in result
    if case == "fill the disk":
        assert "No space left on device" in result
    if case == "10 GB":
        assert "MemoryError" in result
    # the caller is alive (this line runs) and the sandbox still works
    assert python_box().run({"name": "python", "arguments": {"code": "print(6 * 7)"}}) == "42"


def test_nothing_outlives_a_call(sandbox):
    """A detached child (new session, double fork) ends with the call: the PID namespace dies."""
    marker = f"xtuner-sandbox-{os.getpid()}-{time.time_ns()}"
    code = (
        "import subprocess, sys\n"
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)', {marker!r}], "
        "start_new_session=True)\nprint('started')"
    )
    assert run_python(code).describe() == "started"
    time.sleep(0.3)
    alive = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    assert alive.strip() == ""


def test_runs_as_an_unprivileged_user_in_an_empty_world(sandbox):
    code = (
        "import os\nprint(os.getuid(), os.getgid(), sorted(os.listdir('/')))\n"
        "print(open('/proc/self/status').read().split('CapEff:')[1].split()[0])"
    )
    ids, caps = run_python(code).stdout.splitlines()
    uid, gid, top = ids.split(" ", 2)
    assert (uid, gid) == ("65534", "65534")
    python_roots = {Path(p).resolve().parts[1] for p in (sys.prefix, sys.base_prefix)}
    system = {"usr", "bin", "sbin", "lib", "lib32", "lib64", "proc", "dev", "sandbox"}
    assert set(eval(top)) <= system | python_roots  # no /etc, /home, /tmp, /var, /root...
    assert "etc" not in eval(top)
    assert int(caps, 16) == 0


def test_time_limit_and_output_cap(sandbox):
    assert "time limit of 1 s" in run_python("while True:\n    pass", timeout=1.0).describe()
    long = run_python("print('x' * 100_000)")
    assert long.ok and long.stdout.endswith("... (output cut)") and len(long.stdout) < 5000


# code_tests ---------------------------------------------------------------------------------
ROW = {"tests": ["assert add(2, 3) == 5", "assert add(1, 1) == 2"]}
WRONG = "def add(a, b):\n    return a - b\n"


@pytest.mark.parametrize(
    "exit_early",
    ["import os; os._exit(0)", "raise SystemExit(0)", "import sys; sys.exit()",
     "import atexit, os\natexit.register(os._exit, 0)",
     "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
)  # fmt: skip
def test_code_tests_cannot_be_passed_by_exiting(exit_early, sandbox):
    """Wrong code that ends its own process scores 0: only the harness's report counts."""
    reward = code_tests(timeout=5.0)
    assert reward(ROW, WRONG + exit_early) == 0.0
    assert reward(ROW, "def add(a, b):\n    return a + b\n" + "print('ok')") == 1.0
    assert reward(ROW, "def add(a, b):\n    return 2\n") == 0.5


@pytest.mark.parametrize(
    "case", ["old guard cleared, shell", "dir_fd write and unlink", "kill the caller",
             "read secrets", "fork bomb", "fill the disk"],
)  # fmt: skip
def test_code_tests_contains_every_escape(case, outside, sandbox):
    """The same escapes as completions: the trainer's process survives, the host is untouched,
    and the wrong code after them still scores 0."""
    assert code_tests(timeout=5.0)(ROW, escapes(outside)[case] + "\n" + WRONG) == 0.0
    host_untouched(outside)


# fail closed --------------------------------------------------------------------------------
def test_no_isolation_means_no_python(monkeypatch, tmp_path):
    """Without bubblewrap the python tool and code_tests refuse in one line; nothing runs."""
    monkeypatch.setenv(BWRAP_ENV, str(tmp_path / "no-bwrap"))
    isolation_problem.cache_clear()
    try:
        problem = isolation_problem()
        assert problem and "bubblewrap (bwrap) is not installed" in problem
        with pytest.raises(SandboxUnavailable, match="python tool refuses to run"):
            load_tools("python")
        with pytest.raises(SandboxUnavailable, match="refuses to run untrusted code"):
            run_python("print(1)")
        with pytest.raises(XtunerError, match=r"rewards\[0\]: code_tests refuses"):
            build_rewards([dict(type="code_tests")])
        box = ToolBox([Tool.of(builtin.python)])
        assert box.run({"name": "python", "arguments": {"code": "print(1)"}}).startswith(
            "error: SandboxUnavailable: the python sandbox refuses"
        )
        assert "python" not in [t.name for t in load_tools("calculator")]
    finally:
        monkeypatch.delenv(BWRAP_ENV)
        isolation_problem.cache_clear()


def test_chat_refuses_the_python_tool_without_isolation(tmp_path):
    env = {**os.environ, BWRAP_ENV: str(tmp_path / "no-bwrap")}
    run = subprocess.run(
        [sys.executable, "-m", "xtuner_lite.cli", "chat", "smollm2-135m-instruct",
         "--tools", "python", "--prompt", "hi"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 1
    assert (
        run.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "xtuner chat: error: the python tool refuses to run untrusted code without isolation"
        )
    )
    assert "Traceback" not in run.stderr


# the other tools ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "expression",
    ["(9**9999)**9999", "((9**999)**999)**999", "9**9**9", "2**15000 * 2**15000",
     "round(10**4000, -10**18)"],
)  # fmt: skip
def test_calculator_refuses_huge_results_at_once(expression):
    start = time.perf_counter()
    assert calculator(expression).startswith("error:")
    assert time.perf_counter() - start < 1.0  # they took minutes; refused before computing
    assert calculator("2**100") == str(2**100) and calculator("(12 + 7) * 3") == "57"


def test_every_tool_call_has_a_wall_clock_limit():
    def slow(seconds: float) -> str:
        """Sleeps.

        Args:
            seconds: how long
        """
        time.sleep(seconds)
        return "done"

    def leaves(code: int) -> str:
        """Exits.

        Args:
            code: the status
        """
        sys.exit(code)

    box = ToolBox([Tool.of(slow), Tool.of(leaves)], timeout=0.5)
    assert box.run({"name": "slow", "arguments": {"seconds": 0.0}}) == "done"
    assert box.run({"name": "slow", "arguments": {"seconds": 5}}) == (
        "error: slow did not finish within 0.5 s"
    )
    assert box.run({"name": "leaves", "arguments": {"code": 0}}) == "error: SystemExit: 0"


def test_unknown_tool_error_unchanged():
    with pytest.raises(ToolError, match="unknown tool"):
        load_tools("pyhton")


SPAWN_THEN_RUN = """
import subprocess, sys
sleepers = [subprocess.Popen(["sleep", "30"]) for _ in range(40)]
try:
    from xtuner_lite.toolcalling.sandbox import isolation_problem, run_python
    print(isolation_problem())
    print(run_python("print(6 * 7)").describe())
finally:
    for p in sleepers:
        p.kill()
"""


def _readable_by_others(path: Path) -> bool:
    return all(p.stat().st_mode & 0o005 == 0o005 for p in [path, *path.parents])


def test_a_user_running_many_processes_still_gets_a_sandbox(sandbox):
    """The process limit counted every process of the calling user when set before bwrap: a
    user with more than 32 (any desktop) got "Creating new namespace failed"."""
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-I", "-c", SPAWN_THEN_RUN]
    if os.geteuid() == 0:  # as root, the same as an unprivileged user (uid 65534)
        python = Path("/usr/bin/python3")
        if not python.is_file() or not _readable_by_others(ROOT):
            pytest.skip("needs /usr/bin/python3 and a checkout readable by other users")
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(python),
                   "-c", SPAWN_THEN_RUN]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, env=env, cwd="/tmp", timeout=120)
    assert run.stdout.splitlines() == ["None", "42"], run.stderr[-2000:]
