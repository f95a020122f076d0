"""Log-likelihood of continuations, batched, with each shared context computed once.

The options of one question share their prompt. Rather than running prompt+option k times (what
lm-evaluation-harness does), a batch of distinct contexts is prefilled once (left-padded, with a
KV cache), each context's cache rows are repeated for its options, and only the option tokens
are run. Tokenization splits pairs exactly as lm-evaluation-harness does, so the numbers agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Score:
    logprob: float  # sum of the continuation tokens' log-probabilities
    greedy: bool  # every continuation token is the argmax
    num_tokens: int


class LoglikScorer:
    """``score([(context, continuation), ...])`` for a causal LM and its tokenizer."""

    def __init__(self, model: torch.nn.Module, tokenizer, batch_tokens: int = 4096,
                 max_length: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_tokens = batch_tokens
        self.max_length = max_length or getattr(model.config, "max_position_embeddings", 2048)
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
        return context_ids, whole[len(context_ids):]

    def score(self, pairs: list[tuple[str, str]],
              progress: Callable[[int], None] | None = None) -> list[Score]:
        encoded = [self.encode_pair(c, x) for c, x in pairs]
        return self.score_ids(encoded, progress)

    @torch.no_grad()
    def score_ids(self, encoded: list[tuple[list[int], list[int]]],
                  progress: Callable[[int], None] | None = None) -> list[Score]:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (context, continuation) in enumerate(encoded):
            if not continuation:
                raise ValueError(f"continuation of request {i} has no tokens")
            context = context[-(self.max_length - len(continuation)):]  # keep the end
            groups.setdefault(tuple(context), []).append(i)
        order = sorted(groups, key=len, reverse=True)  # similar lengths batch together
        results: list[Score | None] = [None] * len(encoded)
        batch: list[tuple[int, ...]] = []
        cost = 0
        for context in order:
            rows = groups[context]
            longest = max(len(encoded[i][1]) for i in rows)
            width = len(batch[0]) if batch else len(context)
            # tokens this batch will hold: contexts (padded) + every option row's full width
            extra = width + len(rows) * (width + longest)
            if batch and cost + extra > self.batch_tokens:
                self._run(batch, groups, encoded, results)
                if progress:
                    progress(sum(len(groups[c]) for c in batch))
                batch, cost = [], 0
            batch.append(context)
            cost += extra
        if batch:
            self._run(batch, groups, encoded, results)
            if progress:
                progress(sum(len(groups[c]) for c in batch))
        return results  # type: ignore[return-value]

    def _run(self, contexts: list[tuple[int, ...]], groups: dict, encoded: list,
             results: list) -> None:
        from transformers import DynamicCache

        device = self.device
        width = max(map(len, contexts))
        ids = torch.zeros(len(contexts), width, dtype=torch.long)
        mask = torch.zeros(len(contexts), width, dtype=torch.long)
        for row, context in enumerate(contexts):
            ids[row, width - len(context):] = torch.tensor(context)
            mask[row, width - len(context):] = 1
        ids, mask = ids.to(device), mask.to(device)
        cache = DynamicCache(config=self.model.config)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        first = out.logits[:, -1].float().log_softmax(-1)  # predicts each option's first token

        requests = [(row, i) for row, context in enumerate(contexts) for i in groups[context]]
        # options sorted by length and run in chunks, so short ones are not padded to the longest
        requests.sort(key=lambda r: len(encoded[r[1]][1]))
        prefix = [(layer.keys, layer.values) for layer in cache.layers]
        chunk: list[tuple[int, int]] = []
        for request in requests:
            longest = len(encoded[request[1]][1])
            if chunk and (len(chunk) + 1) * (width + longest) > self.batch_tokens:
                self._options(chunk, encoded, results, first, mask, cache, prefix)
                chunk = []
            chunk.append(request)
        self._options(chunk, encoded, results, first, mask, cache, prefix)

    def _options(self, requests: list[tuple[int, int]], encoded: list, results: list,
                 first: torch.Tensor, mask: torch.Tensor, cache, prefix: list) -> None:
        """Score options (context row, request index) on their contexts' cached keys/values."""
        device, width = self.device, mask.shape[1]
        owner = torch.tensor([row for row, _ in requests], device=device)
        length = max(len(encoded[i][1]) for _, i in requests)
        cont = torch.zeros(len(requests), length, dtype=torch.long)
        cont_mask = torch.zeros(len(requests), length, dtype=torch.long)
        for r, (_, i) in enumerate(requests):
            tokens = encoded[i][1]
            cont[r, :len(tokens)] = torch.tensor(tokens)
            cont_mask[r, :len(tokens)] = 1
        cont, cont_mask = cont.to(device), cont_mask.to(device)
        logprobs = first[owner].gather(1, cont[:, :1]).squeeze(1)
        greedy = first[owner].argmax(-1) == cont[:, 0]
        if length > 1:  # options longer than one token: run them on the repeated cache
            for layer, (keys, values) in zip(cache.layers, prefix):
                layer.keys, layer.values = keys[owner], values[owner]
            full_mask = torch.cat([mask[owner], cont_mask], dim=1)
            pos = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, width:width + length - 1]
            out = self.model(input_ids=cont[:, :-1], attention_mask=full_mask[:, :-1],
                             position_ids=pos, past_key_values=cache, use_cache=True)
            logits = out.logits.float()  # no log_softmax copy: gather minus logsumexp
            target = cont[:, 1:]
            valid = cont_mask[:, 1:].bool()
            token_lp = logits.gather(2, target[..., None]).squeeze(2) - logits.logsumexp(-1)
            logprobs = logprobs + (token_lp * valid).sum(1)
            greedy &= ((logits.argmax(-1) == target) | ~valid).all(1)
        for r, (_, i) in enumerate(requests):
            results[i] = Score(float(logprobs[r]), bool(greedy[r]), len(encoded[i][1]))
