"""The tool loop: generate, run the calls the reply makes, feed the results back, until the
model answers. Shared by ``xtuner chat --tools`` and the tool-use evaluation; the server leaves
running tools to its client, as OpenAI's API does."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xtuner_lite.toolcalling.builtin import Tool
from xtuner_lite.toolcalling.formats import ParsedReply, ToolFormat

MAX_RESULT_CHARS = 4000  # a tool result longer than this is cut before it reaches the prompt
TOOL_TIMEOUT = 30.0  # wall-clock seconds a tool call may take before the model is told it failed

Generate = Callable[[list[dict]], str]  # the conversation so far → the model's reply text
GenerateBatch = Callable[[list[list[dict]]], list[str]]  # many conversations → their replies


class ToolBox:
    """Tools by name; running one never raises: a failure comes back as an ``error:`` text the
    model reads, so a bad call cannot stop a chat or a server. Each call has ``timeout`` seconds
    of wall-clock time (a Python function cannot be stopped from outside: one that overruns is
    left to finish in the background, and its result is dropped)."""

    def __init__(self, tools: list[Tool], timeout: float = TOOL_TIMEOUT):
        self.tools = {t.name: t for t in tools}
        self.timeout = timeout

    @property
    def schemas(self) -> list[dict]:
        return [t.schema for t in self.tools.values()]

    def run(self, call: dict) -> str:
        tool = self.tools.get(call["name"])
        if tool is None:
            return f"error: there is no tool {call['name']!r} (tools: {', '.join(self.tools)})"
        outcome: list[str] = []
        worker = threading.Thread(target=_call, args=(tool, call["arguments"], outcome),
                                  name=f"tool-{tool.name}", daemon=True)  # fmt: skip
        worker.start()
        worker.join(self.timeout)
        if not outcome:
            return f"error: {tool.name} did not finish within {self.timeout:g} s"
        text = outcome[0]
        return text if len(text) <= MAX_RESULT_CHARS else text[:MAX_RESULT_CHARS] + " ... (cut)"


def _call(tool: Tool, arguments: dict, outcome: list[str]) -> None:
    """Run one call in the worker thread; its result, or its failure, as text."""
    try:
        result = tool.fn(**arguments)
        outcome.append(result if isinstance(result, str) else json.dumps(result, default=str))
    except TypeError as exc:
        outcome.append(f"error: bad arguments for {tool.name}: {exc}")
    except BaseException as exc:  # noqa: BLE001 - even sys.exit() is the model's to read
        outcome.append(f"error: {type(exc).__name__}: {exc}")


@dataclass
class ToolTurn:
    """One user turn with tools: the messages it added and the final answer."""

    messages: list[dict] = field(default_factory=list)
    answer: str = ""
    calls: list[dict] = field(default_factory=list)  # every call made, in order


def reply_message(parsed: ParsedReply, raw: str) -> dict:
    """The assistant message for a reply: its calls, or the raw text where no call could be
    read (the model sees what it wrote next to the error)."""
    if parsed.calls:
        return {"role": "assistant", "content": parsed.content, "tool_calls": parsed.calls}
    return {"role": "assistant", "content": raw.strip()}


def take_reply(
    turn: ToolTurn,
    raw: str,
    toolbox: ToolBox,
    tool_format: ToolFormat,
    on_call: Callable[[dict, str], Any] | None = None,
) -> bool:
    """One round of the loop: add the reply ``raw`` to ``turn`` and run its calls, their
    results added too. True when the reply is the answer (no call, nothing unreadable)."""
    parsed = tool_format.parse(raw, toolbox.schemas)
    if not parsed.calls and not parsed.errors:
        turn.answer = parsed.content
        return True
    turn.messages.append(reply_message(parsed, raw))
    for call in parsed.calls:
        result = toolbox.run(call)
        turn.calls.append(call)
        if on_call is not None:
            on_call(call, result)
        turn.messages.append({"role": "tool", "content": result, "name": call["name"]})
    for error in parsed.errors:
        if on_call is not None:
            on_call({"name": "(unreadable call)", "arguments": {}}, f"error: {error}")
        turn.messages.append({"role": "tool", "content": f"error: {error}"})
    return False


def close_turn(turn: ToolTurn, answered: bool) -> None:
    """End the turn with its answer (a note instead when the rounds ran out)."""
    if not answered:
        turn.answer = "(stopped: the model kept calling tools)"
    turn.messages.append({"role": "assistant", "content": turn.answer})


def run_tool_turn(
    generate: Generate,
    messages: list[dict],
    toolbox: ToolBox,
    tool_format: ToolFormat,
    max_rounds: int = 5,
    on_call: Callable[[dict, str], Any] | None = None,
) -> ToolTurn:
    """Generate until the model answers without a call, or ``max_rounds`` rounds of calls."""

    def one_by_one(conversations: list[list[dict]]) -> list[str]:
        return [generate(c) for c in conversations]

    return run_tool_turns(one_by_one, [messages], toolbox, tool_format, max_rounds, on_call)[0]


def run_tool_turns(
    generate: GenerateBatch,
    conversations: list[list[dict]],
    toolbox: ToolBox,
    tool_format: ToolFormat,
    max_rounds: int = 5,
    on_call: Callable[[dict, str], Any] | None = None,
) -> list[ToolTurn]:
    """:func:`run_tool_turn` for many conversations in lockstep: each round generates the
    replies of every conversation still calling tools in one batch."""
    turns = [ToolTurn() for _ in conversations]
    pending = list(range(len(conversations)))
    for _ in range(max_rounds):
        if not pending:
            break
        replies = generate([conversations[i] + turns[i].messages for i in pending])
        answered = [take_reply(turns[i], raw, toolbox, tool_format, on_call)
                    for i, raw in zip(pending, replies)]  # fmt: skip
        pending = [i for i, done in zip(pending, answered) if not done]
    for i, turn in enumerate(turns):
        close_turn(turn, answered=i not in pending)
    return turns
