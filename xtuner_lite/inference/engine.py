"""The bundled inference engine: continuous batching over a transformers model with a KV cache.

Why our own loop rather than ``generate``: ``generate`` decodes a fixed batch until its longest
request ends, so short requests idle and new ones wait. Here every ``step`` first admits waiting
requests (one batched prefill, left-padded), splices their caches into the running batch, then
decodes one token for every running request and retires finished ones at once. Rows are kept
left-aligned with an attention mask and per-row positions, exactly as ``generate`` pads, so
greedy output is the same tokens. Keys and values live in a ``KVCache`` written in place, and
Llama-family models decode through ``FastDecoder`` (other models through their own forward).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from xtuner_lite.errors import UsageError, XtunerError
from xtuner_lite.inference.decoder import FastDecoder, unsupported_reason
from xtuner_lite.inference.kv_cache import KVCache
from xtuner_lite.inference.sampling import SamplingParams, choose_token

TokenCallback = Callable[["Request", int], None]


@dataclass
class Request:
    """One generation: prompt ids in, ``output_ids`` growing until ``finish_reason`` is set."""

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    on_token: TokenCallback | None = None
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None  # why, when finish_reason is "error"
    text: str = ""  # decoded output (stop words cut), filled when the engine has a tokenizer
    generator: torch.Generator | None = None
    max_new_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Pad a (rows, columns) ``t`` with zeros on the left up to ``width`` columns."""
    missing = width - t.shape[1]
    return torch.cat([t.new_zeros(t.shape[0], missing), t], dim=1) if missing > 0 else t


