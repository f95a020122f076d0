"""Multi-turn chat with a model (and optional LoRA adapter), stopping at the template's end of turn.

Generation runs on the bundled :class:`~xtuner_lite.inference.InferenceEngine`; old turns are
dropped from the prompt when the conversation outgrows the model's context.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import AutoConfig

from xtuner_lite.errors import XtunerError
from xtuner_lite.hub import resolve_model_path
from xtuner_lite.inference import InferenceEngine, SamplingParams
from xtuner_lite.inference.chat_model import ChatModel, TextStream
from xtuner_lite.inference.loader import quantization_kwargs

GenerationOptions = SamplingParams  # the user's decoding options: one type, one validation
_quantization = quantization_kwargs  # the name tests and older callers use
__all__ = ["ChatModel", "ChatSession", "GenerationOptions", "TextStream"]


class ChatSession:
    """Holds the model, template and conversation history; ``ask`` returns the reply."""

    def __init__(
        self,
        model: str,
        adapter: str | None = None,
        template: str | None = None,
        system: str | None = None,
        options: GenerationOptions | None = None,
        bits: int | None = None,
        backend: str = "torch",
    ):
        self.system = system
        self.options = options or GenerationOptions()
        self.history: list[dict[str, str]] = []
        self.lmdeploy = None
        if backend == "lmdeploy":
            # LMDeploy is an optional GPU-only extra
            from xtuner_lite.inference.lmdeploy_backend import LMDeployGenerator, require_lmdeploy

            require_lmdeploy()  # before loading anything
            if bits is not None:
                raise XtunerError(
                    "--bits is for --backend torch; LMDeploy quantizes a model "
                    "ahead of time with `lmdeploy lite auto_awq`"
                )
            self.chat = ChatModel.load(model, adapter, template, weights=False)
            path = resolve_model_path(model)
            self.lmdeploy = LMDeployGenerator(path, adapter)

            self.context_length = getattr(
                AutoConfig.from_pretrained(path), "max_position_embeddings", None
            )
        elif backend == "torch":
            self.chat = ChatModel.load(model, adapter, template, bits)
            self.engine = InferenceEngine(self.chat.model, self.chat.tokenizer)
            self.context_length = self.engine.context_length
        else:
            raise XtunerError(f"unknown backend {backend!r}; choose torch or lmdeploy")
        self.tokenizer, self.template = self.chat.tokenizer, self.chat.template

    def reset(self) -> None:
        self.history = []

    def _messages(self, prompt: str, history: list[dict[str, str]]) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + history + [{"role": "user", "content": prompt}]

    def _prompt_ids(self, prompt: str) -> list[int]:
        """Render the conversation, dropping the oldest exchanges until it fits the context."""
        history = list(self.history)
        limit = self.context_length
        while True:
            ids = self.chat.prompt_ids(self._messages(prompt, history))
            if limit is None or len(ids) + self.options.max_new_tokens <= limit or not history:
                return ids
            history = history[2:]

    def ask(self, prompt: str, on_text: Callable[[str], Any] | None = None) -> str:
        if self.lmdeploy is not None:
            return self._remember(prompt, self._ask_lmdeploy(prompt, on_text))
        stream = TextStream(self.engine)

        def on_token(request, _token: int) -> None:
            if text := stream.delta(request):
                on_text(text)

        request = self.engine.add_request(
            self._prompt_ids(prompt),
            self.chat.sampling(self.options),
            on_token=on_token if on_text is not None else None,
        )
        while not request.finished:
            self.engine.step()
        if on_text is not None and (rest := stream.delta(request, final=True)):
            on_text(rest)
        return self._remember(prompt, self.engine.decode(request))

    def _ask_lmdeploy(self, prompt: str, on_text: Callable[[str], Any] | None) -> str:
        text = self.tokenizer.decode(self._prompt_ids(prompt))
        chunks = []
        for delta in self.lmdeploy.stream(
            text, self.options, self.chat.stop_ids, self.chat.stop_strings
        ):
            chunks.append(delta)
            if on_text is not None:
                on_text(delta)
        return "".join(chunks)

    def _remember(self, prompt: str, reply: str) -> str:
        reply = reply.strip()
        self.history += [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": reply},
        ]
        return reply
