"""One generation request and its state as the engine advances it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from xtuner_lite.inference.grammar import Constraint
from xtuner_lite.inference.sampling import SamplingParams

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
    stop_token: int | None = None  # the stop token id that ended it (not in output_ids)
    constraint: Constraint | None = None  # the grammar the output must follow
    cached_tokens: int = 0  # leading prompt tokens found in the prefix cache (not prefilled)
    # an image-text model's inputs for the prompt's images, in the order of their tokens
    images: dict[str, torch.Tensor] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def greedy(self) -> bool:
        """Its next token is the argmax (no temperature, no repetition penalty)."""
        return self.params.temperature == 0 and self.params.repetition_penalty == 1.0

    def fail(self, message: str) -> None:
        if not self.finished:
            self.finish_reason, self.error = "error", message


__all__ = ["Request", "TokenCallback"]
