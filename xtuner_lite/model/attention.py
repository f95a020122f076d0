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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from xtuner_lite.errors import XtunerError
from xtuner_lite.model.sequence_parallel import SequenceParallel, spread_heads

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


@dataclass(frozen=True)
class Branches:
    """One segment laid out as branches sharing a root: the root's ``root`` positions first
    (causal among themselves), then each branch, ``spans`` (start, end) within the segment,
    which attends causally to itself and to the whole root."""

    root: int
    spans: tuple[tuple[int, int], ...]

    @property
    def longest(self) -> int:
        return max(end - start for start, end in self.spans)

    def mask(self, device: torch.device) -> torch.Tensor:
        """The (length, length) bool mask of :func:`branch_mask` for this layout."""
        branch = torch.zeros(self.spans[-1][1], dtype=torch.long, device=device)
        for index, (start, end) in enumerate(self.spans, start=1):
            branch[start:end] = index
        return branch_mask(branch, torch.zeros_like(branch))


def branches_of(branch: torch.Tensor, root: torch.Tensor) -> Branches | None:
    """The layout of one segment from its (length,) ``branch_ids``/``root_ids``, or None for a
    plain causal sequence (every position its own root)."""
    if bool((branch == root).all()):
        return None
    values, counts = torch.unique_consecutive(branch, return_counts=True)
    ends = counts.cumsum(0).tolist()
    shared = int(values[0]) == int(root[0])
    starts = [0, *ends[:-1]]
    spans = tuple(zip(starts, ends))[1 if shared else 0 :]
    names = values.tolist()[1 if shared else 0 :]
    if not bool((root == root[0]).all()) or len(set(names)) != len(names) or int(root[0]) in names:
        raise ValueError("a segment's branches must follow one root, each branch contiguous")
    return Branches(ends[0] if shared else 0, spans)


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
    causal unless an additive (query length, key length) ``bias`` is given."""
    if bias is None:
        length = key.shape[1]
        size = max(length, MATMUL_ATTENTION_MAX_LENGTH)
        bias = _causal_bias(size, query.dtype, query.device)[:length, :length]
    groups = query.shape[1] // bias.shape[0]
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


def matmul_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
    prefix: int = 0,
) -> torch.Tensor:
    """Causal attention of one sample, (heads, length, dim) in the inputs' dtype, as two batched
    matmuls over the key/value heads: the query heads sharing a key/value head are stacked along
    the length, so grouped-query attention needs no repeated keys and values. On CPU at these
    sample lengths this beats SDPA's fp32 kernel (see docs/benchmarks.md).
    ``prefix``: the first keys and values have no queries here; every query sees all of them
    (a branch's shared prompt), then its own sequence causally.
    Backward recomputes the probabilities (see ``_MatmulAttention``). Saving them in layers
    that checkpointing recomputes anyway, where they live only until that layer's backward,
    gained little speed for a higher peak: not done."""
    heads, length, dim = query.shape
    kv_heads = key.shape[0]
    scale = dim**-0.5 if scaling is None else scaling
    # zero padding at the end is exact: causal masking hides padded keys from real queries,
    # and the padded queries' rows are cut off (their gradient is zero)
    padded = -(-length // ATTENTION_LENGTH_STEP) * ATTENTION_LENGTH_STEP
    if padded != length:
        query, key, value = (F.pad(t, (0, 0, 0, padded - length)) for t in (query, key, value))
    bias = None
    if prefix:
        causal = _causal_bias(max(padded, MATMUL_ATTENTION_MAX_LENGTH), query.dtype, query.device)
        bias = F.pad(causal[:padded, :padded], (prefix, 0))  # every prefix key visible
    stacked = query.reshape(kv_heads, heads // kv_heads * padded, dim)
    out = _MatmulAttention.apply(stacked, key, value, scale, bias).view(heads, padded, dim)
    return out[:, :length]


def branched_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
    layout: Branches,
) -> torch.Tensor:
    """:func:`matmul_attention` of one segment laid out as ``layout``: the root causally, then
    each branch against [root keys, its own keys]. A dense mask over the segment would compute
    (and discard) every branch's scores against every other branch; one batch of all branches
    gathered by index, each padded to the longest, cost more than this loop (gathers, scatters
    and padding) for pairs and for groups of eight alike (docs/benchmarks.md)."""
    root = layout.root
    parts = []
    if root:
        parts.append(matmul_attention(query[:, :root], key[:, :root], value[:, :root], scaling))
    for start, end in layout.spans:
        k, v = (torch.cat([t[:, :root], t[:, start:end]], dim=1) for t in (key, value))
        parts.append(matmul_attention(query[:, start:end], k, v, scaling, prefix=root))
    return torch.cat(parts, dim=1)


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    segments: list[tuple[int, int, int]] | None = None,
    segment_branches: list[Branches | None] | None = None,
    sequence_parallel: SequenceParallel | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: (batch, heads, length, dim) in, (batch, length, heads,
    dim) out. Without ``segments`` this is transformers' SDPA. ``segment_branches``: per
    segment its branch layout, or None (causal). ``sequence_parallel``: the inputs hold this
    rank's shard of the positions; the segments are the global row's. A module that is not
    causal (an image-text model's vision encoder, which the decoder's kwargs reach too) is
    not one of the segments' decoder layers: it runs transformers' SDPA."""
    if not getattr(module, "is_causal", True):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if sequence_parallel is not None:
        return _ulysses(
            module, query, key, value, scaling, dropout, segments, segment_branches,
            sequence_parallel,
        )  # fmt: skip
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
            layout = segment_branches[i] if segment_branches else None
            span = end - start if layout is None else layout.root + layout.longest
            if cpu and span <= MATMUL_ATTENTION_MAX_LENGTH and dropout == 0.0:
                # in the projections' dtype (rotary may have promoted q and k to fp32)
                q, k = q.to(v.dtype), k.to(v.dtype)
                if layout is None:
                    rows[row].append(matmul_attention(q, k, v, scaling)[None])
                else:
                    rows[row].append(branched_attention(q, k, v, scaling, layout)[None])
                continue
            # CPU: SDPA's fp32 backward kernel is faster than its bf16 one
            q, k, v = (t[None].to(torch.float32 if cpu else t.dtype) for t in (q, k, v))
            if groups > 1:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            mask = None if layout is None else layout.mask(q.device)
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


def _ulysses(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
    dropout: float,
    segments: list[tuple[int, int, int]] | None,
    segment_branches: list[Branches | None] | None,
    sp: SequenceParallel,
) -> tuple[torch.Tensor, None]:
    """Packed attention of whole rows over 1/N of the heads, between two all-to-alls."""
    heads = query.shape[1]
    query, key, value = (sp.sequence_to_heads(t) for t in spread_heads(query, key, value, sp.size))
    out, _ = packed_sdpa_attention(
        module, query, key, value, None, scaling, dropout, segments, segment_branches
    )
    out = sp.heads_to_sequence(out.transpose(1, 2))[:, :heads]  # padded heads cut off
    return out.transpose(1, 2).contiguous(), None


def register_packed_sdpa() -> None:
    """Make :data:`PACKED_SDPA` a transformers attention implementation (masks as SDPA's)."""

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)


