"""The GPU tier: what only a CUDA device can show (skipped without one; `scripts/gpu_checks.sh`
runs it together with the 8 GiB proof and the planner-vs-measured check)."""

import importlib.util
import subprocess

import numpy as np
import pytest
import torch

from xtuner_lite.data import IGNORE_INDEX, build_packed, collate_packed
from xtuner_lite.data.tokenize import TokenizedBatch
from xtuner_lite.model import build_model, loss_sum

from conftest import ROOT, loss_curve, real_step, tiny_train_cfg, train_cmd, write_config

pytestmark = pytest.mark.gpu

LENGTHS = [37, 90, 12, 120]


def _rows(pack: bool, vocab: int = 500):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, size=sum(LENGTHS)).astype(np.int32)
    labels = ids.copy()
    labels[rng.random(len(ids)) < 0.3] = IGNORE_INDEX
    data = build_packed(
        TokenizedBatch(ids, labels, np.array(LENGTHS), np.zeros(len(LENGTHS), bool)),
        max_length=512,
        pack=pack,
        shuffle=False,
    )
    return [data.row(i) for i in range(len(data))]


def _cuda(batch):
    return {k: v.cuda() for k, v in batch.items()}


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_bf16_training_on_cuda_lowers_the_loss(tiny_llama, method):
    model = build_model(
        tiny_llama,
        method=method,
        dtype="bf16" if method != "full" else "fp32",
        compute_dtype="bf16",
        lora=dict(r=8, alpha=16, dropout=0.0),
        device="cuda",
    )
    assert next(model.parameters()).is_cuda
    batch = _cuda(collate_packed(_rows(pack=True)))
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-2 if method != "full" else 1e-3)
    losses = [
        real_step(model, [batch], dtype="bf16", optimizer=optimizer, device_type="cuda")[0]
        for _ in range(8)
    ]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_optimizers_train_through_the_cli(tiny_llama, tmp_path, optimizer):
    from xtuner_lite.commands.train import train

    cfg = tiny_train_cfg(
        tiny_llama, max_iters=8, optimizer=optimizer, dtype="bf16", device="cuda", lr=1e-2
    )
    train(cfg, work_dir=tmp_path)
    losses = loss_curve(tmp_path)
    assert len(losses) == 8 and losses[-1] < losses[0]


def test_fp16_training_uses_loss_scaling(tiny_llama, tmp_path):
    config = tmp_path / "fp16.py"
    cfg = tiny_train_cfg(tiny_llama, max_iters=6, dtype="fp16", device="cuda", lr=1e-2)
    write_config(config, cfg)
    out = subprocess.run(
        train_cmd(config, tmp_path / "w"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_packed_rows_equal_per_sample_on_cuda(tiny_llama, attn):
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    model = build_model(
        tiny_llama, method="full", dtype="bf16", attn_implementation=attn, device="cuda"
    )
    with torch.no_grad():
        packed, count = loss_sum(model, _cuda(collate_packed(_rows(pack=True))))
        parts = [loss_sum(model, _cuda(collate_packed([row]))) for row in _rows(pack=False)]
    assert count == sum(c for _, c in parts)
    total = sum(float(loss) for loss, _ in parts)
    assert abs(float(packed) - total) <= 2e-2 * abs(total)  # bf16


def test_engine_greedy_equals_generate_on_cuda():
    from xtuner_lite.data.templates import get_template, stop_token_ids
    from xtuner_lite.hub import load_model, load_tokenizer
    from xtuner_lite.inference import InferenceEngine, SamplingParams

    tok = load_tokenizer("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct").cuda().eval()
    template = get_template("smollm2")
    stops = stop_token_ids(template, tok)
    prompts = [
        tok(
            template.render_prompt([{"role": "user", "content": q}], tok), add_special_tokens=False
        )["input_ids"]
        for q in ("What is the capital of France?", "Write a haiku about the sea.")
    ]
    expected = []
    for p in prompts:
        out = model.generate(
            torch.tensor([p], device="cuda"),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=stops[0],
        )
        row = out[0, len(p) :].tolist()
        expected.append(row[: next((i for i, t in enumerate(row) if t in stops), len(row))])
    engine = InferenceEngine(model, tok)
    got = engine.generate(prompts, SamplingParams(max_new_tokens=24, stop_token_ids=stops))
    assert [r.output_ids for r in got] == expected


def test_offload_on_cuda_equals_without(tmp_path):
    """The side-stream copies and the prefetch give the gradients of the run without them
    (what offload saves is measured by bench_8gb.py --offload on off)."""
    from xtuner_lite.model.offload import offload_activations

    from conftest import nonzero_lora_b, tiny_model

    tiny_model(hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
               vocab_size=500).save_pretrained(tmp_path)  # fmt: skip
    batch = _cuda(collate_packed(_rows(pack=True)))
    results = []
    for offload in (False, True):
        torch.manual_seed(0)
        lora = dict(r=8, alpha=16, dropout=0.0)
        model = build_model(str(tmp_path), method="lora", dtype="bf16", device="cuda",
                            gradient_checkpointing=True, lora=lora)  # fmt: skip
        model.train()
        nonzero_lora_b(model, std=0.02)
        moved = offload_activations(model) if offload else None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = loss_sum(model, batch)
        loss.backward()
        torch.cuda.synchronize()
        grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
        results.append((float(loss), grads, moved))
        del model
    (loss, grads, _), (loss_off, grads_off, moved) = results
    assert loss_off == loss and moved.offloaded_bytes > 0
    for name, grad in grads.items():
        assert torch.equal(grads_off[name], grad), name


def test_a_gpu_without_bf16_trains_in_fp16(tiny_llama, tmp_path, monkeypatch, capsys):
    """The fallback on a real GPU, its capability made pre-Ampere: one line, fp16 with loss
    scaling, the loss goes down."""
    from xtuner_lite.commands import train as train_command

    monkeypatch.setattr(train_command, "cuda_capability", lambda index=0: (7, 5))
    cfg = tiny_train_cfg(tiny_llama, max_iters=8, dtype="bf16", device="cuda", lr=1e-2)
    cfg["model"].update(dtype="bf16", lora_dtype="bf16")
    train_command.train(cfg, work_dir=tmp_path)
    out = capsys.readouterr().out
    assert "compute capability 7.5) has no bf16; training in fp16" in out
    assert "model.lora_dtype bf16 -> fp32" in out
    losses = loss_curve(tmp_path)
    assert len(losses) == 8 and losses[-1] < losses[0]


def test_lmdeploy_chat_on_a_merged_smollm2(tmp_path):
    """`xtuner chat --backend lmdeploy` on a merged SmolLM2 answers (the optional extra)."""
    if importlib.util.find_spec("lmdeploy") is None:
        pytest.skip("lmdeploy is not installed (the optional extra, its own CUDA torch)")
    from xtuner_lite.cli import main

    assert main(["chat", "smollm2-135m-instruct", "--backend", "lmdeploy", "--prompt",
                 "What is the capital of France?", "--no-stream"]) == 0  # fmt: skip
