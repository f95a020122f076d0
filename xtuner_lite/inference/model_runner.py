"""The batch on the model: prefill new rows, decode one token for every row, keep the cache.

Rows are kept left-aligned with an attention mask and per-row positions, exactly as
``generate`` pads, so greedy output is the same tokens. Keys and values live in a ``KVCache``
written in place; Llama-family models decode through ``FastDecoder`` (others through their
own forward).
"""

from __future__ import annotations

import os
from collections import Counter

import torch

from xtuner_lite.data.images import images_digest, join_images
from xtuner_lite.inference.block_manager import BLOCK_SIZE, Block, BlockManager, gather
from xtuner_lite.inference.decoder import FastDecoder, unsupported_reason
from xtuner_lite.inference.kv_cache import GROW, KVCache, first_used_column
from xtuner_lite.inference.shared_prefix import (
    SHARE_MIN_COLUMNS,
    SharedPrefixes,
    stack_rows,
    worth_sharing,
)
from xtuner_lite.model.forward import base_and_head
from xtuner_lite.model.vlm import model_image_inputs, offset_positions, prompt_positions


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Pad a (rows, columns) ``t`` with zeros on the left up to ``width`` columns."""
    missing = width - t.shape[1]
    return torch.cat([t.new_zeros(t.shape[0], missing), t], dim=1) if missing > 0 else t


def _kv_layout(model: torch.nn.Module) -> tuple[tuple[int, int, int], torch.dtype]:
    """((kv heads, head dim, layers), dtype) of the model's keys and values."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    # the first floating-point weight, the embedding in transformers' order: keys and values
    # come out in it (a quantized model's packed weights are integers)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    return (kv_heads, head_dim, config.num_hidden_layers), dtype


