"""Llama-family RMSNorm and gated-SiLU MLP that save less for backward, same gradients.

Two of the pieces a decoder layer keeps for backward are larger than they need be. transformers'
RMSNorm upcasts its input and autograd keeps that fp32 copy (twice the size of a bf16 input); here
the norm keeps its input as it came and one fp32 scale per token. The MLP's ``act(gate) * up`` keeps
gate, up and SiLU's output; here SiLU is recomputed in backward from gate. Less kept per layer lets
more layers skip activation checkpointing within the same memory. The backward formulas are
autograd's own (``silu_backward``; the norm's chain rule in fp32, in the same order, so an overflow
still ends in NaN), and gradients equal the originals' (in fp32 to rounding; tested).

Applied per module instance of the classes listed below (their ``forward`` is known), never by
class name.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2


class _RMSNorm(torch.autograd.Function):
    """weight · (x · rsqrt(mean(x²) + eps)) with the normalisation in fp32, as transformers'."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        scale = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        normed = (xf * scale).to(x.dtype)
        ctx.save_for_backward(x, weight, scale)
        return weight * normed

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, scale = ctx.saved_tensors
        xf = x.float()
        grad_weight = None
        if ctx.needs_input_grad[1]:  # (frozen in LoRA: no normalised copy made then)
            normed = (xf * scale).to(x.dtype)
            grad_weight = (grad * normed).reshape(-1, x.shape[-1]).sum(0)
        g = (grad * weight).to(x.dtype).float()  # rounded where autograd rounds it
        # scale·g − scale³·x·mean(g·x), in autograd's order: an overflowed variance (scale 0)
        # gives NaN here as there, so a diverging run still stops at a non-finite loss
        grad_variance = (g * xf).sum(-1, keepdim=True) * (-0.5 * scale.pow(3))
        grad_x = g * scale + grad_variance * (2 / x.shape[-1]) * xf
        return grad_x.to(x.dtype), grad_weight, None


class _GatedSiLU(torch.autograd.Function):
    """silu(gate) · up, keeping gate and up only."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_up = grad * F.silu(gate)
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return grad_gate, grad_up


def _norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_GatedSiLU.apply(self.gate_proj(x), self.up_proj(x)))


def _known_classes() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(RMSNorm classes, gated-MLP classes) whose forward the functions above reproduce."""

    norms = (
        modeling_llama.LlamaRMSNorm,
        modeling_mistral.MistralRMSNorm,
        modeling_qwen2.Qwen2RMSNorm,
    )
    mlps = (modeling_llama.LlamaMLP, modeling_mistral.MistralMLP, modeling_qwen2.Qwen2MLP)
    return norms, mlps


def use_lean_layers(model: nn.Module) -> int:
    """Give the known RMSNorm and SiLU-MLP modules of ``model`` the lean forwards; returns how
    many modules changed."""

    norms, mlps = _known_classes()
    count = 0
    for module in model.modules():
        if type(module) in norms:
            module.forward = types.MethodType(_norm_forward, module)
            count += 1
        elif type(module) in mlps and type(module.act_fn) in (SiLUActivation, nn.SiLU):
            module.forward = types.MethodType(_mlp_forward, module)
            count += 1
    return count