def can_branch(model: torch.nn.Module) -> bool:
    """Whether ``model``'s attention runs batches whose sequences share a prompt
    (``branch_ids``): FlashAttention's varlen kernels cannot."""
    config = getattr(model, "config", None)
    return "flash" not in (getattr(config, "_attn_implementation", None) or "sdpa")


def runs_segments(model: torch.nn.Module) -> bool:
    """Whether ``model``'s training forward attends segment by segment (:data:`PACKED_SDPA`):
    then a batch's rows joined into one row cost no more attention, and no padding."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == PACKED_SDPA


def check_sequence_parallel_attention(attn_implementation: str | None) -> None:
    """Sequence parallelism runs our packed attention on whole rows: refuse any other."""
    if attn_implementation != PACKED_SDPA:
        raise XtunerError(
            "train.sequence_parallel_size > 1 needs model.attn_implementation='sdpa' "
            f"(attention packed sample by sample), not {attn_implementation!r}"
        )


def attention_kwargs(
    batch: dict[str, torch.Tensor],
    attn_implementation: str,
    sequence_parallel: SequenceParallel | None = None,
) -> dict:
    """Model-call kwargs that keep attention within samples for the given implementation;
    with ``sequence_parallel`` for this rank's shard of the positions."""
    input_ids = batch["input_ids"]
    kwargs = {"position_ids": batch["position_ids"]}
    if sequence_parallel is not None:
        check_sequence_parallel_attention(attn_implementation)
        kwargs["position_ids"] = sequence_parallel.shard(batch["position_ids"])
        kwargs["sequence_parallel"] = sequence_parallel
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
            kwargs["segment_branches"] = [
                branches_of(branches[row, start:end], roots[row, start:end])
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
