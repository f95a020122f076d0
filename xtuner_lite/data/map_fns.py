"""Stage 2: dataset map fns turn one raw row into the conversation schema.

The schema is ``{"messages": [{"role": ..., "content": str, "loss": bool (optional)}, ...]}``
with roles ``system``, ``user``, ``assistant``, ``tool``; or one ``text`` message for plain-text
pretraining (every token trained). A map fn raises :class:`RowError` naming the bad field;
users may pass any callable with the same contract.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from xtuner_lite.errors import RowError, XtunerError, did_you_mean
from xtuner_lite.toolcalling.schema import normalize_call, normalize_tools, tool_names

Conversation = dict[str, list[dict[str, Any]]]
MapFn = Callable[[Any], Conversation]

ROLES = ("system", "user", "assistant", "tool", "text")


def as_object(row: Any) -> dict:
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object, got {type(row).__name__}")
    return row


def string_field(row: dict, key: str, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise RowError("missing", field=key)
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"expected a string, got {type(value).__name__}", field=key)
    return value


def user_turn(instruction: str, inp: str) -> str:
    return f"{instruction}\n{inp}" if inp else instruction


def system_messages(row: dict) -> list[dict]:
    system = string_field(row, "system", required=False)
    return [{"role": "system", "content": system}] if system else []


def alpaca_map_fn(row: Any) -> Conversation:
    """Alpaca ``{instruction, input, output[, system]}`` → one user/assistant turn."""
    row = as_object(row)
    user = user_turn(string_field(row, "instruction"), string_field(row, "input", required=False))
    return {
        "messages": system_messages(row)
        + [
            {"role": "user", "content": user},
            {"role": "assistant", "content": string_field(row, "output")},
        ]
    }


def alpaca_zh_map_fn(row: Any) -> Conversation:
    """Chinese Alpaca: ``instruction_zh/input_zh/output_zh`` (alpaca-gpt4-chinese) or plain keys."""
    row = as_object(row)
    if "instruction_zh" in row:
        row = {
            "instruction": row.get("instruction_zh"),
            "input": row.get("input_zh"),
            "output": row.get("output_zh"),
            "system": row.get("system"),
        }
    return alpaca_map_fn(row)


def history_map_fn(row: Any) -> Conversation:
    """Alpaca plus ``history: [[user, assistant], ...]`` (oasst1, LIMA in LLaMA-Factory form)."""
    row = as_object(row)
    history = row.get("history") or []
    if not isinstance(history, list):
        raise RowError(
            f"expected a list of [user, assistant] pairs, got {type(history).__name__}",
            field="history",
        )
    messages = system_messages(row)
    for i, pair in enumerate(history):
        if not (
            isinstance(pair, (list, tuple))
            and len(pair) == 2
            and all(isinstance(x, str) for x in pair)
        ):
            raise RowError(f"item {i} is not a [user, assistant] pair of strings", field="history")
        messages += [
            {"role": "user", "content": pair[0]},
            {"role": "assistant", "content": pair[1]},
        ]
    last = alpaca_map_fn({k: row.get(k) for k in ("instruction", "input", "output")})
    messages += last["messages"]
    return {"messages": messages}


def openai_map_fn(row: Any) -> Conversation:
    """OpenAI ``messages: [{role, content, loss?}]`` (or a bare list of them), with assistant
    ``tool_calls`` and ``tool`` messages, and the row's ``tools``."""
    messages = row if isinstance(row, list) else as_object(row).get("messages")
    if messages is None:
        raise RowError("missing", field="messages")
    if not isinstance(messages, list):
        raise RowError(f"expected a list, got {type(messages).__name__}", field="messages")
    tools = normalize_tools(row.get("tools") if isinstance(row, dict) else None)
    names = tool_names(tools) if tools else None
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise RowError(f"item {i} is not an object", field="messages")
        role = msg.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise RowError(
                f"item {i} has role {role!r}; expected system/user/assistant/tool",
                field=f"messages[{i}].role",
            )
        content = msg.get("content")
        if content is None and msg.get("tool_calls"):
            content = ""
        if not isinstance(content, str):
            raise RowError(
                f"expected a string, got {type(content).__name__}", field=f"messages[{i}].content"
            )
        item = {"role": role, "content": content}
        if msg.get("tool_calls"):
            item["tool_calls"] = _calls(msg["tool_calls"], names, f"messages[{i}].tool_calls")
        if "loss" in msg:
            if not isinstance(msg["loss"], bool):
                raise RowError("expected true or false", field=f"messages[{i}].loss")
            item["loss"] = msg["loss"]
        out.append(item)
    return _with_tools({"messages": out}, tools)


