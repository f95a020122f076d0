"""Ulysses sequence parallelism on CPU (gloo): 2 processes sharing every row's tokens must give
the losses and weights of 1 process on the same rows, for packed rows of several samples of
uneven lengths (SFT: LoRA, QLoRA and full) and for the preference objectives (DPO pairs
sharing their prompts, KTO's unpaired examples, a reward model's last-token score), with DDP,
FSDP2 and DeepSpeed ZeRO-2/3 as the data parallelism around the groups (ZeRO-3 gathers a weight
when it is read: a shard without trained tokens must read the head too).

The model has SmolLM2-135M's head layout (9 query heads, 3 key/value heads): neither divides by
2, so the heads are spread and padded around the all-to-all.
"""

import subprocess

import pytest
import torch

from xtuner_lite.errors import XtunerError
from xtuner_lite.training.runner import TrainSettings

from conftest import (
    EXAMPLE_DATA,
    OBJECTIVE_CASES,
    objective_cfg,
    process_env,
    tiny_model,
    train_cmd,
    train_processes,
    trained_weights,
    write_config,
)

pytestmark = pytest.mark.slow

SFT_CONFIG = """
model = dict(pretrained={model!r}, method={method!r}, lora=dict(r=8, alpha=16, dropout=0.0),
             compute_dtype="fp32", gradient_checkpointing=True)
train_dataset = dict(data_files={data!r}, tokenizer={model!r}, map_fn="alpaca",
                     template="smollm2", max_length=96, pack=True)
train = dict(batch_size=1, accumulative_counts=1, max_iters=6, lr={lr}, dtype=None,
             warmup_ratio=0.0, save_steps=100, log_interval=3)
"""

SP2 = ("--cfg-options", "train.sequence_parallel_size=2")


@pytest.fixture(scope="module")
def smol_heads(tmp_path_factory, smol_tokenizer):
    """A random 2-layer Llama with SmolLM2-135M's 9 query and 3 key/value heads."""
    model = tiny_model(
        hidden_size=72, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=len(smol_tokenizer), tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("smol_heads")
    model.save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, smol_heads, tiny_llama):
    """Each config trained once in one process: what the sequence-parallel runs must equal."""
    runs = {}

    def run(kind: str):
        if kind not in runs:
            tmp = tmp_path_factory.mktemp(f"one_{kind}")
            config = tmp / f"{kind}.py"
            if kind in OBJECTIVE_CASES:  # a preference objective on its pairs (or examples)
                cfg = objective_cfg(kind, tiny_llama, max_iters=5, lr=1e-2, save_steps=100)
                cfg["model"]["lora"]["dropout"] = 0.0  # each rank draws its own masks
                write_config(config, cfg)
            else:
                lr = 1e-3 if kind == "full" else 1e-2
                data = str(EXAMPLE_DATA / "alpaca_mini.json")
                text = SFT_CONFIG.format(model=smol_heads, method=kind, lr=lr, data=data)
                config.write_text(text)
            runs[kind] = (config, train_processes(config, tmp / "work", 1), tmp / "work")
        return runs[kind]

    return run


def _same_result(work, one_work, losses, expected, learns=True):
    assert losses == pytest.approx(expected, abs=1e-5)  # fp32; reduction order differs
    half = len(expected) // 2
    first, last = expected[:half], expected[-half:]
    assert not learns or sum(last) < sum(first)  # it learns (the rows differ from step to step)
    out = "adapter" if (one_work / "adapter").exists() else "model"
    ours, theirs = trained_weights(work / out), trained_weights(one_work / out)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=2e-4, rtol=0)


@pytest.mark.parametrize(
    "kind,engine",
    [("lora", []), ("full", []), ("full", ["--fsdp"]), ("lora", ["--deepspeed", "zero2"]),
     ("lora", ["--deepspeed", "zero3"]), ("qlora", []),
     # pairs sharing their prompt, unpaired examples, a score from the last token's hidden state
     ("dpo-sigmoid", []), ("kto", []), ("reward", [])],
)  # fmt: skip
def test_two_ranks_sharing_rows_equal_one_process(tmp_path, one_process, kind, engine):
    config, expected, one_work = one_process(kind)
    losses = train_processes(config, tmp_path / "work", 2, *engine, *SP2)
    assert len(losses) == len(expected)
    # QLoRA on a random 4-bit model: the claim is equality with one process, not learning
    _same_result(tmp_path / "work", one_work, losses, expected, learns=kind != "qlora")


def test_ddp_around_two_sequence_parallel_groups(tmp_path, one_process):
    """4 processes: 2 groups of 2 ranks, each group its own rows, = 1 process accumulating 2."""
    config, _, _ = one_process("lora")
    accumulated = tmp_path / "one"
    expected = train_processes(
        config, accumulated, 1, "--cfg-options", "train.accumulative_counts=2"
    )
    losses = train_processes(config, tmp_path / "work", 4, *SP2)
    _same_result(tmp_path / "work", accumulated, losses, expected)


def test_settings_name_what_sequence_parallel_needs(tmp_path, smol_heads):
    with pytest.raises(XtunerError, match="pad_to_multiple_of=32 must be a multiple of"):
        TrainSettings(sequence_parallel_size=3)
    with pytest.raises(XtunerError, match="sequence_parallel_size must be a positive integer"):
        TrainSettings(sequence_parallel_size=0)
    config = tmp_path / "sp.py"
    config.write_text(
        SFT_CONFIG.format(model=smol_heads, method="lora", lr=1e-2,
                          data=str(EXAMPLE_DATA / "alpaca_mini.json"))
    )  # fmt: skip
    one = subprocess.run(
        train_cmd(config, tmp_path / "work", *SP2), capture_output=True, text=True,
        env=process_env(1),
    )  # fmt: skip
    assert one.returncode != 0
    assert "sequence_parallel_size=2 must divide the number of processes (1)" in one.stderr
