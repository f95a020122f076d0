"""Prefix caching across requests: keys/values of full token blocks, found by a hash chain.

A block is ``BLOCK_SIZE`` prompt (or generated) tokens; its key is the hash of its tokens and
of the previous block's key (nano-vllm's and vLLM's automatic prefix caching), so a block is
found only after the same whole prefix, and a lookup walks the chain from the first block. We
chose the hash chain over SGLang's radix tree because a block-granular dictionary is all the
lookup a dense batch needs (match, then copy), with no tree to rebalance on eviction.

Why copy blocks into the batch instead of reading them in place (vLLM's block tables): the
decode step attends over a dense (rows, kv heads, columns, head dim) cache, where the CPU's
fused attention kernel applies; gathering blocks at every step would cost more than copying
them once when a request is admitted. So a block is in use only while it is copied, and
nothing running holds a reference to it: eviction (least recently used first) can never take
a block from under a request.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

BLOCK_SIZE = 16  # tokens per block: a prefix is reused up to its last full block


@dataclass
class Block:
    tokens: tuple[int, ...]  # checked on every hit: a hash collision is never a false match
    kv: torch.Tensor  # (layers, 2, kv heads, BLOCK_SIZE, head dim): keys [.., 0], values [.., 1]


def block_tokens(tokens: list[int], j: int) -> tuple[int, ...]:
    """The tokens of block ``j``."""
    return tuple(tokens[j * BLOCK_SIZE : (j + 1) * BLOCK_SIZE])


def chain_hashes(tokens: list[int], blocks: int) -> list[int]:
    """The hash of each of the first ``blocks`` full blocks, each chained to the one before."""
    hashes, previous = [], 0
    for j in range(blocks):
        previous = hash((previous, block_tokens(tokens, j)))
        hashes.append(previous)
    return hashes


class BlockManager:
    """Cached blocks in at most ``max_bytes`` of memory, evicted least recently used first."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.max_blocks: int | None = None  # known from the first block's size
        self.blocks: OrderedDict[int, Block] = OrderedDict()  # oldest use first

    def match(self, tokens: list[int], limit: int) -> list[Block]:
        """The cached leading blocks of ``tokens``, at most ``limit`` of them, marked used."""
        found = self._leading(tokens, limit)
        self._touch([key for key, _ in found])
        return [block for _, block in found]

    def first_missing(self, tokens: list[int]) -> int:
        """The index of the first full block of ``tokens`` not cached (the count of full blocks
        when all are)."""
        return len(self._leading(tokens, len(tokens) // BLOCK_SIZE))

    def _leading(self, tokens: list[int], limit: int) -> list[tuple[int, Block]]:
        """(key, block) of the cached leading blocks of ``tokens``, at most ``limit``."""
        found = []
        for j, key in enumerate(chain_hashes(tokens, limit)):
            block = self._get(key, tokens, j)
            if block is None:
                break
            found.append((key, block))
        return found

    def _get(self, key: int, tokens: list[int], j: int) -> Block | None:
        """Block ``j`` of ``tokens`` under ``key``, if cached (a collision is not)."""
        block = self.blocks.get(key)
        return block if block is not None and block.tokens == block_tokens(tokens, j) else None

    def store(self, tokens: list[int], first: int, kv: torch.Tensor) -> None:
        """Cache blocks ``first``.. of ``tokens`` from ``kv`` (layers, 2, kv heads, columns,
        head dim), which holds those blocks' tokens from its column 0; evicts the least
        recently used blocks beyond the budget."""
        keys = chain_hashes(tokens, first + kv.shape[3] // BLOCK_SIZE)[first:]
        if not keys:
            return
        for i, key in enumerate(keys):
            if self._get(key, tokens, first + i) is None:  # (a collision is replaced)
                columns = kv[:, :, :, i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]
                self.blocks[key] = Block(block_tokens(tokens, first + i), columns.clone())
        self._touch(keys)
        if self.max_blocks is None:
            self.max_blocks = self.max_bytes // (kv[:, :, :, :BLOCK_SIZE].nbytes or 1)
        while len(self.blocks) > self.max_blocks:
            self.blocks.popitem(last=False)

    def _touch(self, keys: list[int]) -> None:
        """Mark a chain used, its first block most recently: a chain is evicted from its end,
        so what remains of it is still a reachable prefix."""
        for key in reversed(keys):
            if key in self.blocks:
                self.blocks.move_to_end(key)

    def clear(self) -> None:
        self.blocks.clear()

    @property
    def nbytes(self) -> int:
        return sum(b.kv.nbytes for b in self.blocks.values())


def gather(blocks: list[Block]) -> torch.Tensor:
    """Blocks laid end to end: (layers, 2, kv heads, len(blocks) · BLOCK_SIZE, head dim)."""
    return torch.cat([b.kv for b in blocks], dim=3)


__all__ = ["BLOCK_SIZE", "Block", "BlockManager", "block_tokens", "chain_hashes", "gather"]
