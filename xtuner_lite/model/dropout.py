"""LoRA's input dropout fused into its A projection, with a cheaper mask, on CPU.

peft computes ``lora_B(lora_A(dropout(x)))`` in every adapted layer. Two costs of that on CPU:

- Memory: each layer's dropout saves its mask and ``lora_A`` saves the dropped copy of ``x``
  for its weight gradient — a large share of a decoder layer's activations, although q/k/v
  (and gate/up) all read the same ``x``. Here A's product saves ``x``
  itself (one tensor for the modules sharing it) and the mask as bits (more layers fit
  without recomputation).
- Time: torch's Mersenne-Twister generator draws one 32-bit number per element sequentially.
  One 64-bit draw of numpy's SFC64 generator (seeded by one
  draw from torch's generator, so ``torch.manual_seed``, checkpointed recomputation and resumed
  RNG state replay the same masks) gives four 16-bit uniforms; a 16-bit threshold keeps the drop
  rate within 1/65536 of ``p``, and kept values are scaled by the exact inverse of the realised
  keep probability, so the expected output equals the input as with ``nn.Dropout``. The mask is
  applied in numpy as an integer multiply of the raw bits (cheaper than torch's ``where``).

On GPU (fast generators, other memory trade-offs) the layer is plain dropout then the product.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_RAW_VIEWS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.float32}


def _keep_mask(seed: int, shape: torch.Size, dropped: int) -> np.ndarray:
    """Bool mask of ``shape``: True where the 16-bit uniform drawn from ``seed`` is kept."""
    n = int(np.prod(shape))
    uniform16 = np.random.SFC64(seed).random_raw((n + 3) // 4).view(np.uint16)[:n]
    return (uniform16 >= dropped).reshape(shape)


def masked(x: torch.Tensor, keep: np.ndarray) -> torch.Tensor:
    """x where ``keep`` else 0; x contiguous, on CPU. Zeroing the raw bits of a 16-bit float
    gives +0.0, so half-precision values are masked as integers."""
    raw = x.detach().view(_RAW_VIEWS[x.dtype]).numpy()
    return torch.from_numpy(raw * keep).view(x.dtype).view(x.shape)


def pack_mask(keep: np.ndarray) -> torch.Tensor:
    """A keep mask as bits, 8 elements to a byte: what a product saves for backward."""
    return torch.from_numpy(np.packbits(keep))


def unpack_mask(bits: torch.Tensor, shape: torch.Size) -> np.ndarray:
    """The bool mask of ``shape`` that :func:`pack_mask` packed (cheaper than drawing again)."""
    count = int(np.prod(shape))
    return np.unpackbits(bits.numpy(), count=count).view(bool).reshape(shape)


class _DroppedProduct(torch.autograd.Function):
    """y = scale · (x · keep) W^T, saving x and the mask packed 8 elements to a byte (not the
    mask as bools, not the product's input). Unpacking is cheaper than drawing the mask again.
    ``scale`` multiplies the rank-wide product and its gradient, not the model-wide input (two
    passes over the input fewer). Runs under the caller's autocast: the product is in the
    compute dtype."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, keep: np.ndarray, scale: float
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight, pack_mask(keep))
        ctx.scale = scale
        return F.linear(masked(x, keep), weight).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, bits = ctx.saved_tensors
        keep = unpack_mask(bits, x.shape)
        grad = grad * ctx.scale
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = masked((grad @ weight.to(grad.dtype)).to(x.dtype), keep)
        if ctx.needs_input_grad[1]:
            dropped_x = masked(x, keep).to(grad.dtype)
            grad_weight = grad.reshape(-1, grad.shape[-1]).t() @ dropped_x.reshape(-1, x.shape[-1])
        return grad_x, grad_weight, None, None


class DropoutLinear(torch.nn.Linear):
    """A LoRA ``lora_A`` (bias-free) whose input dropout is part of its product."""

    def __init__(self, in_features: int, out_features: int, p: float, **kwargs):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        super().__init__(in_features, out_features, bias=False, **kwargs)
        self.p = p
        self.dropped = round(p * 65536)  # 16-bit uniforms below this are zeroed
        self.scale = 65536 / (65536 - self.dropped)

    @classmethod
    def replacing(cls, linear: torch.nn.Linear, p: float) -> DropoutLinear:
        """A ``DropoutLinear`` holding ``linear``'s own weight parameter."""
        module = cls(linear.in_features, linear.out_features, p, device="meta")
        module.weight = linear.weight
        return module

    def drops(self, x: torch.Tensor) -> bool:
        """Whether a training call on ``x`` drops with a drawn mask (:meth:`keep_mask`)."""
        cpu = x.device.type == "cpu"
        return self.training and self.dropped > 0 and cpu and x.dtype in _RAW_VIEWS

    def keep_mask(self, x: torch.Tensor) -> np.ndarray:
        """This call's mask for ``x``: one draw from torch's generator seeds it."""
        seed = int(torch.empty((), dtype=torch.int64).random_())
        return _keep_mask(seed, x.shape, self.dropped)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropped == 0:
            return F.linear(x, self.weight)
        if not self.drops(x):
            return F.linear(F.dropout(x, self.p, training=True), self.weight)
        return _DroppedProduct.apply(x.contiguous(), self.weight, self.keep_mask(x), self.scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"


def fuse_lora_dropout(model: torch.nn.Module) -> int:
    """In every plain LoRA layer of ``model``, move the ``nn.Dropout`` into a
    :class:`DropoutLinear` ``lora_A`` (the dropout becomes ``nn.Identity``); returns how many.
    State-dict keys and the trained parameters are unchanged."""
    count = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        projections = getattr(module, "lora_A", None)
        if not (
            isinstance(dropouts, torch.nn.ModuleDict)
            and isinstance(projections, torch.nn.ModuleDict)
        ):
            continue
        for name, dropout in dropouts.items():
            linear = projections[name] if name in projections else None
            if (
                isinstance(dropout, torch.nn.Dropout)
                and dropout.p > 0
                and type(linear) is torch.nn.Linear
                and linear.bias is None
                and name not in getattr(module, "lora_variant", {})
            ):
                projections[name] = DropoutLinear.replacing(linear, dropout.p)
                dropouts[name] = torch.nn.Identity()
                count += 1
    return count
