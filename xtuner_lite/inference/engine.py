"""The bundled inference engine: continuous batching over a transformers model with a KV cache.

Why our own loop rather than ``generate``: ``generate`` decodes a fixed batch until its longest
request ends, so short requests idle and new ones wait. Here every ``step`` schedules (retires
finished requests, admits waiting ones), runs the model (one decode for every running row, one
batched prefill for the admitted ones, spliced into the running batch) and post-processes
(chooses, streams and stops each request's token) — nano-vllm's ``schedule → run →
postprocess``, with the scheduler, request state, model runner and sampling each in its file.
"""

from __future__ import annotations

import functools
import itertools

import torch

from xtuner_lite.errors import XtunerError
from xtuner_lite.inference.grammar import Constraint, GrammarError
from xtuner_lite.inference.model_runner import ModelRunner
from xtuner_lite.inference.request import Request, TokenCallback
from xtuner_lite.inference.sampling import SamplingParams, choose_tokens
from xtuner_lite.inference.scheduler import Scheduler
from xtuner_lite.inference.shared_prefix import SHARE_MIN_COLUMNS

PREFIX_CACHE_BYTES = 512 * 2**20  # default memory for cached prefix blocks, taken as used


class InferenceEngine:
    """Batched, streaming generation for a causal LM (merged, or base + adapter)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer=None,
        max_batch_size: int = 32,
        context_length: int | None = None,
        share_prefix: int = 64,
        pack_weights: bool | None = None,
        merge_adapters: bool = False,
        prefix_cache: int = PREFIX_CACHE_BYTES,
        cache_outputs: bool = True,
        share_kv: int = SHARE_MIN_COLUMNS,
    ):
        """``prefix_cache``: bytes of memory for the keys/values of prompt blocks kept across
        requests (``inference/block_manager.py``); a prompt whose leading blocks are cached
        prefills only the rest; 0 turns it off. ``cache_outputs``: a finished request's
        generated blocks are kept too (a conversation's next turn starts from them).
        ``share_prefix``: when the prompts admitted together share at least this many leading
        tokens (few-shot exemplars, a long system prompt), that prefix is prefilled once and
        its blocks are found by every row (with the prefix cache only); 0 turns it off.
        ``pack_weights``: let the fast decoder
        keep packed copies of the weights (faster on CPU, a second copy of the weights
        in memory; None decides by free memory — see ``inference/decoder.py``).
        ``merge_adapters``: the packed copies hold LoRA adapters merged in as they are now, for
        an engine that lives while the adapter does not change (one RL rollout).
        ``share_kv``: a prompt admitted several times at once (a GRPO group, ``n``) is held
        once and read once per step by all its rows when that saves this many cached columns
        (``inference/shared_prefix.py``; 0: never)."""
        self.scheduler = Scheduler(max_batch_size)
        self.runner = ModelRunner(
            model, share_prefix, pack_weights, merge_adapters, prefix_cache, share_kv
        )
        self.cache_outputs = cache_outputs
        self.model, self.tokenizer = self.runner.model, tokenizer
        self.context_length = context_length or getattr(
            model.config, "max_position_embeddings", None
        )
        self._ids = itertools.count()

    @property
    def waiting(self) -> list[Request]:
        return self.scheduler.waiting

    @property
    def running(self) -> list[Request]:
        return self.scheduler.running

    @property
    def fallback_reason(self) -> str | None:
        """Why the fast decoder cannot run this model (None: it does)."""
        return self.runner.fallback_reason

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ----------------------------------------------------------------- requests
    def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams | None = None,
        on_token: TokenCallback | None = None,
        grammar: str | None = None,
        images: dict[str, torch.Tensor] | None = None,
    ) -> Request:
        """Queue a request; ``grammar`` (``inference/grammar.py``) constrains its output.
        ``images``: an image-text model's image inputs (pixel values, Qwen2-VL's patch grids),
        in the order of the prompt's image token runs (``inference/images.py`` expands a
        prompt's placeholders and makes them)."""
        params = params or SamplingParams()
        params.validate()
        if not prompt_ids:
            raise XtunerError("empty prompt")
        budget = params.max_new_tokens
        if self.context_length is not None:
            room = self.context_length - len(prompt_ids)
            if room < 1:
                raise XtunerError(
                    f"prompt is {len(prompt_ids)} tokens; the model's context is "
                    f"{self.context_length}"
                )
            budget = min(budget, room)
        generator = None
        if params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed)
        request = Request(
            next(self._ids),
            list(prompt_ids),
            params,
            on_token,
            generator=generator,
            max_new_tokens=budget,
            constraint=None if grammar is None else Constraint(grammar, self.tokenizer),
            images=images,
        )
        self.scheduler.add(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request (e.g. its client went away); its slot frees on the next step."""
        self.scheduler.cancel(request)

    def fail_all(self, message: str) -> list[Request]:
        """After a step failed as a whole (not one request's fault): end every request with
        ``message`` and start again from an empty batch; returns the ended requests."""
        ended = self.scheduler.clear()
        for request in ended:
            request.finish_reason, request.error = "error", message
        self.runner.reset()
        return ended

    # ----------------------------------------------------------------- the loop
    @torch.no_grad()
    def step(self) -> list[Request]:
        """Decode one token for every running request, admit waiting ones (their prefill gives
        their first token); return the requests that finished in this step."""
        finished = self._retire()  # cancelled since the last step
        running = list(self.scheduler.running)
        if running:
            finished += self._postprocess(running, self.runner.decode(), first_row=0)
        admitted = self.scheduler.admit()
        if admitted:
            logits, cached = self.runner.prefill(
                [r.prompt_ids for r in admitted], [r.images for r in admitted]
            )
            for r, tokens in zip(admitted, cached):
                r.cached_tokens = tokens
            finished += self._postprocess(admitted, logits, first_row=len(running))
        self._retire()
        return finished

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | None = None
    ) -> list[Request]:
        """Run prompts to completion (all admitted together, batched) and return them."""
        requests = [self.add_request(p, params) for p in prompts]
        while any(not r.finished for r in requests):
            self.step()
        return requests

    def decode(self, request: Request) -> str:
        """The request's text without special tokens, except those its params keep (the
        special tokens a tool call is written with)."""
        ids, keep = request.output_ids, request.params.keep_token_ids
        if keep:
            ids = [i for i in ids if i in keep or i not in special_ids(self.tokenizer)]
        text = self.tokenizer.decode(ids, skip_special_tokens=not keep)
        for word in request.params.stop_words:
            text = text.split(word)[0]
        return text

    # ----------------------------------------------------------------- internals
    def _retire(self) -> list[Request]:
        if self.cache_outputs:
            leaving = [
                (i, self.runner.cache_key(r.prompt_ids + r.output_ids, r.images))
                for i, r in enumerate(self.scheduler.running)
                if r.finished
            ]
            self.runner.remember([i for i, _ in leaving], [key for _, key in leaving])
        done, keep = self.scheduler.retire()
        self.runner.select(keep)
        return done

    def _postprocess(
        self, rows: list[Request], logits: torch.Tensor, first_row: int
    ) -> list[Request]:
        """Choose each row's next token, stream it, mark finished requests."""
        for i, r in enumerate(rows):
            if r.constraint is not None and not r.finished:
                r.constraint.mask(logits[i], r.params.stop_token_ids)
        tokens, errors = choose_tokens(logits, rows)
        self.runner.feed(torch.tensor(tokens, device=self.runner.device), first_row)
        finished = []
        for i, (r, token) in enumerate(zip(rows, tokens)):
            if i in errors:  # this request fails, not the batch
                r.fail(errors[i])
            if not r.finished:  # (a cancelled request only waits to leave the batch)
                self._accept(r, token)
            if r.finished:
                finished.append(r)
                if self.tokenizer is not None:
                    r.text = self.decode(r)
        return finished

    def _accept(self, r: Request, token: int) -> None:
        if token in r.params.stop_token_ids:
            r.finish_reason, r.stop_token = "stop", token
            return
        if r.constraint is not None:
            try:
                r.constraint.advance(token)
            except GrammarError as exc:
                r.fail(str(exc))
                return
        r.output_ids.append(token)
        if r.on_token is not None:
            r.on_token(r, token)
        if self._hit_stop_word(r) or (r.constraint is not None and r.constraint.complete):
            r.finish_reason = "stop"
        elif len(r.output_ids) >= r.max_new_tokens:
            r.finish_reason = "length"

    def _hit_stop_word(self, r: Request) -> bool:
        if not r.params.stop_words or self.tokenizer is None:
            return False
        tail = self.tokenizer.decode(r.output_ids[-16:], skip_special_tokens=False)
        return any(w in tail for w in r.params.stop_words)


@functools.lru_cache(maxsize=8)
def special_ids(tokenizer) -> frozenset[int]:
    """The tokenizer's special token ids (streaming decodes at every token: looked up once)."""
    return frozenset(tokenizer.all_special_ids)


__all__ = ["InferenceEngine", "Request"]
