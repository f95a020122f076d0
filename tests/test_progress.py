"""What a user sees while training: a live bar at a terminal, plain step lines in a pipe, and
none of mmengine's environment dump, config or hook table (they are in the log file)."""

import re
import subprocess

import pytest

from conftest import ROOT, run_in_pty, tiny_train_cfg, train_cmd, write_config

pytestmark = pytest.mark.integration

STEPS = 4


@pytest.fixture
def tiny_config(tmp_path, tiny_llama):
    cfg = tiny_train_cfg(tiny_llama, max_iters=STEPS, save_steps=STEPS)
    path = tmp_path / "tiny.py"
    return write_config(path, cfg)


def _assert_quiet(text: str, work_dir) -> None:
    for noise in (
        "nccl",
        "GPU number",
        "System environment",
        "Config:",
        "Hooks will be",
        "has no metainfo",
        "FileClient",
        "Iter(train)",
    ):
        assert noise not in text
    log = next(work_dir.glob("*/*.log")).read_text()  # the file keeps what the console hides
    assert "System environment" in log and "Hooks will be executed" in log
    assert "Iter(train)" in log and "'backend': 'gloo'" in log


def test_piped_output_is_one_line_per_step(tiny_config, tmp_path):
    work = tmp_path / "piped"
    out = subprocess.run(
        train_cmd(tiny_config, work),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={"CUDA_VISIBLE_DEVICES": "", **_env()},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    steps = [line for line in out.stdout.splitlines() if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == [f"{i}/{STEPS}" for i in range(1, STEPS + 1)]
    for field in ("loss ", "lr ", "tok/s", "eta ", "peak ", "GiB"):
        assert field in steps[-1]
    assert "\r" not in out.stdout and "\x1b[" not in out.stdout  # no terminal control codes
    assert len(out.stdout.splitlines()) <= STEPS + 4
    _assert_quiet(out.stdout + out.stderr, work)


def test_a_terminal_gets_a_live_progress_bar(tiny_config, tmp_path):
    work = tmp_path / "tty"
    code, text = run_in_pty(train_cmd(tiny_config, work), CUDA_VISIBLE_DEVICES="")
    assert code == 0, text[-3000:]
    assert "\x1b[" in text and "━" in text  # redrawn in place: control codes and a bar
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    assert f"step {STEPS}/{STEPS}" in plain
    assert "loss " in plain and "tok/s" in plain and "eta " in plain and "GiB" in plain
    # redrawn in place: every update of the bar on one line (a pipe would get one per step)
    assert len([line for line in plain.split("\n") if "step " in line]) == 1
    _assert_quiet(plain, work)


def test_verbose_prints_what_the_log_file_holds(tiny_config, tmp_path):
    out = subprocess.run(
        train_cmd(tiny_config, tmp_path / "verbose", "--verbose"),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env=_env(),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "System environment" in out.stdout and "Iter(train)" in out.stdout


def _env():
    import os

    return {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def test_peak_memory_is_the_process_own_not_its_parents():
    """The peak shown (and read by benchmark sides) is this process's: a child started while
    its parent holds 512 MiB reports its own few MiB (``ru_maxrss`` reports the parent's)."""
    import sys

    import numpy as np

    held = np.ones(2**26)  # 512 MiB, every page touched
    code = (
        "import resource; from xtuner_lite.resources import peak_rss_bytes; "
        "print(peak_rss_bytes() / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    own, inherited = map(float, out.stdout.split())
    assert held.sum() == 2**26
    assert inherited > 512 and own < 256
