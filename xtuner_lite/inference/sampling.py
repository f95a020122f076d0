"""Next-token choice: repetition penalty → temperature → top-k → top-p → draw (HF's order)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """Per-request decoding settings; ``temperature == 0`` is greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop_words: list[str] = field(default_factory=list)

    def validate(self) -> None:
        checks = [(self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
                  (self.temperature >= 0, "temperature must be >= 0"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (self.top_k >= 0, "top_k must be >= 0"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float
                             ) -> torch.Tensor:
    """CTRL's penalty as transformers applies it: seen tokens' logits divided (or multiplied,
    when negative) by ``penalty``. ``logits`` (vocab,), ``seen`` token ids."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(0, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(0, seen, picked)


def choose_token(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor,
                 generator: torch.Generator | None) -> int:
    """One token id from a row of fp32 logits."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        drop = sorted_probs.cumsum(-1) - sorted_probs > params.top_p  # keep the first over p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