class ModelRunner:
    """Holds the running batch's cache, mask and next input tokens; returns last-position
    logits, one row per request, in the scheduler's row order."""

    def __init__(
        self,
        model: torch.nn.Module,
        share_prefix: int = 64,
        pack_weights: bool | None = None,
        merge_adapters: bool = False,
        prefix_cache: int = 0,
        share_kv: int = SHARE_MIN_COLUMNS,
    ):
        """``prefix_cache``: bytes of memory for cached prefix blocks (0: no prefix cache).
        ``share_kv``: a prompt admitted several times at once is held once and attended by
        all its rows (``inference/shared_prefix.py``) when the columns this saves reach this
        many (0: never)."""
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.share_prefix = share_prefix
        # None when FastDecoder runs this model (Llama family), else why it cannot
        self.fallback_reason = unsupported_reason(model)
        self.decoder = (
            FastDecoder(model, pack=pack_weights, merge_adapters=merge_adapters)
            if self.fallback_reason is None
            else None
        )
        # (decoder, output head) where the logits are the head's output (Llama family)
        self.head = base_and_head(model) if self.fallback_reason is None else None
        self.blocks = BlockManager(prefix_cache) if prefix_cache > 0 else None
        self._kv_shape, self._kv_dtype = _kv_layout(model)
        self.share_kv = share_kv
        self.cache: KVCache | None = None
        self.shared: SharedPrefixes | None = None  # prompts rows continue, held once
        self._mask: torch.Tensor | None = None  # (batch, cached length), 1 = real token
        self._next: torch.Tensor | None = None  # (batch,) token each row feeds next
        # Qwen2-VL's rotary positions follow its images' patch grids: each row's later tokens
        # run ``_delta`` from their count (``vlm.prompt_positions``); None for other models
        self._delta: torch.Tensor | None = None  # (batch,)

    def reset(self) -> None:
        """An empty batch (after a failed step)."""
        self.cache = self._mask = self._next = self.shared = self._delta = None
        if self.blocks is not None:
            self.blocks.clear()

    # ----------------------------------------------------------------- one step
    def decode(self) -> torch.Tensor:
        """Feed every row its next token; (rows, vocab) logits."""
        ones = self._mask.new_ones(self._mask.shape[0], 1)
        self._mask = torch.cat([self._mask, ones], dim=1)
        self.cache.reserve(1)
        if self.decoder is not None:
            positions = self._mask.sum(-1) - 1
            if self.shared is not None:
                positions = positions + self.shared.row_lengths()
            return self.decoder(self._next, positions, self._mask, self.cache, self.shared)
        positions = offset_positions(self._mask.sum(-1, keepdim=True) - 1, self._delta)
        cache = self.cache.as_transformers_cache()
        logits = self._forward(self._next[:, None], self._mask, cache, positions)
        self.cache.advance(1)
        return logits

    def prefill(
        self, prompts: list[list[int]], images: list[dict[str, torch.Tensor] | None] | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """Run new prompts (one batched, left-padded prefill) and append them as rows at the
        end of the batch: ((new rows, vocab) logits for their first tokens, each prompt's
        tokens found in the prefix cache). Cached leading blocks are copied, not recomputed; a
        prompt given several times (a GRPO group's completions) is run once and its rows
        copied (or held once, when that pays: ``share_kv``); a prefix that the prompts admitted
        together share is run once first. ``images``: each prompt's image inputs (or None);
        a prompt with images is cached under its images' digest (``cache_key``)."""
        images = images or [None] * len(prompts)
        keys = [(tuple(p), images_digest(i)) for p, i in zip(prompts, images)]
        first: dict[tuple, int] = {}  # each distinct prompt's first row, in row order
        for n, key in enumerate(keys):
            first.setdefault(key, n)
        unique = [list(k[0]) for k in first]
        pixels = [images[n] for n in first.values()]
        found = {k: self._cached_blocks(list(k[0]), images[n]) for k, n in first.items()}
        if all(p is None for p in pixels):
            self._share_leading_blocks(unique)
        filled, mask, logits, delta = self._prefill_unique(unique, pixels)
        where = {k: i for i, k in enumerate(first)}
        of = [where[k] for k in keys]  # each row's prompt among the unique ones
        shared = None
        if len(unique) < len(prompts):  # a prompt given several times: held once, or copied
            counts = [n for _, n in sorted(Counter(of).items())]
            rows = torch.tensor(of, device=self.device)
            lengths = [len(p) for p in unique]
            if self.decoder is not None and worth_sharing(lengths, counts, self.share_kv):
                filled, mask, shared = self._hold_once(filled, mask, of, counts)
            else:
                filled.select(rows, 0)
                mask = mask[rows]
            logits = logits[rows]
            delta = None if delta is None else delta[rows]
        self._splice(filled, mask, shared, delta)
        return logits, [found[k] * BLOCK_SIZE for k in keys]

    def cache_key(self, tokens: list[int], images: dict[str, torch.Tensor] | None) -> list:
        """What a sequence's blocks are cached under: its tokens, with the first image token
        (if any) paired with the digest of the images, so that a block from there on is found
        only after the same images (and, for Qwen2-VL, at the same rotary positions)."""
        if images is None:
            return tokens
        token = self.model.config.image_token_id
        at = tokens.index(token)
        return [*tokens[:at], (token, images_digest(images)), *tokens[at + 1 :]]

    def _reusable(self, prompt: list[int], images: dict | None, blocks: int) -> int:
        """How many of ``blocks`` cached leading blocks a prompt can start from: with images,
        not so many that an image's tokens are cut (its features come whole or not at all)."""
        if images is None:
            return blocks
        token = self.model.config.image_token_id
        at = [i for i, t in enumerate(prompt) if t == token]
        return blocks if blocks * BLOCK_SIZE > at[-1] else min(blocks, at[0] // BLOCK_SIZE)

    def remember(self, rows: list[int], tokens: list[list]) -> None:
        """Cache the full blocks of rows ``rows`` (requests about to leave the batch), whose
        fed tokens are the leading ones of ``tokens`` (prompt and output, as ``cache_key``
        gives them): a conversation's next turn, or an agent's next round, starts from
        them."""
        if self.blocks is None or self._mask is None:
            return
        for row, ids in zip(rows, tokens):
            columns = self._mask[row].nonzero()[:, 0]
            held = None if self.shared is None else self.shared.row_kv(row)
            before = 0 if held is None else held.shape[3]  # the prompt, held once
            ids = ids[: before + len(columns)]
            first = self.blocks.first_missing(ids)
            end = len(ids) // BLOCK_SIZE * BLOCK_SIZE
            if first * BLOCK_SIZE >= end:
                continue
            if held is None:  # only the columns of the blocks to store
                kv = self._kv(self.cache, row, columns[first * BLOCK_SIZE : end])
            else:
                kv = torch.cat([held, self._kv(self.cache, row, columns)], dim=3)
                kv = kv[:, :, :, first * BLOCK_SIZE : end]
            self.blocks.store(ids, first, kv)

    def _cached_blocks(self, prompt: list[int], images: dict | None = None) -> int:
        """How many leading full blocks of ``prompt`` the cache holds that it can start from
        (the last token is always run: its logits give the first new token)."""
        if self.blocks is None:
            return 0
        found = self.blocks.first_missing(self.cache_key(prompt, images)[: len(prompt) - 1])
        return self._reusable(prompt, images, found)

    def _share_leading_blocks(self, prompts: list[list[int]]) -> None:
        """Prompts admitted together that share at least ``share_prefix`` leading tokens
        (few-shot exemplars, a system prompt) beyond what is cached: run that prefix once, as
        one row, and cache it, so each prompt then finds it."""
        if self.blocks is None or not self.share_prefix or len(prompts) < 2:
            return
        # os.path.commonprefix compares any sequences element-wise, token lists included
        common = len(os.path.commonprefix(prompts))
        shared = min(common, min(len(p) for p in prompts) - 1) // BLOCK_SIZE * BLOCK_SIZE
        prefix = prompts[0][:shared]
        if shared >= self.share_prefix and self.blocks.first_missing(prefix) * BLOCK_SIZE < shared:
            # one token more: the prefix's last block is then full and cached like the others
            self._prefill_unique([prompts[0][: shared + 1]])

    def _prefill_unique(
        self, prompts: list[list[int]], images: list[dict[str, torch.Tensor] | None] | None = None
    ) -> tuple[KVCache, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(the prompts' cache, their attention mask, their last-position logits, their rotary
        offsets (None: not a Qwen2-VL)); each row is [padding][cached blocks][padding][own
        tokens], and its full blocks are cached (under ``cache_key``)."""
        images = images or [None] * len(prompts)
        keys = [self.cache_key(p, i) if self.blocks is not None else None
                for p, i in zip(prompts, images)]  # fmt: skip
        found = [
            self.blocks.match(k, self._reusable(p, i, (len(p) - 1) // BLOCK_SIZE)) if k else []
            for p, i, k in zip(prompts, images, keys)
        ]
        cached = [len(f) * BLOCK_SIZE for f in found]
        # a prompt whose images' tokens are all cached (``_reusable``: all or none) runs none
        token = getattr(self.model.config, "image_token_id", None)
        run = [
            None if i is not None and c > p.index(token) else i
            for p, i, c in zip(prompts, images, cached)
        ]
        width = max(len(p) - c for p, c in zip(prompts, cached))
        start = max(cached)
        cache = self._cache_of(found, start, room=width)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), start + width, dtype=torch.long)
        for i, (prompt, c) in enumerate(zip(prompts, cached)):
            own = prompt[c:]
            ids[i, width - len(own) :] = torch.tensor(own)
            mask[i, start - c : start] = 1
            mask[i, start + width - len(own) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        before = [p[:c] for p, c in zip(prompts, cached)]
        positions, delta = prompt_positions(self.model, ids, mask, images, before)
        given = join_images([i for i in run if i is not None])
        inputs = {k: v.to(self.device) for k, v in given.items()}
        logits = self._forward(ids, mask, cache.as_transformers_cache(), positions, inputs)
        cache.advance(width)
        if self.blocks is not None:
            for i, (prompt, c) in enumerate(zip(prompts, cached)):
                end = len(prompt) // BLOCK_SIZE * BLOCK_SIZE
                if c < end:
                    own_start = start + width - (len(prompt) - c)
                    columns = torch.arange(own_start, own_start + end - c, device=self.device)
                    self.blocks.store(keys[i], c // BLOCK_SIZE, self._kv(cache, i, columns))
        return cache, mask, logits, delta

    def _hold_once(
        self, filled: KVCache, mask: torch.Tensor, of: list[int], counts: list[int]
    ) -> tuple[KVCache, torch.Tensor, SharedPrefixes]:
        """Rows for prompts ``of`` (indices into ``filled``'s rows): the repeated prompts'
        keys and values held once, their rows' own cache empty; the others copied as usual."""
        repeated = [i for i, c in enumerate(counts) if c > 1]
        index = torch.tensor(repeated, device=self.device)
        held_mask = mask[index]
        first = first_used_column(held_mask)
        end = filled.length
        prompt_of = {u: j for j, u in enumerate(repeated)}
        owner = torch.tensor([prompt_of.get(u, -1) for u in of], device=self.device)
        shared = SharedPrefixes(
            [k[index][:, :, first:end] for k in filled.keys],
            [v[index][:, :, first:end] for v in filled.values],
            held_mask[:, first:],
            owner,
        )
        if all(counts[u] > 1 for u in of):  # every row continues a held prompt: empty own caches
            return self._cache_of([[] for _ in of], 0, GROW), mask.new_zeros(len(of), 0), shared
        rows = torch.tensor(of, device=self.device)
        mask = mask[rows] * (owner < 0)[:, None]  # a held prompt's row has no columns here
        keep = first_used_column(mask)
        filled.select(rows, keep)
        return filled, mask[:, keep:], shared

    def _cache_of(self, found: list[list[Block]], start: int, room: int) -> KVCache:
        """A cache of ``start`` columns per row holding each row's cached blocks at its end
        (left-padded), with ``room`` free columns."""
        kv_heads, head_dim, layers = self._kv_shape
        rows = len(found)
        keys = [torch.zeros(rows, kv_heads, start + room, head_dim, dtype=self._kv_dtype,
                            device=self.device) for _ in range(layers)]  # fmt: skip
        values = [torch.zeros_like(k) for k in keys]
        for i, blocks in enumerate(found):
            if blocks:
                kv = gather(blocks)
                for layer, (k, v) in enumerate(zip(keys, values)):
                    k[i, :, start - kv.shape[3] : start] = kv[layer, 0]
                    v[i, :, start - kv.shape[3] : start] = kv[layer, 1]
        return KVCache(keys, values, start)

    @staticmethod
    def _kv(cache: KVCache, row: int, columns: torch.Tensor) -> torch.Tensor:
        """Row ``row``'s keys and values at ``columns``: (layers, 2, kv heads, columns, dim)."""
        return torch.stack(
            [
                torch.stack([k[row].index_select(1, columns), v[row].index_select(1, columns)])
                for k, v in zip(cache.keys, cache.values)
            ]
        )

    def feed(self, tokens: torch.Tensor, first_row: int = 0) -> None:
        """The tokens rows ``first_row``.. feed at the next decode (the ones just chosen)."""
        self._next[first_row:] = tokens

    def select(self, keep: list[int] | None) -> None:
        """Keep only rows ``keep`` (None: none) and drop the all-padding columns they leave."""
        if keep is None:
            self.cache = self._mask = self._next = self.shared = self._delta = None
            return
        if self._mask is None or len(keep) == self._mask.shape[0]:
            return
        index = torch.tensor(keep, device=self.device)
        self._mask = self._mask[index]
        # (a row continuing a held prompt has no column here until its first decode)
        first = first_used_column(self._mask)
        self._mask = self._mask[:, first:]
        self.cache.select(index, first)
        self._next = self._next[index]
        if self._delta is not None:
            self._delta = self._delta[index]
        if self.shared is not None:
            self.shared = self.shared.select(index)

    # ----------------------------------------------------------------- internals
    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        cache,
        positions: torch.Tensor,
        images: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Last-position logits; ``images``: the inputs of the rows' images, in the order of
        their image tokens (an image-text model puts their features there)."""
        inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions,
                      past_key_values=cache, use_cache=True)  # fmt: skip
        for key, value in model_image_inputs(self.model.config, images or {}).items():
            inputs[key] = value.to(self._kv_dtype) if value.is_floating_point() else value
        if self.head is None:
            return self.model(**inputs, logits_to_keep=1).logits[:, -1].float()
        # the last position taken as a 2-D (rows, hidden) slice before the head: the model's
        # own (rows, 1, hidden) slice is not contiguous, and a bf16 F.linear of such an input
        # expands the head's weight once per row on CPU
        decoder, head = self.head
        return head(decoder(**inputs).last_hidden_state[:, -1]).float()

    def _splice(
        self,
        cache: KVCache,
        mask: torch.Tensor,
        shared: SharedPrefixes | None,
        delta: torch.Tensor | None = None,
    ) -> None:
        """Append freshly prefilled rows to the batch, left-padding the shorter side; their
        next tokens are set by ``feed``."""
        placeholder = torch.zeros(mask.shape[0], dtype=torch.long, device=self.device)
        if self.cache is None:
            self.cache, self._mask, self._next, self.shared = cache, mask, placeholder, shared
            self._delta = delta
            return
        self.shared = stack_rows(self.shared, self._mask.shape[0], shared, mask.shape[0])
        width = max(self._mask.shape[1], mask.shape[1])
        self.cache.extend(cache)
        self._mask = torch.cat([_left_pad(self._mask, width), _left_pad(mask, width)])
        self._next = torch.cat([self._next, placeholder])
        if delta is not None:
            self._delta = torch.cat([self._delta, delta])


__all__ = ["ModelRunner"]
