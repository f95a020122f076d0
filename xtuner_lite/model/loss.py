"""Causal-LM loss computed in chunks, summed over trained tokens (normalized by the caller).

Full-vocabulary fp32 logits of a long row are the largest tensor of a QLoRA step (4096 tokens ×
128k vocabulary × 4 bytes = 2 GiB); each chunk's logits are recomputed in backward instead of kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from xtuner_lite.data.tokenize import IGNORE_INDEX


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Label of position t is the token at t+1; the last position predicts nothing."""
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def chunked_lm_loss(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor,
                    chunk_size: int = 1024) -> tuple[torch.Tensor, int]:
    """Sum of token losses over trained positions and their count.

    ``hidden`` is (batch, seq, dim) before the head, ``labels`` unshifted (batch, seq).
    Only positions with a label are projected, so prompt tokens cost nothing here.
    """
    targets = shift_labels(labels).reshape(-1)
    keep = targets != IGNORE_INDEX
    count = int(keep.sum())
    if count == 0:
        return hidden.sum() * 0.0, 0
    hidden = hidden.reshape(-1, hidden.shape[-1])[keep]
    targets = targets[keep]
    weight, bias = head.weight, getattr(head, "bias", None)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, count, chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, h, weight, bias, t, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, weight, bias, t)
    return total, count
