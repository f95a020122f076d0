"""A plain LoRA layer's forward as one autograd function: y = x Wᵀ + b + s · (x Aᵀ) Bᵀ.

peft runs a LoRA layer as the base layer, then ``lora_B(lora_A(x)) * scaling`` added to its
output: under autocast that is two weight casts, a multiply and an add per layer in forward,
the same again in backward, plus autograd's bookkeeping for each. Here the low-rank product is
added into the base output by one ``addmm_`` and backward is written out, the scale applied to
the rank-wide products rather than the layer-wide ones. Gradients are the products autograd
computes (equal in fp32 to rounding; tested).

LoRA dropout is covered where it is fused into ``lora_A`` (``model/dropout.py``, on CPU): the
same mask, drawn the same way, multiplies A's input, and is saved as bits.

Applied per instance of peft's ``lora.Linear``, and only where the layer is the plain case:
one active adapter, no DoRA, not merged, no dropout module of peft's in training, a frozen
``nn.Linear`` base. Anything else — an adapter being disabled for the reference forward,
``adapter_names``, DeepSpeed ZeRO-3's partitioned parameters (gathered by hooks on the
submodule calls this skips), dropout off CPU — goes through peft's own forward.
"""

from __future__ import annotations

import types

import numpy as np
import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from xtuner_lite.model.dropout import DropoutLinear, masked, pack_mask, unpack_mask


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class _LoraProduct(torch.autograd.Function):
    """x Wᵀ + b + s · (d · (x ⊙ keep) Aᵀ) Bᵀ in the compute dtype (without ``keep``: x Aᵀ, d
    = 1), saving x, the mask as bits and the rank-wide product."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scale: float,
        keep: np.ndarray | None = None,
        keep_scale: float = 1.0,
    ) -> torch.Tensor:
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            flat = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
            if keep is not None:
                keep = keep.reshape(flat.shape)
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            low = (flat if keep is None else masked(flat, keep)) @ a.t()
            if keep is not None:
                low.mul_(keep_scale)
            out = F.linear(flat, weight.to(dtype), None if bias is None else bias.to(dtype))
            out.addmm_(low, b.t(), alpha=scale)
        bits = torch.empty(0, dtype=torch.uint8) if keep is None else pack_mask(keep)
        ctx.save_for_backward(flat, weight, a, b, low, bits)
        ctx.scale, ctx.keep_scale = scale, keep_scale
        ctx.x_dtype, ctx.shape, ctx.param_dtypes = x.dtype, x.shape, (lora_a.dtype, lora_b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        flat, weight, a, b, low, bits = ctx.saved_tensors
        keep = unpack_mask(bits, flat.shape) if bits.numel() else None
        grad = grad.reshape(-1, grad.shape[-1]).to(flat.dtype)
        grad_low = grad @ b  # (tokens, r)
        scale = ctx.scale * ctx.keep_scale  # d out / d (x ⊙ keep) Aᵀ Bᵀ
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight.to(flat.dtype)
            if keep is None:
                grad_x.addmm_(grad_low, a, alpha=scale)
            else:
                grad_x.add_(masked((grad_low @ a).mul_(scale), keep))
            grad_x = grad_x.view(ctx.shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            dropped = flat if keep is None else masked(flat, keep)
            grad_a = (grad_low.t() @ dropped).mul_(scale).to(ctx.param_dtypes[0])
        if ctx.needs_input_grad[4]:
            grad_b = (grad.t() @ low).mul_(ctx.scale).to(ctx.param_dtypes[1])
        return grad_x, None, None, grad_a, grad_b, None, None, None


def _plain_adapter(layer: LoraLinear) -> str | None:
    """The layer's one active adapter when the fused product computes exactly its forward."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    base = layer.base_layer
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    a, dropout = layer.lora_A[name], layer.lora_dropout[name]
    if type(a) not in (nn.Linear, DropoutLinear):
        return None
    if type(base) is not nn.Linear or base.weight.requires_grad:
        return None
    if layer.training and not isinstance(dropout, nn.Identity):  # peft's own dropout
        return None
    params = (base.weight, a.weight, layer.lora_B[name].weight)
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3 partitions: gathered by peft's calls
        return None
    return name


def _lean_forward(self: LoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = None if args or kwargs else _plain_adapter(self)
    if name is None:
        return LoraLinear.forward(self, x, *args, **kwargs)
    base, a = self.base_layer, self.lora_A[name]
    keep, keep_scale = None, 1.0
    if isinstance(a, DropoutLinear) and a.training and a.dropped:
        if not a.drops(x):  # off CPU: plain dropout, peft's way
            return LoraLinear.forward(self, x)
        keep, keep_scale = a.keep_mask(x), a.scale
    return _LoraProduct.apply(
        x, base.weight, base.bias, a.weight, self.lora_B[name].weight, self.scaling[name],
        keep, keep_scale,
    )  # fmt: skip


def use_lean_lora(model: nn.Module) -> int:
    """Give every peft ``lora.Linear`` of ``model`` the fused forward (falling back to peft's
    where the layer is not the plain case); returns how many layers changed."""
    count = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.forward = types.MethodType(_lean_forward, module)
            count += 1
    return count
