"""Multi-turn chat with a model (and optional LoRA adapter), stopping at the template's end of turn.

Generation runs on the bundled :class:`~xtuner_lite.inference.InferenceEngine`; old turns are
dropped from the prompt when the conversation outgrows the model's context.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoConfig

from xtuner_lite.errors import XtunerError
from xtuner_lite.hub import resolve_model_path
from xtuner_lite.inference import InferenceEngine, SamplingParams
from xtuner_lite.inference.chat_model import ChatModel, TextStream
from xtuner_lite.inference.grammar import GrammarError, check_grammar, json_schema_grammar
from xtuner_lite.inference.images import ImageInput
from xtuner_lite.inference.loader import quantization_kwargs
from xtuner_lite.model.precision import Precision
from xtuner_lite.toolcalling.agent import ToolBox, run_tool_turn
from xtuner_lite.toolcalling.builtin import Tool, load_tools
from xtuner_lite.values import PositiveInt

GenerationOptions = SamplingParams  # the user's decoding options: one type, one validation
_quantization = quantization_kwargs  # the name tests and older callers use
__all__ = ["ChatModel", "ChatSession", "GenerationOptions", "TextStream", "chat"]


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
        grammar: str | None = None,
        precision: Precision = "fp32",
    ):
        """``grammar``: every reply follows it (``inference/grammar.py``; with ``backend``
        torch, without tools)."""
        if grammar is not None and (tools or backend != "torch"):
            raise XtunerError("--json-schema needs --backend torch and no --tools")
        self.grammar = grammar
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
            self.chat = ChatModel.load(model, adapter, template, bits, precision=precision)
            self.engine = InferenceEngine(self.chat.model, self.chat.tokenizer)
            self.context_length = self.engine.context_length
        else:
            raise XtunerError(f"unknown backend {backend!r}; choose torch or lmdeploy")
        self.tokenizer, self.template = self.chat.tokenizer, self.chat.template

    def reset(self) -> None:
        self.history = []

    @property
    def images(self) -> ImageInput | None:
        """An image-text model's image input (None: a text model, or the LMDeploy backend)."""
        return self.chat.images

    @property
    def tools(self) -> list[dict] | None:
        return self.toolbox.schemas if self.toolbox else None

    def _prompt(self, turn: list[dict]) -> tuple[list[int], torch.Tensor | None]:
        """Render the conversation, dropping the oldest exchanges until it fits the context;
        (its ids, the inputs of the images it still holds, or None)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        history = list(self.history)
        limit = self.context_length
        while True:
            messages = system + history + turn
            ids, pixels = self.chat.prompt_ids(messages, self.tools), None
            if self.images is not None:
                refs = [ref for m in messages for ref in m.get("images", [])]
                ids, pixels = self.images.prompt(ids, refs)
            if limit is None or len(ids) + self.options.max_new_tokens <= limit or not history:
                return ids, pixels
            users = [i for i, m in enumerate(history) if m["role"] == "user"]
            history = history[users[1] :] if len(users) > 1 else []

    def _generate(self, turn: list[dict], on_text: Callable[[str], Any] | None) -> str:
        hold = self.chat.tool_format.held_back if self.toolbox else None
        stream = TextStream(self.engine, hold)

        def on_token(request, _token: int) -> None:
            if text := stream.delta(request):
                on_text(text)

        stops = self.chat.tool_format.stop_words if self.toolbox else ()
        ids, pixels = self._prompt(turn)
        request = self.engine.add_request(
            ids,
            self.chat.sampling(self.options, list(stops), tools=bool(self.toolbox)),
            on_token=on_token if on_text is not None else None,
            grammar=self.grammar,
            images=pixels,
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
        images: list[str] | None = None,
    ) -> str:
        """The model's answer to ``prompt``; with tools, after every call it makes has run
        (each reported to ``on_tool`` with its result). ``images``: files or data URLs shown
        with the question (an image-text model; they stay in the conversation)."""
        user = {"role": "user", "content": prompt}
        if images:
            if self.images is None:
                raise XtunerError("--image needs an image-text model on --backend torch")
            user["images"] = [str(Path(i).resolve()) if not i.startswith("data:") else i
                              for i in images]  # fmt: skip
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
        text = self.tokenizer.decode(self._prompt([user])[0])
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


def schema_file_grammar(path: str) -> str:
    """The grammar of the JSON schema in file ``path``; errors name the file."""
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
        grammar = json_schema_grammar(schema)
        check_grammar(grammar)
        return grammar
    except OSError as exc:
        raise XtunerError(f"--json-schema {path}: cannot read it ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}: {exc.msg}"
        raise XtunerError(f"--json-schema {path}: not JSON ({where})") from None
    except GrammarError as exc:
        raise XtunerError(f"--json-schema {path}: {exc}") from None


def _show_tool_call(call: dict, result: str) -> None:
    arguments = json.dumps(call["arguments"], ensure_ascii=False)
    print(f"\n[tool] {call['name']}({arguments})\n[result] {result}", flush=True)


def chat(
    model: str,
    adapter: str | None = None,
    template: str | None = None,
    bits: Literal[4, 8] | None = None,
    system: str | None = None,
    prompt: str | None = None,
    sampling: SamplingParams | None = None,
    no_stream: bool = False,
    backend: Literal["torch", "lmdeploy"] = "torch",
    tools: str | None = None,
    tools_file: str | None = None,
    max_tool_rounds: PositiveInt = 5,
    json_schema: str | None = None,
    precision: Precision = "fp32",
    image: list[str] | None = None,
) -> int:
    """Chat with a model (optionally + LoRA adapter).

    Multi-turn chat. Type RESET to clear history, EXIT to quit. With --prompt or piped stdin,
    answers once and exits.

    Args:
        model: embedded name, local HF folder or hub id
        adapter: peft adapter folder
        template: chat template name or 'auto' (default: the model's)
        bits: 4/8-bit weights (bitsandbytes)
        system: system prompt
        prompt: answer this one prompt and exit
        sampling: decoding settings (validated before the model loads)
        no_stream: print the reply when complete
        backend: torch: the bundled engine (CPU or GPU); lmdeploy: LMDeploy's pipeline
            (optional extra, CUDA GPU only)
        tools: let the model call tools, comma-separated: calculator, python, search (search
            reads text files under $XTUNER_SEARCH_DIR, default the current folder)
        tools_file: a Python file whose public functions become tools (signature and docstring
            give each one's schema)
        max_tool_rounds: tool calls per question at most
        json_schema: a JSON schema file: every reply is a JSON document valid under it
            (grammar-constrained decoding)
        precision: the weights' type: fp32, bf16, or auto (bf16 on a GPU or a CPU with native
            bf16 such as AMX or AVX512-bf16, fp16 on a GPU without bf16: faster, greedy output
            may differ from fp32's)
        image: image files (or data URLs) shown with the first question (an image-text model)
    """
    toolbox = load_tools(tools, tools_file)  # a bad name fails before the model loads
    grammar = None if json_schema is None else schema_file_grammar(json_schema)
    session = ChatSession(model, adapter=adapter, template=template, system=system,
                          options=sampling, bits=bits, backend=backend, tools=toolbox,
                          max_tool_rounds=max_tool_rounds, grammar=grammar,
                          precision=precision)  # fmt: skip
    stream = None if no_stream else (lambda text: print(text, end="", flush=True))

    pending = list(image or [])

    def ask(text: str) -> None:
        shown = pending[:]
        pending.clear()  # the images go with the first question
        reply = session.ask(text, on_text=stream, on_tool=_show_tool_call, images=shown)
        print("" if stream else reply)

    if prompt is not None or not sys.stdin.isatty():
        ask((prompt if prompt is not None else sys.stdin.read()).strip())
        return 0
    print("Chat with the model. RESET clears the history, EXIT quits.")
    while True:
        try:
            text = input("\n>>> ").strip()
        except EOFError:
            return 0
        if text == "EXIT":
            return 0
        if text == "RESET":
            session.reset()
            print("(history cleared)")
        elif text:
            ask(text)
