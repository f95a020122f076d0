"""A model ready to chat: weights, tokenizer, the template it was trained with and where a turn
ends; and streaming its output as text. Shared by ``xtuner chat`` and ``xtuner serve``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import BitsAndBytesConfig

from xtuner_lite.adapters import load_adapted, read_adapter_meta
from xtuner_lite.data import control
from xtuner_lite.data.templates import Template, get_template, stop_token_ids
from xtuner_lite.errors import XtunerError
from xtuner_lite.hub import default_template_for, load_model, load_tokenizer
from xtuner_lite.inference.engine import InferenceEngine
from xtuner_lite.inference.sampling import SamplingParams


def quantization_kwargs(bits: int | None) -> dict[str, Any]:
    """from_pretrained kwargs for 4/8-bit weights through bitsandbytes (None: full precision)."""
    if bits is None:
        return {}
    if bits not in (4, 8):
        raise XtunerError(f"--bits must be 4 or 8, got {bits}")

    if bits == 4:
        return {
            "quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
        }
    # LLM.int8 multiplies in fp16: load the rest in fp16 too rather than cast at every layer
    return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "dtype": "float16"}


@dataclass
class ChatModel:
    """A loaded model with the template it chats in and where that template ends a turn."""

    model: Any
    tokenizer: Any
    template: Template
    stop_ids: list[int]
    stop_strings: list[str]  # stop words that are not single tokens

    @classmethod
    def load(
        cls,
        model: str,
        adapter: str | None = None,
        template: str | None = None,
        bits: int | None = None,
        weights: bool = True,
    ) -> ChatModel:
        """The template recorded beside an adapter by ``xtuner train`` is the default.
        ``weights=False`` loads only the tokenizer and template (another engine holds the model).
        """
        trained_with = None
        if not weights:
            llm = None
            trained_with = read_adapter_meta(adapter)[1].get("template") if adapter else None
            has_tokenizer = adapter and (Path(adapter) / "tokenizer_config.json").exists()
            tokenizer = load_tokenizer(adapter if has_tokenizer else model)
        elif adapter:
            llm, tokenizer, meta = load_adapted(
                model, adapter, any_base=True, **quantization_kwargs(bits)
            )
            trained_with = meta.get("template")
        else:
            tokenizer = load_tokenizer(model)
            llm = load_model(model, **quantization_kwargs(bits)).eval()
        name = template or trained_with or default_template_for(model) or "auto"
        chat_template = get_template(name, tokenizer)
        vocab = tokenizer.get_vocab()
        return cls(
            llm,
            tokenizer,
            chat_template,
            stop_token_ids(chat_template, tokenizer),
            [w for w in chat_template.stop_words(tokenizer) if w not in vocab],
        )

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The conversation rendered and tokenized; chat-control tokens typed inside a message
        are escaped, so message text can never open or close a turn."""
        tokens = control.control_tokens(self.tokenizer)
        messages = [{**m, "content": control.escape(m["content"], tokens)} for m in messages]
        text = self.template.render_prompt(messages, self.tokenizer)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def sampling(self, options: SamplingParams, stop_words: list[str] = ()) -> SamplingParams:
        """``options`` validated, with the template's stops and ``stop_words`` added."""
        return dataclasses.replace(
            options.validate(),
            stop_token_ids=list(self.stop_ids),
            stop_words=self.stop_strings + list(options.stop_words) + list(stop_words),
        )


def held_back(text: str, stop_words: list[str]) -> int:
    """Length of the longest end of ``text`` that may be the start of a stop word: it is not
    streamed until the next tokens show whether the stop word follows."""
    longest = 0
    for word in stop_words:
        for size in range(min(len(word) - 1, len(text)), longest, -1):
            if text.endswith(word[:size]):
                longest = size
                break
    return longest


class TextStream:
    """Turns a request's growing output into text deltas, holding back a half-decoded
    multi-byte character until its last byte arrives, and text that may begin a stop word
    until it is known not to (so the streamed text equals the complete one)."""

    def __init__(self, engine: InferenceEngine):
        self.engine = engine
        self.sent = 0

    def delta(self, request, final: bool = False) -> str:
        text = self.engine.decode(request)
        if not final:
            if text.endswith("\ufffd"):
                return ""
            text = text[: len(text) - held_back(text, request.params.stop_words)]
        out, self.sent = text[self.sent :], max(len(text), self.sent)
        return out
