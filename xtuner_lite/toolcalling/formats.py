"""How a chat template writes tools, tool calls and tool results, and reads calls back.

A format rewrites a conversation with structure (a ``tools`` list, assistant ``tool_calls``,
``tool`` messages) into plain role/content messages that the template then renders as usual, so
training, chat, serving and the exported jinja template all go through the same text. It also
parses the calls out of generated text, and says how much of a growing reply must be held back
while streaming because it may be the start of a call.

``hermes`` is Qwen2.5's format (``<tools>``, ``<tool_call>``, ``<tool_response>``), the one the
chatml family uses; ``llama3_json``, ``mistral`` and ``internlm`` are the native formats of
Llama-3.1, Mistral's v3 tokenizer and InternLM2/2.5; ``react`` is the fallback for templates with
no tool syntax: a Thought / Action / Action Input / Observation prompt, as Lagent writes it.

A message with role ``raw`` is text the template emits as it is, untrained: a format's own turns
that no template role describes (Mistral's tool list and results, InternLM's plugin system turn).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Protocol

from xtuner_lite.errors import XtunerError
from xtuner_lite.toolcalling.schema import ToolSpecError, normalize_call, tool_names

HERMES_INSTRUCTIONS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
HERMES_CALL_HINT = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

REACT_INSTRUCTIONS = (
    "You can use these tools:\n{tools}\n\n"
    "To use a tool, answer exactly in this form and stop:\n"
    "Thought: what you need to do\nAction: the tool name, one of [{names}]\n"
    "Action Input: the arguments as a JSON object\n\n"
    "You will then get the result as 'Observation: ...'. When you know the answer, write:\n"
    "Thought: I know the answer\nFinal Answer: the answer"
)
LLAMA3_TOOLS_INTRO = (
    "Given the following functions, please respond with a JSON for a function call "
    "with its proper arguments that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name '
    "and its value}.Do not use variables.\n\n"
)
REACT_ACTION = re.compile(r"Action:\s*([\w.-]+)\s*\n\s*Action Input:\s*(.*?)\s*$", re.DOTALL)


@dataclass
class ParsedReply:
    """A generated reply split into its text and its tool calls; ``errors`` says why a call
    block could not be read (bad JSON, an unknown tool), to be shown to the model."""

    content: str
    calls: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class ToolFormat(Protocol):
    name: str
    stop_words: tuple[str, ...]
    keep_tokens: tuple[str, ...]  # special tokens a call is written with: kept when decoding

    def rewrite(
        self, messages: list[dict], tools: list[dict] | None, default_system: str | None
    ) -> list[dict]: ...

    def parse(self, text: str, tools: list[dict] | None) -> ParsedReply: ...

    def held_back(self, text: str) -> int: ...

    def prefill(self, name: str) -> str:
        """The start of a reply that must call a tool (``name``: that tool; "": any)."""
        ...


def has_tool_structure(messages: list[dict], tools: list[dict] | None) -> bool:
    return bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)


def split_system(messages: list[dict], default_system: str | None) -> tuple[str | None, list[dict]]:
    """(the system prompt: a leading system message's, else ``default_system``; the rest)"""
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return default_system, messages


def _system_first(
    messages: list[dict], default_system: str | None, strip: bool = False
) -> tuple[list[dict], list[dict]]:
    """([the system message, when there is a system prompt], the other messages)"""
    system, rest = split_system(messages, default_system)
    if system is None:
        return [], rest
    return [{"role": "system", "content": system.strip() if strip else system}], rest


def _partial_prefix(text: str, word: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``word``."""
    for size in range(min(len(word) - 1, len(text)), 0, -1):
        if text.endswith(word[:size]):
            return size
    return 0


def _read_calls(blocks: list, tools: list[dict] | None) -> tuple[list[dict], list[str]]:
    names = tool_names(tools) if tools else None
    calls, errors = [], []
    for i, block in enumerate(blocks):
        try:
            calls.append(normalize_call(block, names, f"tool call {i + 1}"))
        except ToolSpecError as exc:
            errors.append(f"{exc.field}: {exc.reason}")
    return calls, errors


class HermesFormat:
    """Qwen2.5's tool format; renders byte-identically to its jinja template."""

    name = "hermes"
    stop_words: tuple[str, ...] = ()
    keep_tokens: tuple[str, ...] = ()

    @staticmethod
    def call_text(call: dict) -> str:
        arguments = _arguments(call)
        return f'<tool_call>\n{{"name": "{call["name"]}", "arguments": {arguments}}}\n</tool_call>'

    @staticmethod
    def system_text(system: str | None, tools: list[dict]) -> str:
        listed = "".join("\n" + _tojson(t) for t in tools)
        head = system + "\n\n" if system is not None else ""
        return head + HERMES_INSTRUCTIONS + listed + HERMES_CALL_HINT

    def rewrite(
        self, messages: list[dict], tools: list[dict] | None, default_system: str | None
    ) -> list[dict]:
        if not has_tool_structure(messages, tools):
            return messages
        out: list[dict] = []
        if tools:
            system, messages = split_system(messages, default_system)
            out.append({"role": "system", "content": self.system_text(system, tools)})
        for msg in messages:
            if msg["role"] == "tool":
                response = f"<tool_response>\n{msg['content']}\n</tool_response>"
                if out and out[-1].get("tool_results"):
                    out[-1]["content"] += "\n" + response
                else:
                    out.append({"role": "user", "content": response, "tool_results": True})
            elif msg.get("tool_calls"):
                parts = [msg["content"]] if msg["content"] else []
                parts += [self.call_text(c) for c in msg["tool_calls"]]
                out.append({**_plain(msg), "content": "\n".join(parts)})
            else:
                out.append(_plain(msg))
        for msg in out:
            msg.pop("tool_results", None)
        return out

    def parse(self, text: str, tools: list[dict] | None) -> ParsedReply:
        start = text.find("<tool_call>")
        if start < 0:
            return ParsedReply(text.strip())
        calls, errors = _read_calls(TOOL_CALL.findall(text[start:]), tools)
        return ParsedReply(text[:start].strip(), calls, errors)

    def prefill(self, name: str) -> str:
        # ends where training text has a token boundary (before ' {"'), not inside a token
        return '<tool_call>\n{"name": "' + (f'{name}", "arguments":' if name else "")

    def held_back(self, text: str) -> int:
        start = text.find("<tool_call>")
        return len(text) - start if start >= 0 else _partial_prefix(text, "<tool_call>")


class ReActFormat:
    """Thought / Action / Action Input / Observation, for templates without tool syntax.
    Tool messages keep the template's own tool role; they gain the ``Observation:`` prefix in
    a conversation that has tools or calls."""

    name = "react"
    stop_words: tuple[str, ...] = ("Observation:",)
    keep_tokens: tuple[str, ...] = ()

    def rewrite(
        self, messages: list[dict], tools: list[dict] | None, default_system: str | None
    ) -> list[dict]:
        if not tools and not any(m.get("tool_calls") for m in messages):
            return messages
        out: list[dict] = []
        if tools:
            system, messages = split_system(messages, default_system)
            listed = "\n".join(_tojson(t["function"]) for t in tools)
            names = ", ".join(tool_names(tools))
            text = REACT_INSTRUCTIONS.format(tools=listed, names=names)
            out.append({"role": "system", "content": f"{system}\n\n{text}" if system else text})
        for msg in messages:
            if msg["role"] == "tool":
                out.append({"role": "tool", "content": f"Observation: {msg['content']}"})
            elif msg.get("tool_calls"):
                thought = msg["content"] or "I should use a tool."
                actions = [
                    f"Action: {c['name']}\nAction Input: {_arguments(c)}" for c in msg["tool_calls"]
                ]
                content = f"Thought: {thought}\n" + "\n".join(actions)
                out.append({**_plain(msg), "content": content})
            elif msg["role"] == "assistant" and tools:
                out.append({**_plain(msg), "content": f"Final Answer: {msg['content']}"})
            else:
                out.append(_plain(msg))
        return out

    def parse(self, text: str, tools: list[dict] | None) -> ParsedReply:
        text = text.split("Observation:")[0]
        found = REACT_ACTION.search(text.strip())
        if found is None:
            answer = text.split("Final Answer:", 1)[-1]
            return ParsedReply(answer.strip())
        calls, errors = _read_calls([{"name": found[1], "arguments": found[2]}], tools)
        thought = text[: text.find("Action:")].replace("Thought:", "").strip()
        return ParsedReply(thought, calls, errors)

    def prefill(self, name: str) -> str:
        return "Thought: I need a tool.\nAction:" + (f" {name}\nAction Input:" if name else "")

    def held_back(self, text: str) -> int:
        start = text.find("Action:")
        return len(text) - start if start >= 0 else _partial_prefix(text, "Action:")


class Llama3JsonFormat:
    """Llama-3.1's JSON tool calls, as its published chat template writes them: the tool list
    (indented JSON) opens the first user turn, a call is the whole reply
    ``{"name": …, "parameters": {…}}``, results come back JSON-encoded in the ``ipython`` role.
    The template adds ``Environment: ipython`` to its system turn when tools are given
    (``ChatTemplate.tools_system``). One call per reply, as the model was trained."""

    name = "llama3_json"
    stop_words: tuple[str, ...] = ()
    keep_tokens: tuple[str, ...] = ()
    OPENING = '{"name": "'

    @staticmethod
    def call_text(call: dict) -> str:
        arguments = _tojson(call["arguments"])
        return f'{{"name": "{call["name"]}", "parameters": {arguments}}}'

    def rewrite(
        self, messages: list[dict], tools: list[dict] | None, default_system: str | None
    ) -> list[dict]:
        if not has_tool_structure(messages, tools):
            return messages
        out, rest = _system_first(messages, default_system, strip=True)
        if tools:
            if not rest or rest[0]["role"] != "user":
                raise XtunerError("Llama-3.1's tool format puts the tools in a first user turn")
            listed = "".join(_tojson(t, indent=4) + "\n\n" for t in tools)
            first = {**rest[0], "content": LLAMA3_TOOLS_INTRO + listed + rest[0]["content"].strip()}
            rest = [first, *rest[1:]]
        for msg in rest:
            if msg["role"] == "tool":
                out.append({"role": "tool", "content": _tojson(msg["content"])})
            elif msg.get("tool_calls"):
                if len(msg["tool_calls"]) != 1:
                    raise XtunerError(
                        "Llama-3.1's tool format takes one tool call per assistant turn, "
                        f"got {len(msg['tool_calls'])}"
                    )
                out.append({**_plain(msg), "content": self.call_text(msg["tool_calls"][0])})
            else:
                out.append(_plain(msg))
        return out

    def parse(self, text: str, tools: list[dict] | None) -> ParsedReply:
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if not body.startswith(self.OPENING[:2]):
            return ParsedReply(text.strip())
        try:
            call = _first_json(body)
        except json.JSONDecodeError as exc:
            return ParsedReply("", [], [f"tool call 1: not valid JSON ({exc.msg})"])
        if not isinstance(call, dict) or "name" not in call:
            return ParsedReply(text.strip())
        call = {"name": call["name"], "arguments": call.get("parameters", call.get("arguments"))}
        calls, errors = _read_calls([call], tools)
        return ParsedReply("", calls, errors)

    def prefill(self, name: str) -> str:
        return self.OPENING + (f'{name}", "parameters":' if name else "")

    def held_back(self, text: str) -> int:
        # a call is the whole reply: hold it while it may still become one
        body = text.lstrip()
        if body.startswith(self.OPENING[:2]) or self.OPENING.startswith(body):
            return len(text)
        return 0


class MistralFormat:
    """Mistral's v3 tokenizer format, as Mistral-7B-Instruct-v0.3's chat template writes it:
    ``[AVAILABLE_TOOLS] […][/AVAILABLE_TOOLS]`` before the last user turn, calls as
    ``[TOOL_CALLS] [{"name", "arguments", "id"}]``, results as
    ``[TOOL_RESULTS] {"content": …, "call_id": …}[/TOOL_RESULTS]``, call ids of 9 letters and
    digits (made from the call's position when the data has none). The system prompt and the
    space before a reply belong to this layout too (the system prompt joins the last user turn
    when that turn ends the conversation), so this rewrite runs on every conversation."""

    name = "mistral"
    stop_words: tuple[str, ...] = ()
    keep_tokens: tuple[str, ...] = ("[TOOL_CALLS]",)
    OPENING = "[TOOL_CALLS]"

    @staticmethod
    def tools_text(tools: list[dict]) -> str:
        listed = []
        for tool in tools:
            fields = [
                f'"{key}": "{value}"' if isinstance(value, str) else f'"{key}": {_tojson(value)}'
                for key, value in tool["function"].items()
                if key != "return"
            ]
            listed.append('{"type": "function", "function": {' + ", ".join(fields) + "}}")
        return "[AVAILABLE_TOOLS] [" + ", ".join(listed) + "][/AVAILABLE_TOOLS]"

    @staticmethod
    def calls_text(calls: list[dict], ids: list[str]) -> str:
        written = [
            _tojson({"name": c["name"], "arguments": c["arguments"]})[:-1] + f', "id": "{i}"}}'
            for c, i in zip(calls, ids)
        ]
        return "[TOOL_CALLS] [" + ", ".join(written) + "]"

    def rewrite(
        self, messages: list[dict], tools: list[dict] | None, default_system: str | None
    ) -> list[dict]:
        system, rest = split_system(messages, default_system)
        users = [i for i, m in enumerate(rest) if m["role"] == "user"]
        out: list[dict] = []
        for i, (msg, call_id) in enumerate(zip(rest, call_ids(rest))):
            if msg["role"] == "user":
                content = msg["content"]
                if tools and i == users[-1]:
                    out.append({"role": "raw", "content": self.tools_text(tools)})
                if system is not None and i == len(rest) - 1:
                    content = f"{system}\n\n{content}"
                out.append({**_plain(msg), "content": content})
            elif msg["role"] == "tool":
                text = f'[TOOL_RESULTS] {{"content": {msg["content"]}, "call_id": "{call_id}"}}'
                out.append({"role": "raw", "content": text + "[/TOOL_RESULTS]"})
            elif msg.get("tool_calls"):
                content = self.calls_text(msg["tool_calls"], call_id)
                out.append({**_plain(msg), "content": content})
            elif msg["role"] == "assistant":
                out.append({**_plain(msg), "content": " " + msg["content"].strip()})
            else:
                out.append(_plain(msg))
        return out

    def parse(self, text: str, tools: list[dict] | None) -> ParsedReply:
        start = text.find(self.OPENING)
        if start < 0:
            return ParsedReply(text.strip())
        body = text[start + len(self.OPENING) :].strip()
        try:
            blocks = _first_json(body)
        except json.JSONDecodeError as exc:
            return ParsedReply(
                text[:start].strip(), [], [f"tool calls: not valid JSON ({exc.msg})"]
            )
        blocks = blocks if isinstance(blocks, list) else [blocks]
        calls, errors = _read_calls(
            [
                {k: v for k, v in b.items() if k != "id"} if isinstance(b, dict) else b
                for b in blocks
            ],
            tools,
        )
        return ParsedReply(text[:start].strip(), calls, errors)

    def prefill(self, name: str) -> str:
        return self.OPENING + ' [{"name": "' + (f'{name}", "arguments":' if name else "")

    def held_back(self, text: str) -> int:
        start = text.find(self.OPENING)
        return len(text) - start if start >= 0 else _partial_prefix(text, self.OPENING)


class InternLMFormat:
    """InternLM2/2.5's plugin format (its chat-format guide, as Lagent and LMDeploy write it):
    the tool list in a ``system name=<|plugin|>`` turn, a call as
    ``<|action_start|><|plugin|>\n{"name": …, "parameters": {…}}<|action_end|>`` after the
    reply's text, results in an ``environment name=<|plugin|>`` turn (the template's tool
    role)."""

    name = "internlm"
    stop_words: tuple[str, ...] = ()
    keep_tokens: tuple[str, ...] = ("<|action_start|>", "<|plugin|>", "<|action_end|>")
    OPENING = "<|action_start|><|plugin|>"
    ACTION = re.compile(
        r"<\|action_start\|>\s*<\|plugin\|>\s*(.*?)\s*(?:<\|action_end\|>|$)", re.DOTALL
    )

    def call_text(self, call: dict) -> str:
        body = _tojson({"name": call["name"], "parameters": call["arguments"]})
        return f"{self.OPENING}\n{body}<|action_end|>"

    def rewrite(
        self, messages: list[dict], tools: list[dict] | None, default_system: str | None
    ) -> list[dict]:
        if not has_tool_structure(messages, tools):
            return messages
        out, rest = _system_first(messages, default_system)
        if tools:
            listed = _tojson([t["function"] for t in tools], indent=4)
            out.append(
                {
                    "role": "raw",
                    "content": f"<|im_start|>system name=<|plugin|>\n{listed}<|im_end|>\n",
                }
            )
        for msg in rest:
            if msg.get("tool_calls"):
                content = msg["content"] + "".join(self.call_text(c) for c in msg["tool_calls"])
                out.append({**_plain(msg), "content": content})
            else:
                out.append(_plain(msg))
        return out

    def parse(self, text: str, tools: list[dict] | None) -> ParsedReply:
        start = text.find("<|action_start|>")
        if start < 0:
            return ParsedReply(text.strip())
        blocks = []
        for body in self.ACTION.findall(text[start:]):
            try:
                block = json.loads(body)
            except json.JSONDecodeError:
                blocks.append(body)  # _read_calls reports it
                continue
            if isinstance(block, dict) and "parameters" in block:
                block = {"name": block.get("name"), "arguments": block["parameters"]}
            blocks.append(block)
        calls, errors = _read_calls(blocks, tools)
        return ParsedReply(text[:start].strip(), calls, errors)

    def prefill(self, name: str) -> str:
        return self.OPENING + '\n{"name": "' + (f'{name}", "parameters":' if name else "")

    def held_back(self, text: str) -> int:
        start = text.find("<|action_start|>")
        return len(text) - start if start >= 0 else _partial_prefix(text, "<|action_start|>")


def call_ids(messages: list[dict]) -> list:
    """Per message: its calls' ids (a list) for an assistant message with calls, the id of the
    call it answers for a tool message (calls answered in order), else None. An id the data
    gives (9 letters and digits) is kept; a missing one is made from the call's position."""
    out: list = []
    pending: list[str] = []
    count = 0
    for msg in messages:
        if msg.get("tool_calls"):
            ids = []
            for call in msg["tool_calls"]:
                given = str(call.get("id") or "")
                ids.append(given if len(given) == 9 and given.isalnum() else _made_id(count))
                count += 1
            out.append(ids)
            pending = list(ids)
        elif msg["role"] == "tool":
            given = str(msg.get("tool_call_id") or "")
            made = pending.pop(0) if pending else _made_id(count)
            out.append(given if len(given) == 9 and given.isalnum() else made)
        else:
            out.append(None)
    return out


def _first_json(text: str):
    """The JSON value ``text`` starts with; text after it (a model running on) is ignored."""
    return json.JSONDecoder().raw_decode(text)[0]


def _made_id(position: int) -> str:
    return hashlib.sha1(f"call {position}".encode()).hexdigest()[:9]


def _tojson(value, indent: int | None = None) -> str:
    """As transformers' ``tojson`` filter writes a value."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _arguments(call: dict) -> str:
    """A call's arguments as JSON text (as transformers' ``tojson`` writes them)."""
    arguments = call["arguments"]
    return arguments if isinstance(arguments, str) else _tojson(arguments)


def _plain(msg: dict) -> dict:
    """A message without its tool structure (role, content and ``loss`` are kept)."""
    return {k: v for k, v in msg.items() if k not in ("tool_calls", "name", "tool_call_id")}


TOOL_FORMATS: dict[str, ToolFormat] = {
    "hermes": HermesFormat(),
    "llama3_json": Llama3JsonFormat(),
    "mistral": MistralFormat(),
    "internlm": InternLMFormat(),
    "react": ReActFormat(),
}


def get_tool_format(name: str) -> ToolFormat:
    if name not in TOOL_FORMATS:
        raise XtunerError(f"unknown tool format {name!r} (known: {', '.join(TOOL_FORMATS)})")
    return TOOL_FORMATS[name]
