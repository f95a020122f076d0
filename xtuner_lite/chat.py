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
from xtuner_lite.tools.agent import ToolBox, run_tool_turn
from xtuner_lite.tools.builtin import Tool

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
        tools: list[Tool] | None = None,
        max_tool_rounds: int = 5,
    ):
        self.system = system
        self.options = options or GenerationOptions()
        self.history: list[dict] = []
        if tools and backend != "torch":
            raise XtunerError("--tools needs --backend torch")  # before loading anything
        self.toolbox = ToolBox(tools) if tools else None
        self.max_tool_rounds = max_tool_rounds
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

    @property
    def tools(self) -> list[dict] | None:
        return self.toolbox.schemas if self.toolbox else None

    def _prompt_ids(self, turn: list[dict]) -> list[int]:
        """Render the conversation, dropping the oldest exchanges until it fits the context."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        history = list(self.history)
        limit = self.context_length
        while True:
            ids = self.chat.prompt_ids(system + history + turn, self.tools)
            if limit is None or len(ids) + self.options.max_new_tokens <= limit or not history:
                return ids
            users = [i for i, m in enumerate(history) if m["role"] == "user"]
            history = history[users[1] :] if len(users) > 1 else []

    def _generate(self, turn: list[dict], on_text: Callable[[str], Any] | None) -> str:
        hold = self.chat.tool_format.held_back if self.toolbox else None
        stream = TextStream(self.engine, hold)

        def on_token(request, _token: int) -> None:
            if text := stream.delta(request):
                on_text(text)

        stops = self.chat.tool_format.stop_words if self.toolbox else ()
        request = self.engine.add_request(
            self._prompt_ids(turn),
            self.chat.sampling(self.options, list(stops), tools=bool(self.toolbox)),
            on_token=on_token if on_text is not None else None,
        )
        while not request.finished:
            self.engine.step()
        if on_text is not None and (rest := stream.delta(request, final=True)):
            on_text(rest)
        return self.engine.decode(request)

    def ask(
        self,
        prompt: str,
        on_text: Callable[[str], Any] | None = None,
        on_tool: Callable[[dict, str], Any] | None = None,
    ) -> str:
        """The model's answer to ``prompt``; with tools, after every call it makes has run
        (each reported to ``on_tool`` with its result)."""
        user = {"role": "user", "content": prompt}
        if self.lmdeploy is not None:
            return self._remember([user], self._ask_lmdeploy(user, on_text))
        if self.toolbox is None:
            return self._remember([user], self._generate([user], on_text))
        turn = run_tool_turn(
            lambda messages: self._generate(messages, on_text),
            [user],
            self.toolbox,
            self.chat.tool_format,
            self.max_tool_rounds,
            on_tool,
        )
        self.history += turn.messages
        return turn.answer

    def _ask_lmdeploy(self, user: dict, on_text: Callable[[str], Any] | None) -> str:
        text = self.tokenizer.decode(self._prompt_ids([user]))
        chunks = []
        for delta in self.lmdeploy.stream(
            text, self.options, self.chat.stop_ids, self.chat.stop_strings
        ):
            chunks.append(delta)
            if on_text is not None:
                on_text(delta)
        return "".join(chunks)

    def _remember(self, turn: list[dict], reply: str) -> str:
        reply = reply.strip()
        self.history += [*turn, {"role": "assistant", "content": reply}]
        return reply
