"""Next-token choice: repetition penalty → temperature → top-k → top-p → draw (HF's order)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from xtuner_lite.config import is_int, is_number
from xtuner_lite.errors import UsageError

MAX_SEED = 2**64 - 1  # torch generators take unsigned 64-bit seeds


class SamplingError(UsageError):
    """A sampling parameter out of range; ``param`` names it (the CLI and the server say so)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


# the one place the accepted ranges are written: (name, check, what is accepted)
RULES = [
    ("max_new_tokens", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    ("temperature", lambda v: is_number(v) and 0 <= v <= 2, "a number in [0, 2] (0: greedy)"),
    ("top_p", lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    ("top_k", lambda v: is_int(v) and v >= 0, "an integer >= 0 (0: off)"),
    ("repetition_penalty", lambda v: is_number(v) and 0 < v <= 100, "a number in (0, 100]"),
    (
        "seed",
        lambda v: v is None or (is_int(v) and 0 <= v <= MAX_SEED),
        f"an integer in [0, {MAX_SEED}]",
    ),
]


@dataclass
class SamplingParams:
    """Per-request decoding settings; ``temperature == 0`` is greedy.

    Args:
        max_new_tokens: tokens to generate at most
        temperature: 0 means greedy
        top_p: nucleus sampling: the smallest set of tokens with this much probability
        top_k: sample among the k most likely tokens (0: all)
        repetition_penalty: CTRL's penalty on tokens already seen (1: off)
        seed: seed of this request's sampling (default: random)
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop_words: list[str] = field(default_factory=list)
    keep_token_ids: list[int] = field(default_factory=list)  # special tokens kept in the text

    def validate(self) -> SamplingParams:
        """Raise :class:`SamplingError` naming the first value out of range; return self."""
        for name, ok, accepted in RULES:
            value = getattr(self, name)
            if not ok(value):
                raise SamplingError(f"{name} must be {accepted}, got {value!r}", name)
        return self


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL's penalty as transformers applies it: seen tokens' logits divided (or multiplied,
    when negative) by ``penalty``. ``logits`` (vocab,), ``seen`` token ids."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(0, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(0, seen, picked)


def choose_token(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor,
    generator: torch.Generator | None,
) -> int:
    """One token id from a row of fp32 logits."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return int(logits.argmax())
    # shifted so the largest is 0 before dividing: a tiny temperature then gives -inf for the
    # others (the greedy limit), never inf - inf = nan
    logits = (logits - logits.max()) / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        drop = sorted_probs.cumsum(-1) - sorted_probs > params.top_p  # keep the first over p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    return draw(logits.softmax(-1), generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index with probability ``probs`` (vocab,), by inverse transform: one uniform from
    the request's generator against the cumulative sum, where ``torch.multinomial`` draws a
    full vocabulary of exponentials per call (timings: docs/benchmarks.md)."""
    index, valid = _draw_rows(probs[None], [generator])
    if not bool(valid[0]):
        raise ValueError(INVALID)
    return int(index[0])


INVALID = "the probabilities are not finite and positive"


def _draw_rows(
    probs: torch.Tensor, generators: list[torch.Generator | None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`draw` for each row of ``probs`` (rows, vocab), one uniform from each row's
    generator; returns the indices and which rows had finite, positive mass (the others'
    index is meaningless)."""
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1]
    valid = torch.isfinite(total) & (total > 0)
    u = torch.stack([torch.rand((), dtype=torch.float64, generator=g) for g in generators])
    index = torch.searchsorted(cdf, (u * total)[:, None], right=True)[:, 0]
    # u * total can round up to the total itself: the last token with mass then
    for row in (index == cdf.shape[-1]).nonzero()[:, 0].tolist():
        index[row] = int(torch.nonzero(probs[row])[-1]) if bool(valid[row]) else 0
    return index, valid


def _temperature_only(params: SamplingParams) -> bool:
    """Sampled with temperature alone (no penalty, top-k or top-p): rows sharing a
    temperature are drawn together."""
    return params.repetition_penalty == 1.0 and not params.top_k and params.top_p >= 1.0


def _draw_together(
    logits: torch.Tensor, rows: list, picked: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``picked`` (one temperature, :func:`_temperature_only`) drawn in one pass, each
    from its own generator: :func:`choose_token`'s tokens, row by row, and which rows had
    finite, positive mass."""
    temperature = rows[picked[0]].params.temperature
    chosen = logits[picked]
    chosen = (chosen - chosen.max(-1, keepdim=True).values) / temperature
    return _draw_rows(chosen.softmax(-1), [rows[i].generator for i in picked])


def choose_tokens(logits: torch.Tensor, rows: list) -> tuple[list[int], dict[int, str]]:
    """Each row's next token (rows: requests with ``params``, ``greedy``, ``prompt_ids``,
    ``output_ids`` and ``generator``) and, by row, why sampling failed for a request (that
    row falls back to its argmax; the batch goes on)."""
    # one call for the whole batch; max's indices are argmax's (the first largest), from a
    # faster reduction on CPU
    tokens = logits.max(-1).indices.tolist()
    errors: dict[int, str] = {}
    together: dict[float, list[int]] = {}
    alone = []
    for i, r in enumerate(rows):
        if r.greedy:
            continue
        if _temperature_only(r.params):
            together.setdefault(r.params.temperature, []).append(i)
        else:
            alone.append(i)
    for picked in together.values():
        index, valid = _draw_together(logits, rows, picked)
        for i, token, ok in zip(picked, index.tolist(), valid.tolist(), strict=True):
            if ok:
                tokens[i] = token
            else:
                errors[i] = f"sampling failed: {INVALID}"
    for i in alone:
        r = rows[i]
        try:
            tokens[i] = choose_token(logits[i], r.params, _seen(r, logits.device), r.generator)
        except (RuntimeError, ValueError) as exc:
            errors[i] = f"sampling failed: {exc}"
    return tokens, errors


def _seen(r, device: torch.device) -> torch.Tensor:
    """The ids the repetition penalty looks at (none without a penalty: not built per token)."""
    if r.params.repetition_penalty == 1.0:
        return torch.empty(0, dtype=torch.long, device=device)
    return torch.tensor(r.prompt_ids + r.output_ids, device=device)
