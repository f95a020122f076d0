"""LoRA dropout with a ~2.5× cheaper random mask on CPU.

On CPU, torch's Mersenne-Twister generator is the bottleneck of ``nn.Dropout``: one sequential
32-bit draw per element (a fifth of a LoRA step on SmolLM2, measured). Here one 64-bit draw of
numpy's SFC64 generator (seeded by one draw from torch's generator, so ``torch.manual_seed``,
checkpointed recomputation and resumed RNG state replay the same masks) gives four 16-bit
uniforms; a 16-bit threshold keeps the drop rate within 1/65536 of ``p``, and the kept values
are scaled by the exact inverse of the realised keep probability, so the expected output equals
the input as with ``nn.Dropout``. Applying the mask in numpy (an integer multiply of the raw
bits) is also ~3× faster than torch's ``where`` on 2 cores (measured).
"""

from __future__ import annotations

import numpy as np
import torch

_RAW_VIEWS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.float32}


def _masked(x: torch.Tensor, keep: np.ndarray, scale: float) -> torch.Tensor:
    """x where ``keep`` else 0, times ``scale``; x contiguous, on CPU. Zeroing the raw bits of
    a 16-bit float gives +0.0, so half-precision values are masked as integers."""
    raw = x.detach().view(_RAW_VIEWS[x.dtype]).numpy()
    return torch.from_numpy(raw * keep).view(x.dtype).view(x.shape).mul_(scale)


class _MaskedScale(torch.autograd.Function):
    """y = x · keep · scale. The mask is saved as a tensor (not held on ``ctx``), so that
    activation checkpointing drops it with the layer's other activations and recomputes it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return _masked(x, keep.numpy(), scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        grad = grad.contiguous()
        if grad.dtype not in _RAW_VIEWS:
            return grad * keep.to(grad.dtype) * ctx.scale, None, None
        return _masked(grad, keep.numpy(), ctx.scale), None, None


class Int16Dropout(torch.nn.Module):
    """Drop each element with probability ``round(p * 65536) / 65536`` (training mode only)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.dropped = round(p * 65536)  # 16-bit uniforms below this are zeroed
        self.scale = 65536 / (65536 - self.dropped)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropped == 0:
            return x
        if x.device.type != "cpu" or x.dtype not in _RAW_VIEWS:  # GPU generators are fast
            return torch.nn.functional.dropout(x, self.p, training=True)
        seed = int(torch.empty((), dtype=torch.int64).random_())
        n = x.numel()
        uniform16 = np.random.SFC64(seed).random_raw((n + 3) // 4).view(np.uint16)[:n]
        keep = (uniform16 >= self.dropped).reshape(x.shape)
        return _MaskedScale.apply(x.contiguous(), torch.from_numpy(keep), self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_int16_lora_dropout(model: torch.nn.Module) -> int:
    """Swap every peft LoRA ``nn.Dropout`` for :class:`Int16Dropout`; returns how many."""
    count = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                dropouts[name] = Int16Dropout(dropout.p)
                count += 1
    return count
