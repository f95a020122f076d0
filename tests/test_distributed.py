"""Multi-process training on CPU (2 gloo processes): DDP, DeepSpeed ZeRO-2/3 and FSDP2.

2 processes x batch 1 must give the losses and weights of 1 process x accumulation 2 (same
global batches, loss normalized by the global token count) for LoRA, full and QLoRA (whose 4-bit
weights ZeRO-3 shards once stored in a float dtype), and a DeepSpeed run killed with SIGKILL
must resume to the uninterrupted run's losses, bitwise.
"""

import json
import os
import signal
import subprocess
import warnings

import pytest
import torch

from xtuner_lite.errors import XtunerError
from xtuner_lite.training.distributed import torchrun_command
from xtuner_lite.training.strategies import deepspeed_config

from conftest import (
    EXAMPLE_DATA,
    process_env,
    train_cmd,
    train_processes,
    trained_weights,
    wait_for_lines,
)

pytestmark = pytest.mark.slow

CONFIG = """
model = dict(pretrained={model!r}, method={method!r}, lora=dict(r=8, alpha=16, dropout={dropout}),
             compute_dtype="fp32", gradient_checkpointing={checkpointing})
train_dataset = dict(data_files={data!r}, tokenizer={model!r}, map_fn="alpaca",
                     template="smollm2", max_length=96, pack=True)
train = dict(batch_size=1, accumulative_counts=1, max_iters={iters}, lr={lr}, dtype=None,
             warmup_ratio=0.0, save_steps=4, save_total_limit=2, log_interval=4)
"""


def _config(tmp_path, model, method="lora", dropout=0.0, iters=8, checkpointing=False):
    path = tmp_path / f"{method}_{dropout}_{iters}.py"
    path.write_text(
        CONFIG.format(
            model=model,
            method=method,
            dropout=dropout,
            iters=iters,
            checkpointing=checkpointing,
            lr=1e-2 if method == "lora" else 1e-3,
            data=str(EXAMPLE_DATA / "alpaca_mini.json"),
        )
    )
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama):
    """One process, accumulation 2: the run two processes x batch 1 must reproduce (with
    reentrant gradient checkpointing, whose inner backward the engines' hooks must follow)."""
    runs = {}

    def run(method, accumulation=2):
        if (method, accumulation) not in runs:
            tmp = tmp_path_factory.mktemp(f"one_{method}_{accumulation}")
            config = _config(tmp, tiny_llama, method, checkpointing=True)
            losses = train_processes(
                config,
                tmp / "work",
                1,
                "--cfg-options",
                f"train.accumulative_counts={accumulation}",
            )
            runs[method, accumulation] = (config, losses, tmp / "work")
        return runs[method, accumulation]

    return run


ENGINE_FLAGS = {
    "ddp": [],
    "fsdp": ["--fsdp"],
    "zero2": ["--deepspeed", "zero2"],
    "zero3": ["--deepspeed", "zero3"],
}


@pytest.mark.parametrize(
    "engine,method,accumulation",
    [
        ("zero2", "lora", 1),
        ("zero3", "full", 1),
        ("fsdp", "full", 1),
        ("zero3", "qlora", 1),
        # accumulating in each process: the gradient all-reduce skipped on the first micro-batch
        ("ddp", "lora", 2),
        ("fsdp", "full", 2),
    ],
)
def test_two_processes_equal_one_process_with_accumulation(
    tmp_path, reference, engine, method, accumulation
):
    config, expected, one_dir = reference(method, 2 * accumulation)
    losses = train_processes(
        config,
        tmp_path / "work",
        2,
        *ENGINE_FLAGS[engine],
        "--cfg-options",
        f"train.accumulative_counts={accumulation}",
    )
    assert len(losses) == len(expected) == 8
    assert losses == pytest.approx(expected, abs=1e-5)  # fp32; reduction order differs
    assert expected[-1] < expected[0]
    # the final adapter/model is gathered from the shards and equals the one-process result
    out = "model" if method == "full" else "adapter"
    ours, theirs = trained_weights(tmp_path / "work" / out), trained_weights(one_dir / out)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=2e-4, rtol=0)
    assert (
        json.loads((tmp_path / "work" / out / "xtuner_lite.json").read_text())["method"] == method
    )


PREF_CONFIG = """
model = dict(pretrained={model!r}, method="lora", lora=dict(r=8, alpha=16, dropout=0.0))
train_dataset = dict(data_files={data!r}, tokenizer={model!r}, template="chatml",
                     max_length=64, pack=True)
objective = dict(type="dpo", beta=0.5)
train = dict(batch_size=1, accumulative_counts=1, max_iters=6, lr=1e-2, dtype=None,
             warmup_ratio=0.0, save_steps=4, save_total_limit=2, log_interval=4)
"""