class InferenceEngine:
    """Batched, streaming generation for a causal LM (merged, or base + adapter)."""

    def __init__(self, model: torch.nn.Module, tokenizer=None, max_batch_size: int = 32,
                 context_length: int | None = None, share_prefix: int = 64,
                 pack_weights: bool | None = None):
        """``share_prefix``: when the prompts admitted together share at least this many leading
        tokens (few-shot exemplars, a long system prompt), that prefix is prefilled once and its
        keys/values copied to every row; 0 turns it off. ``pack_weights``: let the fast decoder
        keep oneDNN-packed copies of the weights (faster on CPU, a second copy of the weights
        in memory; None decides by free memory — see ``inference/decoder.py``)."""
        from transformers import DynamicCache

        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise UsageError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.share_prefix = share_prefix
        self._prefix: tuple[list[int], Any] | None = None  # last shared prefix and its cache
        config = model.config
        self.context_length = context_length or getattr(config, "max_position_embeddings", None)
        self.device = next(model.parameters()).device
        self._cache_cls = DynamicCache
        self._ids = itertools.count()
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        # None when FastDecoder runs this model (Llama family), else why it cannot
        self.fallback_reason = unsupported_reason(model)
        self._decoder = (FastDecoder(model, pack=pack_weights) if self.fallback_reason is None
                         else None)
        self._cache: KVCache | None = None
        self._mask: torch.Tensor | None = None  # (batch, cached length), 1 = real token
        self._next: torch.Tensor | None = None  # (batch,) token each running row feeds next

    # ----------------------------------------------------------------- requests
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None,
                    on_token: TokenCallback | None = None) -> Request:
        params = params or SamplingParams()
        params.validate()
        if not prompt_ids:
            raise XtunerError("empty prompt")
        budget = params.max_new_tokens
        if self.context_length is not None:
            room = self.context_length - len(prompt_ids)
            if room < 1:
                raise XtunerError(f"prompt is {len(prompt_ids)} tokens; the model's context is "
                                  f"{self.context_length}")
            budget = min(budget, room)
        generator = None
        if params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed)
        request = Request(next(self._ids), list(prompt_ids), params, on_token,
                          generator=generator, max_new_tokens=budget)
        self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request (e.g. its client went away); its slot frees on the next step."""
        if request in self.waiting:
            self.waiting.remove(request)
        request.finish_reason = request.finish_reason or "cancelled"

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def fail_all(self, message: str) -> list[Request]:
        """After a step failed as a whole (not one request's fault): end every request with
        ``message`` and start again from an empty batch; returns the ended requests."""
        ended = self.running + self.waiting
        for request in ended:
            request.finish_reason, request.error = "error", message
        self.running, self.waiting = [], []
        self._cache = self._mask = self._next = None
        self._prefix = None
        return ended

    # ----------------------------------------------------------------- the loop
    @torch.no_grad()
    def step(self) -> list[Request]:
        """Decode one token for every running request, admit waiting ones (their prefill gives
        their first token); return the requests that finished in this step."""
        finished = [r for r in self.running if r.finished]  # cancelled since the last step
        self._drop(finished)
        if self.running:
            finished += self._decode()
        admitted = self.waiting[: max(self.max_batch_size - len(self.running), 0)]
        self.waiting = self.waiting[len(admitted):]
        if admitted:
            finished += self._prefill(admitted)
        self._drop([r for r in self.running if r.finished])
        return finished

    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None
                 ) -> list[Request]:
        """Run prompts to completion (all admitted together, batched) and return them."""
        requests = [self.add_request(p, params) for p in prompts]
        while any(not r.finished for r in requests):
            self.step()
        return requests

    # ----------------------------------------------------------------- internals
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    def _prefill(self, requests: list[Request]) -> list[Request]:
        shared = self._shared_prefix(requests)
        cache = (self._prefix_cache(requests[0].prompt_ids[:shared], len(requests)) if shared
                 else self._cache_cls(config=self.model.config))
        # the rest of each prompt, left-padded: [shared prefix][padding][own tokens]
        width = max(len(r.prompt_ids) for r in requests) - shared
        ids = torch.zeros(len(requests), width, dtype=torch.long)
        mask = torch.zeros(len(requests), shared + width, dtype=torch.long)
        mask[:, :shared] = 1
        for i, r in enumerate(requests):
            own = r.prompt_ids[shared:]
            ids[i, width - len(own):] = torch.tensor(own)
            mask[i, shared + width - len(own):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        tokens, finished = self._emit(requests, self._forward(ids, mask, cache))
        filled = KVCache.from_tensors([layer.keys for layer in cache.layers],
                                      [layer.values for layer in cache.layers])
        self._splice(requests, filled, mask, tokens)
        return finished

    def _prefix_cache(self, ids: list[int], rows: int):
        """A cache holding ``ids``' keys/values for ``rows`` rows; the prefix is run once and
        kept for later admissions."""
        if self._prefix is None or self._prefix[0] != ids:
            cache = self._cache_cls(config=self.model.config)
            prefix = torch.tensor([ids], device=self.device)
            self._forward(prefix, torch.ones_like(prefix), cache)
            self._prefix = (ids, cache)
        cache = copy.deepcopy(self._prefix[1])
        for layer in cache.layers:
            layer.keys = layer.keys.repeat(rows, 1, 1, 1)
            layer.values = layer.values.repeat(rows, 1, 1, 1)
        return cache

    def _shared_prefix(self, requests: list[Request]) -> int:
        """Leading tokens all ``requests`` share (each keeps at least one of its own, whose
        logits give its first token): the kept prefix when they all start with it, else their
        common prefix; 0 when below ``share_prefix``."""
        if not self.share_prefix:
            return 0
        if self._prefix is not None:
            kept = self._prefix[0]
            if all(len(r.prompt_ids) > len(kept) and r.prompt_ids[:len(kept)] == kept
                   for r in requests):
                return len(kept)
        if len(requests) < 2:
            return 0
        first = requests[0].prompt_ids
        shared = min(len(r.prompt_ids) for r in requests) - 1
        for r in requests[1:]:
            same = next((i for i, (a, b) in enumerate(zip(first, r.prompt_ids)) if a != b),
                        len(r.prompt_ids))
            shared = min(shared, same)
        return shared if shared >= self.share_prefix else 0

    def _decode(self) -> list[Request]:
        ones = self._mask.new_ones(self._mask.shape[0], 1)
        self._mask = torch.cat([self._mask, ones], dim=1)
        self._cache.reserve(1)
        if self._decoder is not None:
            positions = self._mask.sum(-1) - 1
            logits = self._decoder(self._next, positions, self._mask, self._cache)
        else:
            logits = self._forward(self._next[:, None], self._mask,
                                   self._cache.as_transformers_cache())
            self._cache.advance(1)
        tokens, finished = self._emit(self.running, logits)
        self._next = tokens
        return finished

    def _emit(self, rows: list[Request], logits: torch.Tensor
              ) -> tuple[torch.Tensor, list[Request]]:
        """Choose each row's next token, stream it, mark finished requests."""
        chosen, finished = [], []
        greedy = logits.argmax(-1).tolist()  # one call for the whole batch
        for i, r in enumerate(rows):
            if r.params.temperature == 0 and r.params.repetition_penalty == 1.0:
                token = greedy[i]
            else:
                try:
                    seen = torch.tensor(r.prompt_ids + r.output_ids, device=logits.device)
                    token = choose_token(logits[i], r.params, seen, r.generator)
                except (RuntimeError, ValueError) as exc:  # this request fails, not the batch
                    token = greedy[i]
                    if not r.finished:
                        r.finish_reason, r.error = "error", f"sampling failed: {exc}"
            chosen.append(token)
            if not r.finished:  # (a cancelled request only waits to leave the batch)
                self._accept(r, token)
            if r.finished:
                finished.append(r)
                if self.tokenizer is not None:
                    r.text = self.decode(r)
        return torch.tensor(chosen, device=self.device), finished

    def _accept(self, r: Request, token: int) -> None:
        if token in r.params.stop_token_ids:
            r.finish_reason = "stop"
            return
        r.output_ids.append(token)
        if r.on_token is not None:
            r.on_token(r, token)
        if self._hit_stop_word(r):
            r.finish_reason = "stop"
        elif len(r.output_ids) >= r.max_new_tokens:
            r.finish_reason = "length"

    def decode(self, request: Request) -> str:
        text = self.tokenizer.decode(request.output_ids, skip_special_tokens=True)
        for word in request.params.stop_words:
            text = text.split(word)[0]
        return text

    def _hit_stop_word(self, r: Request) -> bool:
        if not r.params.stop_words or self.tokenizer is None:
            return False
        tail = self.tokenizer.decode(r.output_ids[-16:], skip_special_tokens=False)
        return any(w in tail for w in r.params.stop_words)

    def _splice(self, requests: list[Request], cache: KVCache, mask: torch.Tensor,
                tokens: torch.Tensor) -> None:
        """Append freshly prefilled rows to the running batch, left-padding the shorter side."""
        if self._cache is None or not self.running:
            self._cache, self._mask, self._next = cache, mask, tokens
            self.running = list(requests)
            return
        width = max(self._mask.shape[1], mask.shape[1])
        self._cache.extend(cache)
        self._mask = torch.cat([_left_pad(self._mask, width), _left_pad(mask, width)])
        self._next = torch.cat([self._next, tokens])
        self.running = self.running + list(requests)

    def _drop(self, done: list[Request]) -> None:
        """Remove finished rows from the batch and the all-padding columns they leave."""
        if not done:
            return
        keep = [i for i, r in enumerate(self.running) if r not in done]
        self.running = [self.running[i] for i in keep]
        if not keep:
            self._cache = self._mask = self._next = None
            return
        index = torch.tensor(keep, device=self.device)
        self._mask = self._mask[index]
        first = int(self._mask.any(0).nonzero()[0])
        self._mask = self._mask[:, first:]
        self._cache.select(index, first)
        self._next = self._next[index]
