"""Shared fixtures: offline hub, the real SmolLM2 tokenizer, and ../shared/data (skip or fail)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
EXAMPLE_DATA = ROOT / "xtuner_lite" / "examples" / "data"  # bundled with the package


def shared_file(relative: str) -> Path:
    """A file under ../shared/data; skipped on a user's clone, a failure in CI (CI=true)."""
    path = SHARED / relative
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing; CI must run with ../shared beside the checkout")
        pytest.skip(f"{path} not present (../shared/data is only beside the project in CI)")
    return path


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests skip, with the reason, where torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smol_tokenizer():
    from xtuner_lite.hub import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(autouse=True)
def _isolated_dataset_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XTUNER_LITE_DATA_CACHE", str(tmp_path / "dataset-cache"))


TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def tiny_model(arch: str = "llama", seed: int = 0, **config):
    """A random tiny causal LM (``llama``, ``qwen2`` or ``mistral``) in eval mode: TINY_SHAPE
    with ``config`` on top. The one factory of the test suite's small models."""
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }
    config_class, model_class = classes[arch]
    torch.manual_seed(seed)
    return model_class(config_class(**{**TINY_SHAPE, **config})).eval()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smol_tokenizer):
    """A random 2-layer Llama with SmolLM2's vocabulary, saved as an HF folder (fp32)."""
    model = tiny_model(vocab_size=len(smol_tokenizer), tie_word_embeddings=True, bos_token_id=1,
                       eos_token_id=2, pad_token_id=2)  # fmt: skip
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return str(path)


def train_cmd(config, work_dir, *extra: str) -> list[str]:
    """``xtuner train CONFIG --work-dir WORK_DIR ...`` as a subprocess command line."""
    return [
        sys.executable,
        "-m",
        "xtuner_lite.cli",
        "train",
        str(config),
        "--work-dir",
        str(work_dir),
        *extra,
    ]


def write_config(path: Path, cfg: dict) -> Path:
    """A config dict written as a pure-Python config file."""
    path.write_text("".join(f"{key} = {value!r}\n" for key, value in cfg.items()))
    return path


def real_step(
    model,
    micro_batches,
    lr: float = 0.0,
    dtype: str | None = None,
    optimizer=None,
    device_type: str = "cpu",
    objective=None,
) -> tuple[float, dict]:
    """One optimizer step through the real step (``engine/step.py``) with next-token loss (or
    ``objective``):
    (the step's loss, the gradients the optimizer received, by the model's parameter names).
    ``lr=0`` leaves the weights as they are; pass ``optimizer`` to keep its state across steps.
    """
    import torch

    from xtuner_lite.objectives.sft import SFTObjective
    from xtuner_lite.training import TrainModel
    from xtuner_lite.training.optim import AutocastOptimWrapper

    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = optimizer or torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0
    )
    seen = {}

    def record(opt, args, kwargs):
        seen.update(
            {
                names[id(p)]: p.grad.detach().clone()
                for group in opt.param_groups
                for p in group["params"]
                if p.grad is not None
            }
        )

    handle = optimizer.register_step_pre_hook(record)
    try:
        wrapper = AutocastOptimWrapper(optimizer, dtype=dtype, device_type=device_type)
        out = TrainModel(model, objective or SFTObjective()).train_step(micro_batches, wrapper)
    finally:
        handle.remove()
    return float(out["loss"]), seen


def run_in_pty(
    cmd: list[str], timeout: float = 600, typed: str = "", **env: str
) -> tuple[int, str]:
    """Run ``cmd`` with a pseudo-terminal as stdin/stdout/stderr, as a user at a terminal
    would, ``typed`` being what they type: (exit code, everything it wrote)."""
    import pty
    import select
    import subprocess
    import time

    main_fd, child_fd = pty.openpty()
    environ = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdin=child_fd,
        stdout=child_fd,
        stderr=child_fd,
        env={**environ, "TERM": "xterm-256color", "COLUMNS": "160", **env},
    )
    os.close(child_fd)
    if typed:
        os.write(main_fd, typed.encode())  # the terminal holds it until the program reads
    chunks, deadline = [], time.time() + timeout
    try:
        while time.time() < deadline:
            if select.select([main_fd], [], [], 1)[0]:
                try:
                    chunk = os.read(main_fd, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        proc.kill()
        os.close(main_fd)
    return code, b"".join(chunks).decode(errors="replace")


def wait_for_lines(path: Path, lines: int, proc, timeout: float = 300) -> None:
    """Poll until ``path`` has ``lines`` lines (or ``proc`` ends): the moment to kill a run."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= lines:
            return
        time.sleep(0.005)


ALPACA_MINI = EXAMPLE_DATA / "alpaca_mini.json"


def tiny_train_cfg(model: str, method: str = "lora", **train) -> dict:
    """A config dict that trains ``model`` for a few steps on the bundled Alpaca sample (fp32,
    so resumed runs are bitwise comparable); ``train`` overrides the train settings."""
    settings = dict(
        batch_size=1,
        accumulative_counts=1,
        max_iters=4,
        lr=1e-3,
        dtype=None,
        save_steps=2,
        save_total_limit=2,
        log_interval=1,
        warmup_ratio=0,
        tensorboard=False,
    )
    settings.update(train)
    return dict(
        model=dict(pretrained=model, method=method, lora=dict(r=4, alpha=8, dropout=0.1)),
        train_dataset=dict(
            data_files=str(ALPACA_MINI), tokenizer=model, template="smollm2", max_length=64
        ),
        train=settings,
    )


def log_records(work_dir) -> list[dict]:
    """The records of ``loss.jsonl``, one per step (a resumed run rewrites the steps it redoes:
    the last record of a step counts)."""
    import json

    by_step = {}
    for line in (Path(work_dir) / "loss.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_step[record["step"]] = record
    return [by_step[k] for k in sorted(by_step)]


def loss_curve(work_dir, key: str = "loss") -> list[float]:
    """One logged value (the loss by default) by step."""
    return [record[key] for record in log_records(work_dir)]


def start_server(*args: str):
    """``xtuner serve ARGS --port 0`` as a process; returns (process, (host, port)) once it
    listens."""
    import re
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "xtuner_lite.cli", "serve", *args, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = ""
    for line in proc.stdout:  # libraries may print warnings (stderr) before the address
        seen += line
        match = re.search(r"http://([\d.]+):(\d+)", line)
        if match:
            return proc, (match.group(1), int(match.group(2)))
    pytest.fail(f"server did not start: {seen}")


@pytest.fixture(scope="module")
def smol_server():
    """``xtuner serve smollm2-135m-instruct`` for the tests of one module: (host, port)."""
    proc, address = start_server("smollm2-135m-instruct")
    yield address
    proc.terminate()
    proc.wait(timeout=30)


def needs_sandbox() -> None:
    """Tests of the OS sandbox: skipped where bubblewrap cannot run (a user's machine without
    it), a failure in CI, which installs it."""
    from xtuner_lite.toolcalling.sandbox import isolation_problem

    problem = isolation_problem()
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the sandbox must run in CI: {problem}")
        pytest.skip(f"no sandbox on this machine: {problem}")
