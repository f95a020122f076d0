"""The batch on the model: prefill new rows, decode one token for every row, keep the cache.

Rows are kept left-aligned with an attention mask and per-row positions, exactly as
``generate`` pads, so greedy output is the same tokens. Keys and values live in a ``KVCache``
written in place; Llama-family models decode through ``FastDecoder`` (others through their
own forward).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import DynamicCache

from xtuner_lite.inference.decoder import FastDecoder, unsupported_reason
from xtuner_lite.inference.kv_cache import KVCache
from xtuner_lite.model.forward import base_and_head


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Pad a (rows, columns) ``t`` with zeros on the left up to ``width`` columns."""
    missing = width - t.shape[1]
    return torch.cat([t.new_zeros(t.shape[0], missing), t], dim=1) if missing > 0 else t


class ModelRunner:
    """Holds the running batch's cache, mask and next input tokens; returns last-position
    logits, one row per request, in the scheduler's row order."""

    def __init__(
        self,
        model: torch.nn.Module,
        share_prefix: int = 64,
        pack_weights: bool | None = None,
        merge_adapters: bool = False,
    ):
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
        self.prefix: tuple[list[int], Any] | None = None  # last shared prefix and its cache
        self.cache: KVCache | None = None
        self._mask: torch.Tensor | None = None  # (batch, cached length), 1 = real token
        self._next: torch.Tensor | None = None  # (batch,) token each row feeds next

    def reset(self) -> None:
        """An empty batch (after a failed step)."""
        self.cache = self._mask = self._next = None
        self.prefix = None

    # ----------------------------------------------------------------- one step
    def decode(self) -> torch.Tensor:
        """Feed every row its next token; (rows, vocab) logits."""
        ones = self._mask.new_ones(self._mask.shape[0], 1)
        self._mask = torch.cat([self._mask, ones], dim=1)
        self.cache.reserve(1)
        if self.decoder is not None:
            positions = self._mask.sum(-1) - 1
            return self.decoder(self._next, positions, self._mask, self.cache)
        logits = self._forward(self._next[:, None], self._mask, self.cache.as_transformers_cache())
        self.cache.advance(1)
        return logits

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Run new prompts (one batched, left-padded prefill) and append them as rows at the
        end of the batch; (new rows, vocab) logits for their first tokens. A prompt given
        several times (a GRPO group's completions) is run once and its rows copied."""
        unique = list(dict.fromkeys(tuple(p) for p in prompts))
        filled, mask, logits = self._prefill_unique([list(p) for p in unique])
        if len(unique) < len(prompts):
            where = {p: i for i, p in enumerate(unique)}
            rows = torch.tensor([where[tuple(p)] for p in prompts], device=self.device)
            filled.select(rows, 0)
            mask, logits = mask[rows], logits[rows]
        self._splice(filled, mask)
        return logits

    def _prefill_unique(
        self, prompts: list[list[int]]
    ) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
        """(the prompts' cache, their attention mask, their last-position logits)."""
        shared = self._shared_prefix(prompts)
        cache = (
            self._prefix_cache(prompts[0][:shared], len(prompts))
            if shared
            else DynamicCache(config=self.model.config)
        )
        # the rest of each prompt, left-padded: [shared prefix][padding][own tokens]
        width = max(len(p) for p in prompts) - shared
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), shared + width, dtype=torch.long)
        mask[:, :shared] = 1
        for i, prompt in enumerate(prompts):
            own = prompt[shared:]
            ids[i, width - len(own) :] = torch.tensor(own)
            mask[i, shared + width - len(own) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        logits = self._forward(ids, mask, cache)
        filled = KVCache.from_tensors(
            [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]
        )
        return filled, mask, logits

    def feed(self, tokens: torch.Tensor, first_row: int = 0) -> None:
        """The tokens rows ``first_row``.. feed at the next decode (the ones just chosen)."""
        self._next[first_row:] = tokens

    def select(self, keep: list[int] | None) -> None:
        """Keep only rows ``keep`` (None: none) and drop the all-padding columns they leave."""
        if keep is None:
            self.cache = self._mask = self._next = None
            return
        if self._mask is None or len(keep) == self._mask.shape[0]:
            return
        index = torch.tensor(keep, device=self.device)
        self._mask = self._mask[index]
        first = int(self._mask.any(0).nonzero()[0])
        self._mask = self._mask[:, first:]
        self.cache.select(index, first)
        self._next = self._next[index]

    # ----------------------------------------------------------------- internals
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions,
                      past_key_values=cache, use_cache=True)  # fmt: skip
        if self.head is None:
            return self.model(**inputs, logits_to_keep=1).logits[:, -1].float()
        # the last position taken as a 2-D (rows, hidden) slice before the head: the model's
        # own (rows, 1, hidden) slice is not contiguous, and a bf16 F.linear of such an input
        # expands the head's weight once per row on CPU
        decoder, head = self.head
        return head(decoder(**inputs).last_hidden_state[:, -1]).float()

    def _splice(self, cache: KVCache, mask: torch.Tensor) -> None:
        """Append freshly prefilled rows to the batch, left-padding the shorter side; their
        next tokens are set by ``feed``."""
        placeholder = torch.zeros(mask.shape[0], dtype=torch.long, device=self.device)
        if self.cache is None:
            self.cache, self._mask, self._next = cache, mask, placeholder
            return
        width = max(self._mask.shape[1], mask.shape[1])
        self.cache.extend(cache)
        self._mask = torch.cat([_left_pad(self._mask, width), _left_pad(mask, width)])
        self._next = torch.cat([self._next, placeholder])

    def _prefix_cache(self, ids: list[int], rows: int):
        """A cache holding ``ids``' keys/values for ``rows`` rows; the prefix is run once and
        kept for later admissions."""
        if self.prefix is None or self.prefix[0] != ids:
            cache = DynamicCache(config=self.model.config)
            prefix = torch.tensor([ids], device=self.device)
            self._forward(prefix, torch.ones_like(prefix), cache)
            self.prefix = (ids, cache)
        cache = copy.deepcopy(self.prefix[1])
        for layer in cache.layers:
            layer.keys = layer.keys.repeat(rows, 1, 1, 1)
            layer.values = layer.values.repeat(rows, 1, 1, 1)
        return cache

    def _shared_prefix(self, prompts: list[list[int]]) -> int:
        """Leading tokens all ``prompts`` share (each keeps at least one of its own, whose
        logits give its first token): the kept prefix when they all start with it, else their
        common prefix; 0 when below ``share_prefix``."""
        if not self.share_prefix:
            return 0
        if self.prefix is not None:
            kept = self.prefix[0]
            if all(len(p) > len(kept) and p[: len(kept)] == kept for p in prompts):
                return len(kept)
        if len(prompts) < 2:
            return 0
        first = prompts[0]
        shared = min(len(p) for p in prompts) - 1
        for p in prompts[1:]:
            same = next((i for i, (a, b) in enumerate(zip(first, p)) if a != b), len(p))
            shared = min(shared, same)
        return shared if shared >= self.share_prefix else 0


__all__ = ["ModelRunner"]
