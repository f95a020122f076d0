"""How a chat template writes tools, tool calls and tool results, and reads calls back.

A format rewrites a conversation with structure (a ``tools`` list, assistant ``tool_calls``,
``tool`` messages) into plain role/content messages that the template then renders as usual, so
training, chat, serving and the exported jinja template all go through the same text. It also
parses the calls out of generated text, and says how much of a growing reply must be held back
while streaming because it may be the start of a call.

``hermes`` is Qwen2.5's format (``<tools>``, ``<tool_call>``, ``<tool_response>``), the one the
chatml family uses; ``react`` is the fallback for templates with no tool syntax: a
Thought / Action / Action Input / Observation prompt, as Lagent writes it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Protocol

from xtuner_lite.errors import XtunerError
from xtuner_lite.tools.schema import ToolSpecError, normalize_call, tool_names

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

    @staticmethod
    def call_text(call: dict) -> str:
        arguments = _arguments(call)
        arguments = (
            arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        )
        return f'<tool_call>\n{{"name": "{call["name"]}", "arguments": {arguments}}}\n</tool_call>'

    @staticmethod
    def system_text(system: str | None, tools: list[dict]) -> str:
        listed = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
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

    def rewrite(
        self, messages: list[dict], tools: list[dict] | None, default_system: str | None
    ) -> list[dict]:
        if not tools and not any(m.get("tool_calls") for m in messages):
            return messages
        out: list[dict] = []
        if tools:
            system, messages = split_system(messages, default_system)
            listed = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
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


def _arguments(call: dict) -> str:
    """A call's arguments as JSON text (as transformers' ``tojson`` writes them)."""
    arguments = call["arguments"]
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def _plain(msg: dict) -> dict:
    """A message without its tool structure (role, content and ``loss`` are kept)."""
    return {k: v for k, v in msg.items() if k not in ("tool_calls", "name", "tool_call_id")}


TOOL_FORMATS: dict[str, ToolFormat] = {"hermes": HermesFormat(), "react": ReActFormat()}


def get_tool_format(name: str) -> ToolFormat:
    if name not in TOOL_FORMATS:
        raise XtunerError(f"unknown tool format {name!r} (known: {', '.join(TOOL_FORMATS)})")
    return TOOL_FORMATS[name]
