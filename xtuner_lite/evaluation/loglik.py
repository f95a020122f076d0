"""Log-likelihood of continuations, batched, with each shared context computed once.

The options of one question share their prompt. Rather than running prompt+option k times (what
lm-evaluation-harness does), a batch of distinct contexts is prefilled once (left-padded, with a
KV cache) with only its last logits, which score each option's first token; the options' other
tokens then run packed into rows without padding, each attending to its own context's cached
keys. Tokenization splits pairs exactly as lm-evaluation-harness does, so the numbers agree.
An image-text model's contexts may hold images: their inputs go with the context's prefill.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from xtuner_lite.data.images import images_digest, join_images
from xtuner_lite.errors import XtunerError
from xtuner_lite.model.vlm import model_image_inputs, offset_positions, prompt_positions


@contextmanager
def _custom_mask_attention(model: torch.nn.Module) -> Iterator[bool]:
    """Run with an attention that takes a custom 4D mask: SDPA as is, eager as is (yields True:
    it wants an additive mask); any other (FlashAttention ignores such masks) as SDPA meanwhile."""
    config = model.config
    impl = getattr(config, "_attn_implementation", "sdpa") or "sdpa"
    if impl == "eager" or "sdpa" in impl:
        yield impl == "eager"
        return
    config._attn_implementation = "sdpa"
    try:
        yield False
    finally:
        config._attn_implementation = impl


@dataclass
class Score:
    logprob: float  # sum of the continuation tokens' log-probabilities
    greedy: bool  # every continuation token is the argmax
    num_tokens: int


class LoglikScorer:
    """``score([(context, continuation), ...])`` for a causal LM and its tokenizer."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        batch_tokens: int = 4096,
        max_length: int | None = None,
        chunk_tokens: int = 256,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_tokens = batch_tokens  # context positions (padded) per prefill
        # option tokens per packed row; each attends to the keys of every context in its
        # chunk, so a longer row pays more attention for the same tokens
        self.chunk_tokens = chunk_tokens
        text_config = model.config.get_text_config()
        self.max_length = max_length or getattr(text_config, "max_position_embeddings", 2048)
        self.device = next(model.parameters()).device
        eos = tokenizer.eos_token_id
        self.empty_context = [eos if eos is not None else 0]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Trailing spaces move to the continuation; the continuation is what the whole string
        adds after the context's tokens (lm-evaluation-harness's split)."""
        if not context:
            return self.empty_context, self.encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.encode(context + continuation)
        context_ids = self.encode(context)
        return context_ids, whole[len(context_ids) :]

    def score(
        self, pairs: list[tuple[str, str]], progress: Callable[[int], None] | None = None
    ) -> list[Score]:
        encoded = [self.encode_pair(c, x) for c, x in pairs]
        return self.score_ids(encoded, progress)

    @torch.no_grad()
    def score_ids(
        self,
        encoded: list[tuple[list[int], list[int]]],
        progress: Callable[[int], None] | None = None,
        images: list[dict[str, torch.Tensor] | None] | None = None,
    ) -> list[Score]:
        """``images``: each request's context's image inputs (an image-text model; its image
        tokens expanded in the context ids)."""
        images = images or [None] * len(encoded)
        groups: dict[tuple, list[int]] = {}
        self._images: dict[tuple, dict[str, torch.Tensor] | None] = {}
        for i, (context, continuation) in enumerate(encoded):
            if not continuation:
                raise ValueError(f"continuation of request {i} has no tokens")
            room = self.max_length - len(continuation)
            if images[i] is not None and len(context) > room:
                raise XtunerError(f"request {i}: its context with images passes max_length")
            key = (*context[-room:], images_digest(images[i]))  # keep the end
            groups.setdefault(key, []).append(i)
            self._images[key] = images[i]
        order = sorted(groups, key=len, reverse=True)  # similar lengths batch together
        # (a key is the context's ids, then its images' digest)
        results: list[Score | None] = [None] * len(encoded)
        batch: list[tuple[int, ...]] = []
        real = 0
        for context in order:  # the longest comes first: it sets the batch's width
            padded = (len(batch) + 1) * len(batch[0]) if batch else 0
            # a new batch when this one is full or would be more than a tenth left padding
            if batch and (padded > self.batch_tokens or padded > 1.1 * (real + len(context))):
                self._run(batch, groups, encoded, results)
                if progress:
                    progress(sum(len(groups[c]) for c in batch))
                batch, real = [], 0
            batch.append(context)
            real += len(context)
        if batch:
            self._run(batch, groups, encoded, results)
            if progress:
                progress(sum(len(groups[c]) for c in batch))
        return results  # type: ignore[return-value]

    def _run(
        self, contexts: list[tuple[int, ...]], groups: dict, encoded: list, results: list
    ) -> None:
        """Prefill the contexts (left-padded, last logits only), then score the options."""

        device = self.device
        images = [self._images[key] for key in contexts]
        contexts = [key[:-1] for key in contexts]
        width = max(map(len, contexts))
        ids = torch.zeros(len(contexts), width, dtype=torch.long)
        mask = torch.zeros(len(contexts), width, dtype=torch.long)
        for row, context in enumerate(contexts):
            ids[row, width - len(context) :] = torch.tensor(context)
            mask[row, width - len(context) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        cache = DynamicCache(config=self.model.config)
        positions, self._delta = prompt_positions(self.model, ids, mask, images)
        inputs = model_image_inputs(self.model.config, join_images([i for i in images if i]))
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **{k: v.to(device) for k, v in inputs.items()},
        )
        first = out.logits[:, -1].float().log_softmax(-1)  # predicts each option's first token

        keys = [(*context, digest) for context, digest in zip(contexts, map(images_digest, images))]
        requests = [(row, i) for row, key in enumerate(keys) for i in groups[key]]
        owner = torch.tensor([row for row, _ in requests], device=device)
        heads = torch.tensor([encoded[i][1][0] for _, i in requests], device=device)
        logprobs = first[owner, heads].double()
        misses = (first.argmax(-1)[owner] != heads).long()
        prefix = [(layer.keys, layer.values) for layer in cache.layers]
        # the rest of every option, packed without padding, in chunks of whole options
        chunk: list[int] = []
        size = 0
        for r, (_, i) in enumerate(requests):
            n = len(encoded[i][1]) - 1
            if not n:
                continue
            if chunk and size + n > self.chunk_tokens:
                self._packed(chunk, requests, encoded, mask, cache, prefix, logprobs, misses)
                chunk, size = [], 0
            chunk.append(r)
            size += n
        if chunk:
            self._packed(chunk, requests, encoded, mask, cache, prefix, logprobs, misses)
        for r, (_, i) in enumerate(requests):
            results[i] = Score(float(logprobs[r]), bool(misses[r] == 0), len(encoded[i][1]))

    def _packed(
        self,
        chunk: list[int],
        requests: list[tuple[int, int]],
        encoded: list,
        mask: torch.Tensor,
        cache,
        prefix: list,
        logprobs: torch.Tensor,
        misses: torch.Tensor,
    ) -> None:
        """Run options' tokens after the first as one row: each attends to its own context's
        cached keys and to its own earlier tokens only, so no option is padded to the longest.
        Adds each option's log-probability and argmax misses into ``logprobs``/``misses``."""
        device, width = self.device, mask.shape[1]
        top = requests[chunk[0]][0]  # requests are in context-row order
        span = requests[chunk[-1]][0] - top + 1
        lengths = mask.sum(1).tolist()  # each context's length: its options' first position
        ids, targets, positions, segment, own = _option_tokens(chunk, requests, encoded, lengths)
        segment_t = torch.tensor(segment, device=device)
        own_t = torch.tensor(own, device=device)
        delta = None if self._delta is None else self._delta[top + own_t][None]  # per token
        positions = offset_positions(torch.tensor([positions], device=device), delta)
        key_owner = torch.arange(span, device=device).repeat_interleave(width)
        real = mask[top : top + span].bool().reshape(-1)
        to_context = (own_t[:, None] == key_owner[None, :]) & real[None, :]
        order = torch.arange(len(ids), device=device)
        to_itself = (segment_t[:, None] == segment_t[None, :]) & (order[:, None] >= order[None, :])
        attention = torch.cat([to_context, to_itself], dim=1)[None, None]
        for layer, (keys, values) in zip(cache.layers, prefix):  # the rows, as one long row
            layer.keys = (
                keys[top : top + span]
                .transpose(0, 1)
                .reshape(1, keys.shape[1], span * width, keys.shape[3])
            )
            layer.values = (
                values[top : top + span]
                .transpose(0, 1)
                .reshape(1, values.shape[1], span * width, values.shape[3])
            )
        with _custom_mask_attention(self.model) as additive:
            if additive:  # eager attention adds the mask to the scores
                blocked = torch.finfo(self.model.dtype).min
                attention = torch.zeros(
                    attention.shape, dtype=self.model.dtype, device=device
                ).masked_fill_(~attention, blocked)
            out = self.model(
                input_ids=torch.tensor([ids], device=device),
                attention_mask=attention,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
        logits = out.logits[0].float()  # no log_softmax copy: gather minus logsumexp
        target = torch.tensor(targets, device=device)
        token_lp = logits.gather(1, target[:, None]).squeeze(1) - logits.logsumexp(-1)
        rows = torch.tensor(chunk, device=device)[segment_t]
        logprobs.index_add_(0, rows, token_lp.double())
        misses.index_add_(0, rows, (logits.argmax(-1) != target).long())


def _option_tokens(
    chunk: list[int], requests: list[tuple[int, int]], encoded: list, lengths: list[int]
) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """The options of ``chunk`` as one row: input ids, targets, positions (each option after its
    own context), each token's option and each token's context row (from the chunk's first)."""
    top = requests[chunk[0]][0]
    ids, targets, positions, segment, own = [], [], [], [], []
    for k, r in enumerate(chunk):
        row, i = requests[r]
        tokens = encoded[i][1]
        ids += tokens[:-1]
        targets += tokens[1:]
        positions += range(lengths[row], lengths[row] + len(tokens) - 1)
        segment += [k] * (len(tokens) - 1)
        own += [row - top] * (len(tokens) - 1)
    return ids, targets, positions, segment, own
