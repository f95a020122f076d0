"""Ulysses sequence parallelism: the ranks of a group each hold 1/N of every row's tokens.

Everything outside attention (embeddings, projections, MLPs, norms, the loss) works token by
token, so each rank runs it on its own slice of the positions. Attention needs whole sequences:
around it one all-to-all turns the sequence shards of all heads into whole sequences of 1/N of
the heads, and a second one turns the output back (DeepSpeed-Ulysses). Attention then runs on
the global row with the global sample boundaries, exactly as in one process, so samples never
see each other across a shard edge.

Every rank of a group holds the same batch (the sampler gives the group the same rows); the
loss of a row is the sum of its ranks' parts, which :meth:`SequenceParallel.reduce` adds up with
an identity backward: each rank back-propagates the group's loss through its own tokens, and the
gradient all-reduce over the world adds the ranks' parts into the row's gradient.

The collectives are ``all_to_all_single`` and ``all_reduce``, which gloo runs too (CPU tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from xtuner_lite.errors import XtunerError


@dataclass(frozen=True)
class SequenceParallel:
    """One rank's place in its sequence-parallel group of ``size`` consecutive ranks."""

    group: dist.ProcessGroup
    rank: int  # within the group
    size: int

    def shard(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's contiguous 1/N of ``dim`` (the positions of a (batch, width) tensor)."""
        length = tensor.shape[dim]
        if length % self.size:
            raise XtunerError(
                f"a row of {length} positions cannot be split over {self.size} sequence-"
                "parallel ranks; train.pad_to_multiple_of must be a multiple of "
                "train.sequence_parallel_size"
            )
        part = length // self.size
        return tensor.narrow(dim, self.rank * part, part)

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the group; backward passes the gradient through as is
        (each rank's part of a group-wide loss)."""
        return _SumOverGroup.apply(tensor, self)

    def owned(self, flat: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For positions ``flat`` of a (batch, width) row-major batch: which this rank holds,
        and where they are in its (batch, width / N) shard."""
        part = width // self.size
        row, column = flat // width, flat % width - self.rank * part
        mine = (column >= 0) & (column < part)
        return mine, (row * part + column)[mine]

    def sequence_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, heads, length / N, dim) → (batch, heads / N, length, dim)."""
        return _Exchange.apply(x, self, True)

    def heads_to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, heads / N, length, dim) → (batch, heads, length / N, dim)."""
        return _Exchange.apply(x, self, False)


def _all_to_all(chunks: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """Chunk j of dim 0 goes to rank j; the result's chunk j came from rank j."""
    chunks = chunks.contiguous()
    out = torch.empty_like(chunks)  # contiguous too (empty_like keeps a permuted layout)
    dist.all_to_all_single(out, chunks, group=sp.group)
    return out


def _to_heads(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    batch, heads, length, dim = x.shape
    chunks = x.reshape(batch, sp.size, heads // sp.size, length, dim).transpose(0, 1)
    received = _all_to_all(chunks, sp)  # (ranks, batch, heads / N, length / N, dim)
    return received.permute(1, 2, 0, 3, 4).reshape(batch, heads // sp.size, -1, dim)


def _to_sequence(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    batch, heads, length, dim = x.shape
    chunks = x.reshape(batch, heads, sp.size, length // sp.size, dim).permute(2, 0, 1, 3, 4)
    received = _all_to_all(chunks, sp)  # (ranks, batch, heads / N, length / N, dim)
    return received.transpose(0, 1).reshape(batch, heads * sp.size, -1, dim)


class _Exchange(torch.autograd.Function):
    """One all-to-all layout change; its gradient goes back through the inverse one."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sp: SequenceParallel, to_heads: bool) -> torch.Tensor:
        ctx.sp, ctx.to_heads = sp, to_heads
        return _to_heads(x, sp) if to_heads else _to_sequence(x, sp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = _to_sequence(grad, ctx.sp) if ctx.to_heads else _to_heads(grad, ctx.sp)
        return back, None, None


class _SumOverGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, group=sp.group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def spread_heads(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch, heads, length, dim) query, key and value whose head counts ``size`` divides.

    When it divides both the query and the key/value heads, nothing changes (a rank's query
    heads then share exactly its key/value heads). Otherwise the key/value heads are repeated
    to one per query head and all are zero-padded to a multiple of ``size``: a zero query,
    key and value head attends to zeros, and its output is cut off again."""
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads % size == 0 and kv_heads % size == 0:
        return query, key, value
    groups = heads // kv_heads
    key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    pad = -heads % size
    if pad:
        query, key, value = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (query, key, value))
    return query, key, value


# one setting for the process, as torch.distributed keeps its default group: every training
# forward reads it (the objectives' losses, the reference's log-probs, the cached reference pass)
_ACTIVE: SequenceParallel | None = None


def set_sequence_parallel(sp: SequenceParallel | None) -> None:
    """Make ``sp`` the group every training forward shards over (None: whole rows)."""
    global _ACTIVE
    _ACTIVE = sp


def active_sequence_parallel() -> SequenceParallel | None:
    return _ACTIVE


def replicas() -> int:
    """How many ranks hold each micro-batch (the sequence-parallel group's size)."""
    return 1 if _ACTIVE is None else _ACTIVE.size


def new_sequence_parallel(size: int) -> SequenceParallel:
    """Groups of ``size`` consecutive ranks (collective: every rank creates every group)."""
    started = dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if started else (0, 1)
    if world_size % size:
        raise XtunerError(
            f"train.sequence_parallel_size={size} must divide the number of processes "
            f"({world_size}): launch with NPROC_PER_NODE=N, N a multiple of it"
        )
    mine = None
    for start in range(0, world_size, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            mine = group
    return SequenceParallel(mine, rank % size, size)


__all__ = [
    "SequenceParallel",
    "active_sequence_parallel",
    "new_sequence_parallel",
    "replicas",
    "set_sequence_parallel",
    "spread_heads",
]
