"""LoRA dropout with a 4× cheaper random mask on CPU.

On CPU, torch's Mersenne-Twister generator is the bottleneck of ``nn.Dropout``: one sequential
32-bit draw per element (a fifth of a LoRA step on SmolLM2, measured). One 64-bit draw gives
four 16-bit uniforms, and a 16-bit threshold keeps the drop rate within 1/65536 of ``p``; the
kept values are scaled by the exact inverse of the realised keep probability, so the expected
output equals the input as with ``nn.Dropout``.
"""

from __future__ import annotations

import torch


class Int16Dropout(torch.nn.Module):
    """Drop each element with probability ``round(p * 65536) / 65536`` (training mode only)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.dropped = round(p * 65536)  # values below -32768 + dropped are zeroed
        self.scale = 65536 / (65536 - self.dropped)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropped == 0:
            return x
        if x.device.type != "cpu":  # GPU generators (Philox) are already fast
            return torch.nn.functional.dropout(x, self.p, training=True)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device)
        bits.random_(-(2**63), 2**63 - 1)
        uniform16 = bits.view(torch.int16)[:n].view(x.shape)
        return torch.where(uniform16 >= self.dropped - 32768, x * self.scale, 0)

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