@pytest.fixture(scope="module")
def dpo_reference(tmp_path_factory, tiny_llama):
    """DPO-LoRA in one process with accumulation 2."""
    tmp = tmp_path_factory.mktemp("dpo_one")
    config = tmp / "dpo.py"
    config.write_text(
        PREF_CONFIG.format(model=tiny_llama, data=str(EXAMPLE_DATA / "pref_mini.json"))
    )
    losses = train_processes(
        config, tmp / "work", 1, "--cfg-options", "train.accumulative_counts=2"
    )
    return config, losses, tmp / "work"


def test_dpo_on_zero2_equals_one_process_with_accumulation(tmp_path, dpo_reference):
    """The DPO loss is normalized by the pairs of the global batch under DeepSpeed too (DDP:
    the objective contract, for every objective)."""
    config, expected, one_dir = dpo_reference
    losses = train_processes(config, tmp_path / "work", 2, *ENGINE_FLAGS["zero2"])
    assert len(losses) == len(expected) == 6
    assert losses == pytest.approx(expected, abs=1e-5)
    assert expected[-1] < expected[0]
    ours = trained_weights(tmp_path / "work" / "adapter")
    theirs = trained_weights(one_dir / "adapter")
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=2e-4, rtol=0)


def test_deepspeed_sigkill_then_resume_gives_the_same_losses(tmp_path, tiny_llama):
    # dropout on: each rank draws its own masks, so every rank's RNG must come back
    config = _config(tmp_path, tiny_llama, dropout=0.1, iters=40)
    reference = train_processes(config, tmp_path / "whole", 2, "--deepspeed", "zero3")

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        train_cmd(config, killed, "--deepspeed", "zero3"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=process_env(2),
        start_new_session=True,
    )
    log = killed / "loss.jsonl"
    wait_for_lines(log, 6, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
    proc.wait()
    done = len(log.read_text().splitlines())
    resume_from = int((killed / "last_checkpoint").read_text().split("iter_")[-1].split(".")[0])
    assert resume_from < done < 40, "the run finished before it could be killed"
    assert (killed / f"iter_{resume_from}.pth").is_dir()
    resumed = train_processes(config, killed, 2, "--deepspeed", "zero3", "--resume", "auto")
    assert resumed == reference  # bitwise
    assert (killed / "adapter" / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in killed.glob("iter_*.pth")) == ["iter_36.pth", "iter_40.pth"]


def test_deepspeed_config_presets_and_overrides(tmp_path):
    config = deepspeed_config(
        "zero3_offload", batch_size=2, accumulative_counts=4, max_norm=1.0, world_size=2
    )
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert config["train_batch_size"] == 16 and config["gradient_clipping"] == 1.0

    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 2},
                "train_micro_batch_size_per_gpu": 8,
                "gradient_accumulation_steps": "auto",
            }
        )
    )
    with pytest.warns(UserWarning, match="train_micro_batch_size_per_gpu: 8 -> 1"):
        config = deepspeed_config(str(path), 1, 2, None, 2)
    assert config["gradient_accumulation_steps"] == 2 and config["gradient_clipping"] == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # values that agree are not reported
        deepspeed_config({"train_micro_batch_size_per_gpu": 1}, 1, 1, None, 2)

    with pytest.raises(XtunerError, match="unknown 'zero4'"):
        deepspeed_config("zero4", 1, 1, None, 2)
    with pytest.raises(XtunerError, match="no such file"):
        deepspeed_config(str(tmp_path / "missing.json"), 1, 1, None, 2)
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(XtunerError, match="bad.json: not valid JSON"):
        deepspeed_config(str(tmp_path / "bad.json"), 1, 1, None, 2)


def test_nproc_per_node_runs_torchrun(monkeypatch):
    for name in ("LOCAL_RANK", "WORLD_SIZE", "NNODES", "NODE_RANK", "ADDR", "PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    assert torchrun_command(["train", "x.py"]) is None
    monkeypatch.setenv("NPROC_PER_NODE", "1")
    assert torchrun_command(["train", "x.py"]) is None  # one process: no launcher needed
    monkeypatch.setenv("NPROC_PER_NODE", "4")
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("ADDR", "10.0.0.1")
    command = torchrun_command(["train", "x.py", "--deepspeed", "zero2"])
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nproc_per_node=4", "--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1"} <= set(
        command
    )
    assert command[-5:] == ["xtuner_lite.cli", "train", "x.py", "--deepspeed", "zero2"]
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert torchrun_command(["train", "x.py"]) is None  # already a torchrun worker
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("NPROC_PER_NODE", "two")
    with pytest.raises(XtunerError, match="NPROC_PER_NODE must be a positive integer"):
        torchrun_command(["train", "x.py"])


def test_engine_flags_need_several_processes(tmp_path, tiny_llama):
    from xtuner_lite.commands.train import train

    config = str(_config(tmp_path, tiny_llama))
    for flags in ({"fsdp": True}, {"deepspeed": "zero2"}):
        with pytest.raises(XtunerError, match="need several processes: launch with NPROC_PER_N"):
            train(config, work_dir=tmp_path / "w", **flags)
