"""Activation offload (train.offload_activations): the checkpointed layers' saved inputs go
through host memory and come back; gradients are those of the run without it, and what moves
is what the planner says moves."""

import logging

import pytest
import torch

from xtuner_lite.cli import main
from xtuner_lite.commands.plan import PlanSettings, Shape, plan_memory
from xtuner_lite.errors import XtunerError
from xtuner_lite.model import build_model, loss_sum
from xtuner_lite.model.offload import offload_activations

from conftest import nonzero_lora_b, tiny_model, tiny_train_cfg, write_config

TOKENS = 96


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    model = tiny_model(num_hidden_layers=4, vocab_size=300)
    path = tmp_path_factory.mktemp("four_layers")
    model.save_pretrained(path)
    return str(path), Shape.from_config(model.config)


def _batch() -> dict:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (1, TOKENS), generator=generator)
    return dict(input_ids=ids, labels=ids, position_ids=torch.cat([torch.arange(40),
                torch.arange(TOKENS - 40)])[None],
                cu_seqlens=torch.tensor([0, 40, TOKENS], dtype=torch.int32))  # fmt: skip


def _gradients(path: str, method: str, checkpointing, offload: bool):
    """Loss and gradients of one forward/backward (dropout on: its masks must replay too)."""
    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    model = build_model(path, method=method, gradient_checkpointing=checkpointing,
                        lora=dict(r=4, alpha=8, dropout=0.1))  # fmt: skip
    logging.disable(logging.NOTSET)
    model.train()
    nonzero_lora_b(model, std=0.02)
    moved = offload_activations(model) if offload else None
    torch.manual_seed(2)
    loss, _ = loss_sum(model, _batch(), 1024)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss), grads, moved


@pytest.mark.parametrize(
    "method, checkpointing", [("lora", True), ("lora", 2), ("full", True)], ids=str
)
def test_gradients_equal_with_and_without_offload(four_layers, method, checkpointing):
    path, shape = four_layers
    loss, grads, _ = _gradients(path, method, checkpointing, offload=False)
    loss_off, grads_off, moved = _gradients(path, method, checkpointing, offload=True)
    assert loss_off == loss
    assert grads.keys() == grads_off.keys()
    for name, grad in grads.items():
        assert torch.equal(grads_off[name], grad), name
    first_layer = next(g for n, g in grads.items() if "layers.0." in n)
    assert first_layer.abs().sum() > 0  # gradients reached the first offloaded layer
    # what moved is what the planner puts in host memory: each checkpointed layer's input
    plan = plan_memory(shape, PlanSettings(method=method, base_dtype="fp32", compute_dtype="fp32",
                       lora_r=4, max_length=TOKENS, gradient_checkpointing=checkpointing,
                       offload=True, cpu=True))  # fmt: skip
    assert moved.offloaded_bytes == plan.get("offloaded to host") > 0


def test_offload_plans_the_inputs_in_flight_not_every_layer():
    shape = Shape(4096, 14336, 32, 32, 8, 128, 128256, False)
    kept = plan_memory(shape, PlanSettings(max_length=4096))
    moved = plan_memory(shape, PlanSettings(max_length=4096, offload=True))
    one_input = 2 * 4096 * 4096  # bf16 hidden states of 4,096 tokens
    assert kept.get("activations") == 32 * one_input
    assert moved.get("activations") == 2 * one_input
    assert moved.get("offloaded to host") == 32 * one_input
    assert kept.total - moved.total == 30 * one_input  # host memory is not the device's


def test_offload_needs_checkpointed_layers(four_layers, tmp_path, tiny_llama, capsys):
    path, _ = four_layers
    model = build_model(path, method="lora", lora=dict(r=4, alpha=8))
    with pytest.raises(XtunerError, match="no layer is checkpointed"):
        offload_activations(model)
    cfg = tiny_train_cfg(tiny_llama, offload_activations=True)
    config = write_config(tmp_path / "offload.py", cfg)
    assert main(["train", str(config), "--work-dir", str(tmp_path / "w")]) != 0
    assert "set model.gradient_checkpointing too" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # refused before any work
