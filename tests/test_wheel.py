"""The wheel a user installs: configs and example data inside it, usable from any directory."""

import os
import shutil
import site
import subprocess
import sys
import sysconfig

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """The built wheel installed (not editable) into a fresh virtualenv that sees this
    environment's dependencies but not the editable checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy: setuptools' build/ folder stays out of the checkout
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", "build", "dist", "*.egg-info", "work_dirs", "__pycache__", ".*_cache"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp / "dist"),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next((tmp / "dist").glob("xtuner_lite-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # dependencies from this environment by path: its .pth files (the editable finder) stay out
    deps = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    (venv / purelib / "deps.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
    )
    return venv


def _xtuner(venv, cwd, *args, timeout=900):
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "NO_COLOR": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [str(venv / "bin" / "xtuner"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_wheel_lists_copies_and_trains_from_an_empty_directory(wheel_venv, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    where = subprocess.run(
        [
            str(wheel_venv / "bin" / "python"),
            "-c",
            "import xtuner_lite; print(xtuner_lite.__file__)",
        ],
        cwd=empty,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(wheel_venv)), where  # the wheel, not the checkout

    listed = _xtuner(wheel_venv, empty, "list-cfg")
    assert listed.returncode == 0, listed.stderr
    assert "smollm2_135m_identity_lora" in listed.stdout

    copied = _xtuner(wheel_venv, empty, "copy-cfg", "smollm2_135m_identity_lora", "mine")
    assert copied.returncode == 0, copied.stderr
    assert (empty / "mine" / "smollm2_135m_identity_lora.py").is_file()

    trained = _xtuner(
        wheel_venv,
        empty,
        "train",
        "smollm2_135m_identity_lora",
        "--work-dir",
        "run",
        "--cfg-options",
        "train.max_iters=3",
        "train.save_steps=3",
        "train.sample_prompts=[]",
    )
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
    assert (empty / "run" / "adapter" / "adapter_model.safetensors").is_file()

    # data a config names but the wheel does not bundle: which file, and how to point at it
    missing = _xtuner(wheel_venv, empty, "check-dataset", "alpaca_en_demo")
    assert missing.returncode == 1
    assert "llamafactory_alpaca_en_demo.json not found" in missing.stderr
    assert "--cfg-options train_dataset.data_files=PATH" in missing.stderr