def _calls(calls: Any, names: list[str] | None, field: str) -> list[dict]:
    """A list of tool calls (or one call) in any accepted form, normalized."""
    calls = calls if isinstance(calls, list) else [calls]
    if not calls:
        raise RowError("an empty list of tool calls", field=field)
    return [normalize_call(c, names, f"{field}[{i}]") for i, c in enumerate(calls)]


def _with_tools(conv: Conversation, tools: list[dict]) -> Conversation:
    return {**conv, "tools": tools} if tools else conv


SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "system": "system",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}


def sharegpt_map_fn(row: Any) -> Conversation:
    """ShareGPT ``conversations: [{from, value}]``, with LLaMA-Factory's tool turns.

    A ``function_call`` turn is the model's own output: its value (a JSON call, or a list of
    calls) becomes the assistant's ``tool_calls`` and is trained; an ``observation`` is a tool
    result, kept as untrained context; the ``tools`` field (glaive: a JSON string) gives the
    schemas, and a call to a tool not in it is an error naming the turn.
    """
    row = as_object(row)
    turns = row.get("conversations")
    if turns is None:
        raise RowError("missing", field="conversations")
    if not isinstance(turns, list):
        raise RowError(f"expected a list, got {type(turns).__name__}", field="conversations")
    tools = normalize_tools(row.get("tools"))
    names = tool_names(tools) if tools else None
    messages = system_messages(row)
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError(f"item {i} is not an object", field="conversations")
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise RowError(
                f"item {i} has unknown speaker {speaker!r}; expected one of "
                f"{sorted(SHAREGPT_ROLES)}",
                field=f"conversations[{i}].from",
            )
        value = turn.get("value")
        if not isinstance(value, str):
            raise RowError(
                f"expected a string, got {type(value).__name__}", field=f"conversations[{i}].value"
            )
        if speaker == "function_call":
            calls = _calls(_json_value(value, i), names, f"conversations[{i}].value")
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
        else:
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    return _with_tools({"messages": messages}, tools)


def _json_value(value: str, i: int) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise RowError(
            f"a function_call must be JSON ({exc.msg})", field=f"conversations[{i}].value"
        ) from None


def pretrain_map_fn(row: Any) -> Conversation:
    """Plain text for incremental pretraining: ``{text}`` or a bare string; every token trained."""
    text = row if isinstance(row, str) else string_field(as_object(row), "text")
    return {"messages": [{"role": "text", "content": text}]}


MAP_FNS: dict[str, MapFn] = {
    "alpaca": alpaca_map_fn,
    "alpaca_zh": alpaca_zh_map_fn,
    "history": history_map_fn,
    "oasst1": history_map_fn,
    "openai": openai_map_fn,
    "sharegpt": sharegpt_map_fn,
    "pretrain": pretrain_map_fn,
}


def pick_map_fn(map_fn: str | Callable, registry: dict[str, Callable], unknown: str) -> Callable:
    """A callable as it is, else the registry's entry of that name; an unknown name is an
    error starting with ``unknown`` and naming the closest known one."""
    if callable(map_fn):
        return map_fn
    if map_fn not in registry:
        raise XtunerError(
            f"{unknown} {map_fn!r}"
            + did_you_mean(str(map_fn), registry)
            + f" (known: {', '.join(sorted(registry))}, or pass a function)"
        )
    return registry[map_fn]


def get_map_fn(map_fn: str | MapFn) -> MapFn:
    return pick_map_fn(map_fn, MAP_FNS, "unknown map_fn")


def validate_conversation(conv: Any) -> tuple[list[dict], list[dict] | None]:
    """Check a map fn's output; raise RowError naming what is wrong. Returns the messages and
    the conversation's tools (``None`` without)."""
    if not isinstance(conv, dict) or not isinstance(conv.get("messages"), list):
        raise RowError("map fn must return {'messages': [...]}")
    messages = conv["messages"]
    if not messages:
        raise RowError("conversation has no messages", field="messages")
    tools = normalize_tools(conv.get("tools")) or None
    names = tool_names(tools) if tools else None
    for i, msg in enumerate(messages):
        if msg.get("role") not in ROLES or not isinstance(msg.get("content"), str):
            raise RowError(
                f"message {i} must have a role in {ROLES} and string content", field="messages"
            )
        if msg.get("tool_calls"):
            if msg["role"] != "assistant":
                raise RowError("only assistant messages make tool calls", field=f"messages[{i}]")
            msg["tool_calls"] = _calls(msg["tool_calls"], names, f"messages[{i}].tool_calls")
    if messages[0]["role"] != "text" and not any(is_trained(m) for m in messages):
        raise RowError("no assistant turn to train on", field="messages")
    return messages, tools


def is_trained(msg: dict) -> bool:
    """A message is trained when it says so (``loss``); by default assistant turns are."""
    return bool(msg.get("loss", msg["role"] == "assistant"))
