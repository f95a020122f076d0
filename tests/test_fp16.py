"""fp16 for GPUs without bf16 (compute capability below 8.0), exercised on CPU: what the
fallback changes, loss scaling through the one step, overflowing steps skipped rather than
stopping the run, a run that only overflows stopped, the scale kept across a resume."""

import math

import pytest
import torch

from xtuner_lite.cli import main
from xtuner_lite.data.dataset import collate_packed
from xtuner_lite.model import build_model
from xtuner_lite.objectives.sft import SFTObjective
from xtuner_lite.training import NonFiniteLossError, TrainModel
from xtuner_lite.training.optim import ScaledOptimWrapper
from xtuner_lite.training.runner import TrainSettings, gpu_precision
from xtuner_lite.training.step import MAX_SKIPPED_IN_A_ROW

QLORA = dict(pretrained="x", method="qlora", dtype="bf16", lora_dtype="bf16")  # compute: default


@pytest.mark.parametrize("capability", [(7, 5), (7, 0), (8, 0), (9, 0)])
def test_a_gpu_without_bf16_trains_in_fp16_with_fp32_trained_weights(capability):
    settings = TrainSettings(dtype="bf16")
    model, new, changed = gpu_precision(QLORA, settings, capability)
    if capability >= (8, 0):
        assert (model, new, changed) == (QLORA, settings, [])
        return
    assert new.dtype == "fp16"
    # frozen weights and QLoRA's compute dtype (build_model's bf16 default) in fp16; the
    # adapter, which is trained, in fp32 (loss scaling unscales fp32 gradients only)
    assert (model["dtype"], model["compute_dtype"], model["lora_dtype"]) == ("fp16", "fp16", "fp32")
    assert changed == [
        "train.dtype bf16 -> fp16",
        "model.dtype bf16 -> fp16",
        "model.compute_dtype bf16 -> fp16",
        "model.lora_dtype bf16 -> fp32",
    ]
    assert QLORA["dtype"] == "bf16"  # the caller's config is not changed in place
    full, _, _ = gpu_precision({"method": "full", "dtype": "bf16"}, settings, capability)
    assert full["dtype"] == "fp32"  # a full fine-tune's weights are all trained


def test_plan_without_bf16_follows_the_fallback(capsys):
    args = ["plan", "qwen2_5_7b_instruct_qlora_alpaca", "--cfg-options", "model.lora_dtype=bf16"]
    assert main(args) == 0
    bf16 = capsys.readouterr().out
    assert main([*args, "--no-bf16"]) == 0
    fp16 = capsys.readouterr().out
    assert "bf16 LoRA weights" in bf16
    assert "train.dtype bf16 -> fp16" in fp16 and "fp32 LoRA weights" in fp16
    # nor does it suggest what the fallback would undo
    old = ["train.chunk_size=1024", "train.offload_activations=False", "model.lora.r=64"]
    assert main(["plan", "qwen2_5_7b_instruct_qlora_alpaca", "--gpu-mem", "7.5GiB",
                 "--cfg-options", *old]) == 3  # fmt: skip
    assert "model.lora_dtype=bf16" in capsys.readouterr().out
    assert main(["plan", "qwen2_5_7b_instruct_qlora_alpaca", "--gpu-mem", "7.5GiB",
                 "--no-bf16", "--cfg-options", *old]) == 3  # fmt: skip
    suggested = capsys.readouterr().out.split("would fit with: ")[1]
    assert "model.lora_dtype" not in suggested and "train.offload_activations=True" in suggested


def _batches(count: int) -> list[list[dict]]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(count):
        ids = torch.randint(3, 100, (48,), generator=generator).tolist()
        rows.append(
            dict(input_ids=ids, labels=ids, position_ids=list(range(48)), cu_seqlens=[0, 48])
        )
    return [[collate_packed([row])] for row in rows]


@pytest.fixture
def scaled(tmp_path):
    """A tiny LoRA model under fp16 autocast with loss scaling, and its step."""
    from conftest import tiny_model

    tiny_model(vocab_size=100).save_pretrained(tmp_path)
    torch.manual_seed(0)
    model = build_model(str(tmp_path), method="lora", lora=dict(r=8, alpha=16, dropout=0.0))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    wrapper = ScaledOptimWrapper(optimizer, device_type="cpu", clip_grad=dict(max_norm=1.0))
    train_model = TrainModel(model, SFTObjective())
    return model, wrapper, lambda batch: train_model.train_step(batch, wrapper)


def _trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fp16_with_loss_scaling_lowers_the_loss(scaled):
    model, wrapper, step = scaled
    dtypes = set()
    attention = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn"))
    attention.register_forward_hook(lambda module, args, out: dtypes.add(out[0].dtype))
    batch = _batches(1)[0]
    losses = [float(step(batch)["loss"]) for _ in range(12)]
    assert dtypes == {torch.float16}  # the step ran under fp16 autocast
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0], losses
    assert wrapper.loss_scaler.get_scale() == 65536.0  # nothing overflowed
    assert wrapper.skipped_in_a_row == 0


def test_an_overflowing_step_is_skipped_and_training_goes_on(scaled):
    model, wrapper, step = scaled
    overflow = {"on": False}
    lora_a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    lora_a.register_hook(lambda grad: grad * float("inf") if overflow["on"] else grad)
    batches = _batches(4)
    step(batches[0])
    before = _trained(model)
    overflow["on"] = True
    log = step(batches[1])
    assert float(log["loss_scale"]) == 32768.0  # halved
    assert all(torch.equal(before[n], p) for n, p in _trained(model).items())  # not stepped
    overflow["on"] = False
    # an overflow in the forward: the loss itself is not finite, and the step is skipped too
    norm = model.get_base_model().model.norm
    handle = norm.register_forward_hook(lambda module, args, out: out * float("inf"))
    log = step(batches[2])
    handle.remove()
    assert not math.isfinite(float(log["loss"])) and float(log["loss_scale"]) == 16384.0
    assert all(torch.equal(before[n], p) for n, p in _trained(model).items())
    step(batches[3])
    assert wrapper.skipped_in_a_row == 0
    assert not all(torch.equal(before[n], p) for n, p in _trained(model).items())
    # a resumed run goes on with the lowered scale
    state = wrapper.state_dict()
    trained = [p for p in model.parameters() if p.requires_grad]
    again = ScaledOptimWrapper(torch.optim.AdamW(trained), device_type="cpu")
    again.load_state_dict(state)
    assert again.loss_scaler.get_scale() == 16384.0


def test_a_run_that_only_overflows_is_stopped(scaled):
    model, wrapper, step = scaled
    lora_a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    lora_a.register_hook(lambda grad: grad * float("nan"))
    batch = _batches(1)[0]
    for _ in range(MAX_SKIPPED_IN_A_ROW - 1):
        step(batch)
    with pytest.raises(NonFiniteLossError, match=f"{MAX_SKIPPED_IN_A_ROW} steps in a row"):
        step(batch)
