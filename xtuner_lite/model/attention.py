"""Keep attention inside each packed sample.

With SDPA (the default) the model runs :data:`PACKED_SDPA`, transformers' SDPA plus one rule: a
training forward that passes ``segments`` attends sample by sample, with no mask to build. A row of
three samples then costs the three samples' attention, not the whole row's. On CPU a sample up to
:data:`MATMUL_ATTENTION_MAX_LENGTH` tokens attends with two batched matmuls in the compute dtype
(faster than SDPA's CPU kernels there), a longer one with SDPA in fp32; on GPU each sample runs
SDPA's causal kernel. Any other call (generation, evaluation) is plain SDPA. Eager attention gets an
additive block-diagonal mask built from ``cu_seqlens``; with FlashAttention the per-sample
``position_ids`` alone tell transformers' varlen kernel where samples start.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from xtuner_lite.errors import XtunerError

PACKED_SDPA = "xtuner_packed_sdpa"


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


def branch_mask(branch: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """(..., length, length) bool from (..., length) ids, True where a query may attend to a
    key, for positions laid out as branches (``branch_ids``/``root_ids`` of a batch): causal,
    and the key is in the query's own branch or in its root (the prompt the branches share)."""
    key = branch[..., None, :]
    allowed = (key == branch[..., :, None]) | (key == root[..., :, None])
    return allowed.tril()


