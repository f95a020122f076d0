"""Keep attention inside each packed sample.

On CPU (SDPA, eager) a block-diagonal causal mask built from ``cu_seqlens`` is passed as a 4D
attention mask (boolean for SDPA; additive for eager, which adds the mask to the scores as is);
with FlashAttention the per-sample ``position_ids`` alone tell transformers'
varlen kernel where samples start, so no L×L mask is ever built.
"""

from __future__ import annotations

import torch


def segment_ids(cu_seqlens: torch.Tensor, batch: int, width: int) -> torch.Tensor:
    """(batch, width) sample index of every position; boundaries come from flat cu_seqlens."""
    positions = torch.arange(batch * width, device=cu_seqlens.device)
    ids = torch.searchsorted(cu_seqlens.to(torch.long), positions, right=True)
    return ids.view(batch, width)


def block_causal_mask(cu_seqlens: torch.Tensor, batch: int, width: int) -> torch.Tensor:
    """(batch, 1, width, width) bool mask: True where query may attend to key."""
    seg = segment_ids(cu_seqlens, batch, width)
    same = seg[:, :, None] == seg[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool, device=seg.device).tril()
    return (same & causal)[:, None]


def attention_kwargs(batch: dict[str, torch.Tensor], attn_implementation: str) -> dict:
    """Model-call kwargs that keep attention within samples for the given implementation."""
    input_ids = batch["input_ids"]
    kwargs = {"position_ids": batch["position_ids"]}
    if "flash" in attn_implementation:
        return kwargs
    mask = block_causal_mask(batch["cu_seqlens"], *input_ids.shape)
    if attn_implementation == "eager":
        blocked = torch.finfo(torch.float32).min
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, blocked)
    kwargs["attention_mask"] = mask
    return kwargs
