"""A model ready to chat: weights, tokenizer, the template it was trained with and where a turn
ends; and streaming its output as text. Shared by ``xtuner chat`` and ``xtuner serve``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from xtuner_lite.data import control
from xtuner_lite.data.images import IMAGE_TOKEN, placed_before
from xtuner_lite.data.templates import Template
from xtuner_lite.inference.engine import InferenceEngine
from xtuner_lite.inference.images import ImageInput, image_input_for
from xtuner_lite.inference.loader import load_for_inference
from xtuner_lite.inference.sampling import SamplingParams
from xtuner_lite.model.precision import Precision, inference_dtype
from xtuner_lite.toolcalling.formats import ToolFormat, get_tool_format


@dataclass
class ChatModel:
    """A loaded model with the template it chats in and where that template ends a turn."""

    model: Any
    tokenizer: Any
    template: Template
    stop_ids: list[int]
    stop_strings: list[str]  # stop words that are not single tokens
    images: ImageInput | None = None  # an image-text model's image tokens and processor

    @classmethod
    def load(
        cls,
        model: str,
        adapter: str | None = None,
        template: str | None = None,
        bits: int | None = None,
        weights: bool = True,
        precision: Precision = "fp32",
    ) -> ChatModel:
        """The template recorded by ``xtuner train`` is the default (see
        ``loader.template_name``). ``weights=False`` loads only the tokenizer and template
        (another engine holds the model)."""
        dtype = inference_dtype(precision)
        loaded = load_for_inference(
            model, adapter, template, dtype=dtype, bits=bits, weights=weights
        )
        vocab = loaded.tokenizer.get_vocab()
        images = image_input_for(loaded.model, loaded.tokenizer, model, adapter)
        return cls(
            loaded.model,
            loaded.tokenizer,
            loaded.template,
            loaded.stop_ids,
            [w for w in loaded.template.stop_words(loaded.tokenizer) if w not in vocab],
            images,
        )

    @property
    def tool_format(self) -> ToolFormat:
        return get_tool_format(self.template.tool_format)

    def prompt_ids(
        self, messages: list[dict], tools: list[dict] | None = None, prefill: str = ""
    ) -> list[int]:
        """The conversation rendered (with ``tools`` in the template's tool format) and
        tokenized, followed by ``prefill``, the start of the reply; chat-control tokens typed
        inside a message, a tool call or a tool's schema are escaped, so no text a client sends
        can open or close a turn. A message's ``images`` (an image-text model's) put one image
        token each before its text, after the escaping: only an attached image makes one."""
        tokens = control.control_tokens(self.tokenizer)
        placeholder = self.images.placeholder if self.images is not None else IMAGE_TOKEN
        messages = [_with_images(control.escape_values(m, tokens), placeholder) for m in messages]
        tools = control.escape_values(tools, tokens)
        text = self.template.render_prompt(messages, self.tokenizer, tools) + prefill
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def sampling(
        self, options: SamplingParams, stop_words: list[str] = (), tools: bool = False
    ) -> SamplingParams:
        """``options`` validated, with the template's stops and ``stop_words`` added; with
        ``tools``, the special tokens its tool format writes calls with stay in the text."""
        vocab = self.tokenizer.get_vocab() if tools else {}
        keep = [vocab[t] for t in self.tool_format.keep_tokens if t in vocab]
        return dataclasses.replace(
            options.validate(),
            stop_token_ids=list(self.stop_ids),
            stop_words=self.stop_strings + list(options.stop_words) + list(stop_words),
            keep_token_ids=keep,
        )


def _with_images(message: dict, placeholder: str) -> dict:
    """A message whose ``images`` become the model's image placeholders before its text
    (LLaVA's order), the list itself dropped from what the template renders."""
    images = message.get("images")
    if not images:
        return message
    rest = {k: v for k, v in message.items() if k != "images"}
    return {**rest, "content": placed_before(message["content"], len(images), placeholder)}


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
    until it is known not to (so the streamed text equals the complete one). With ``hold``,
    text from where a tool call begins is not streamed at all."""

    def __init__(self, engine: InferenceEngine, hold: Callable[[str], int] | None = None):
        self.engine = engine
        self.hold = hold  # how much of the end is never streamed as text (a tool call)
        self.sent = 0

    def delta(self, request, final: bool = False) -> str:
        text = self.engine.decode(request)
        if not final:
            if text.endswith("\ufffd"):
                return ""
            text = text[: len(text) - held_back(text, request.params.stop_words)]
        if self.hold is not None:
            text = text[: len(text) - self.hold(text)]
        out, self.sent = text[self.sent :], max(len(text), self.sent)
        return out