def segments_of(cu_seqlens: torch.Tensor, batch: int, width: int) -> list[tuple[int, int, int]]:
    """(row, start, end) of every sample, in order; a row's unfilled tail is one more segment
    (what the block mask does with it too)."""
    cuts = {int(c) for c in cu_seqlens.tolist() if 0 < int(c) < batch * width}
    cuts |= {row * width for row in range(1, batch)}
    bounds = [0, *sorted(cuts), batch * width]
    return [
        (start // width, start % width, start % width + end - start)
        for start, end in zip(bounds, bounds[1:])
    ]


MATMUL_ATTENTION_MAX_LENGTH = 1024
# Sample lengths are padded up to a multiple of this for the matmul path. oneDNN builds and
# caches a kernel per matmul shape: with every sample length its own shape, a run's resident
# memory grows step after step until its cache fills.
ATTENTION_LENGTH_STEP = 32


@functools.lru_cache(maxsize=4)
def _causal_bias(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(size, size) additive causal mask. One per dtype and device, sliced for each sample:
    a mask cached per sample length would hold megabytes for every length seen."""
    blocked = torch.ones(size, size, dtype=torch.bool, device=device).triu(1)
    return torch.zeros(size, size, dtype=dtype, device=device).masked_fill(blocked, -torch.inf)


def _probabilities(
    query: torch.Tensor, key: torch.Tensor, scale: float, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T · scale + mask) for query heads stacked along the length; the mask is
    causal unless an additive (length, length) ``bias`` is given."""
    length = key.shape[1]
    groups = query.shape[1] // length
    size = max(length, MATMUL_ATTENTION_MAX_LENGTH)
    if bias is None:
        bias = _causal_bias(size, query.dtype, query.device)[:length, :length]
    # one copy of the mask per query head of a group: freed after the call (baddbmm keeps none)
    bias = bias.repeat(groups, 1)
    return torch.softmax(torch.baddbmm(bias, query, key.transpose(1, 2), alpha=scale), dim=-1)


class _MatmulAttention(torch.autograd.Function):
    """Causal attention that recomputes its probabilities in backward instead of saving them:
    they are a layer's largest activation (heads × length²), and recomputing them costs one
    more batched matmul and softmax."""

    @staticmethod
    def forward(
        ctx,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scale: float,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(query, key, value)
        ctx.scale, ctx.bias = scale, bias
        return torch.bmm(_probabilities(query, key, scale, bias), value)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        query, key, value = ctx.saved_tensors
        probs = _probabilities(query, key, ctx.scale, ctx.bias)
        grad_value = torch.bmm(probs.transpose(1, 2), grad)
        grad_scores = torch._softmax_backward_data(
            torch.bmm(grad, value.transpose(1, 2)), probs, -1, probs.dtype
        )
        del probs
        grad_query = torch.bmm(grad_scores, key).mul_(ctx.scale)
        grad_key = torch.bmm(grad_scores.transpose(1, 2), query).mul_(ctx.scale)
        return grad_query, grad_key, grad_value, None, None


def _padded_bias(mask: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """An additive (size, size) mask: ``mask`` (True: attend) on its first positions, causal
    beyond them (padded queries attend causally and are cut off; real ones never see padding,
    as ``mask`` is itself causal)."""
    bias = _causal_bias(max(size, MATMUL_ATTENTION_MAX_LENGTH), dtype, mask.device)[:size, :size]
    bias = bias.clone()
    length = mask.shape[0]
    bias[:length, :length] = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, -torch.inf
    )
    return bias


def matmul_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of one sample, (heads, length, dim) in the inputs' dtype, as two batched
    matmuls over the key/value heads: the query heads sharing a key/value head are stacked along
    the length, so grouped-query attention needs no repeated keys and values. On CPU at these
    sample lengths this beats SDPA's fp32 kernel (see docs/benchmarks.md).
    Backward recomputes the probabilities (see ``_MatmulAttention``). Saving them in layers
    that checkpointing recomputes anyway, where they live only until that layer's backward,
    gained little speed for a higher peak: not done. ``mask`` (length, length), True where a
    query may attend, replaces the causal mask (branches sharing a prompt)."""
    heads, length, dim = query.shape
    kv_heads = key.shape[0]
    scale = dim**-0.5 if scaling is None else scaling
    # zero padding at the end is exact: causal masking hides padded keys from real queries,
    # and the padded queries' rows are cut off (their gradient is zero)
    padded = -(-length // ATTENTION_LENGTH_STEP) * ATTENTION_LENGTH_STEP
    if padded != length:
        query, key, value = (F.pad(t, (0, 0, 0, padded - length)) for t in (query, key, value))
    bias = None if mask is None else _padded_bias(mask, padded, query.dtype)
    stacked = query.reshape(kv_heads, heads // kv_heads * padded, dim)
    out = _MatmulAttention.apply(stacked, key, value, scale, bias).view(heads, padded, dim)
    return out[:, :length]


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    segments: list[tuple[int, int, int]] | None = None,
    segment_masks: list[torch.Tensor | None] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: (batch, heads, length, dim) in, (batch, length, heads,
    dim) out. Without ``segments`` this is transformers' SDPA. ``segment_masks``: per segment
    a (length, length) bool mask replacing the causal one, or None (causal)."""
    if segments is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    cpu = query.device.type == "cpu"
    rows: list[list[torch.Tensor]] = [[] for _ in range(query.shape[0])]
    with torch.autocast(query.device.type, enabled=False):
        for i, (row, start, end) in enumerate(segments):
            q, k, v = (t[row, :, start:end] for t in (query, key, value))
            mask = segment_masks[i] if segment_masks else None
            if cpu and end - start <= MATMUL_ATTENTION_MAX_LENGTH and dropout == 0.0:
                # in the projections' dtype (rotary may have promoted q and k to fp32)
                q, k = q.to(v.dtype), k.to(v.dtype)
                rows[row].append(matmul_attention(q, k, v, scaling, mask)[None])
                continue
            # CPU: SDPA's fp32 backward kernel is faster than its bf16 one
            q, k, v = (t[None].to(torch.float32 if cpu else t.dtype) for t in (q, k, v))
            if groups > 1:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            rows[row].append(
                F.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    attn_mask=mask,
                    is_causal=mask is None,
                    scale=scaling,
                    dropout_p=dropout,
                )  # fmt: skip
            )
    out = torch.cat([torch.cat(parts, dim=2) for parts in rows], dim=0)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def register_packed_sdpa() -> None:
    """Make :data:`PACKED_SDPA` a transformers attention implementation (masks as SDPA's)."""

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)


def attention_kwargs(batch: dict[str, torch.Tensor], attn_implementation: str) -> dict:
    """Model-call kwargs that keep attention within samples for the given implementation."""
    input_ids = batch["input_ids"]
    kwargs = {"position_ids": batch["position_ids"]}
    branches = batch.get("branch_ids")
    if "flash" in attn_implementation:
        if branches is not None:
            raise XtunerError(
                f"batches whose sequences share a prompt need sdpa or eager attention, "
                f"not {attn_implementation}"
            )
        return kwargs
    if attn_implementation == PACKED_SDPA:
        kwargs["segments"] = segments_of(batch["cu_seqlens"], *input_ids.shape)
        if branches is not None:
            roots = batch["root_ids"]
            kwargs["segment_masks"] = [
                None
                if bool((branches[row, start:end] == roots[row, start:end]).all())
                else branch_mask(branches[row, start:end], roots[row, start:end])
                for row, start, end in kwargs["segments"]
            ]
        return kwargs
    mask = block_causal_mask(batch["cu_seqlens"], *input_ids.shape)
    if branches is not None:
        mask = mask & branch_mask(branches, batch["root_ids"])[:, None]
    if attn_implementation == "eager":
        blocked = torch.finfo(torch.float32).min
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, blocked)
    kwargs["attention_mask"] = mask
    return kwargs
