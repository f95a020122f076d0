"""Preference rows → the preference schema (stage 2 for preference data).

Pairs: ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``; unpaired (KTO):
``{"prompt": [messages], "completion": [messages], "label": bool}``. The response lists hold the
assistant turn(s) being compared. A map fn raises :class:`RowError` naming the field; users may
pass any callable with the same contract.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from xtuner_lite.data.map_fns import (
    SHAREGPT_ROLES,
    as_object,
    pick_map_fn,
    string_field,
    system_messages,
    user_turn,
)
from xtuner_lite.errors import RowError

Preference = dict[str, Any]
PrefMapFn = Callable[[Any], Preference]


def _messages(value: Any, field: str) -> list[dict]:
    """A string (one assistant turn), one message object, or a list of messages."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RowError(
            f"expected a string or a list of messages, got {type(value).__name__}", field=field
        )
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise RowError(f"item {i} is not an object", field=field)
        if "from" in msg:  # ShareGPT
            role, content = SHAREGPT_ROLES.get(msg["from"]), msg.get("value")
        else:
            role, content = msg.get("role"), msg.get("content")
        if role not in ("system", "user", "assistant", "tool"):
            raise RowError(f"item {i} has an unknown role", field=f"{field}[{i}]")
        if not isinstance(content, str):
            raise RowError(
                f"expected a string, got {type(content).__name__}", field=f"{field}[{i}].content"
            )
        out.append({"role": role, "content": content})
    return out


def _prompt(value: Any, field: str) -> list[dict]:
    """A prompt string is one user turn; otherwise a list of messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return _messages(value, field)


def _required(row: dict, key: str) -> Any:
    if row.get(key) is None:
        raise RowError("missing", field=key)
    return row[key]


def _split_implicit(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], ...]:
    """TRL's implicit-prompt rows: both conversations in full; the prompt is their common
    prefix up to the last user turn."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and chosen[n - 1]["role"] == "assistant":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def sharegpt_pref_map_fn(row: Any) -> Preference:
    """LLaMA-Factory's ShareGPT preference rows: ``conversations`` (the prompt turns) plus
    ``chosen`` and ``rejected`` (``{from, value}`` each)."""
    row = as_object(row)
    prompt = _to_openai(_required(row, "conversations"), "conversations")
    return {
        "prompt": system_messages(row) + prompt,
        "chosen": _messages(_required(row, "chosen"), "chosen"),
        "rejected": _messages(_required(row, "rejected"), "rejected"),
    }


def _to_openai(turns: Any, field: str) -> list[dict]:
    if not isinstance(turns, list):
        raise RowError(f"expected a list, got {type(turns).__name__}", field=field)
    return _messages(turns, field)


def openai_pref_map_fn(row: Any) -> Preference:
    """``prompt`` (a string or messages) or ``messages``, plus ``chosen`` and ``rejected``
    (strings or messages); without a prompt, both hold the whole conversation."""
    row = as_object(row)
    chosen = _messages(_required(row, "chosen"), "chosen")
    rejected = _messages(_required(row, "rejected"), "rejected")
    key = "prompt" if "prompt" in row else "messages" if "messages" in row else None
    if key is None:
        prompt, chosen, rejected = _split_implicit(chosen, rejected)
    else:
        value = row[key]
        prompt = (
            [{"role": "user", "content": value}]
            if isinstance(value, str)
            else _messages(value, key)
        )
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def alpaca_pref_map_fn(row: Any) -> Preference:
    """Alpaca-style ``instruction``, ``input``, ``chosen``, ``rejected`` (``system`` optional)."""
    row = as_object(row)
    user = user_turn(string_field(row, "instruction"), string_field(row, "input", required=False))
    return {
        "prompt": system_messages(row) + [{"role": "user", "content": user}],
        "chosen": _messages(string_field(row, "chosen"), "chosen"),
        "rejected": _messages(string_field(row, "rejected"), "rejected"),
    }


def kto_map_fn(row: Any) -> Preference:
    """Unpaired rows: ``messages`` ending with the judged assistant turn (LLaMA-Factory) or
    ``prompt`` + ``completion`` (TRL), and a boolean ``label`` (true: desirable)."""
    row = as_object(row)
    label = _required(row, "label")
    if not isinstance(label, bool):
        raise RowError(f"expected true or false, got {label!r}", field="label")
    if "messages" in row or "conversations" in row:
        key = "messages" if "messages" in row else "conversations"
        messages = _messages(_required(row, key), key)
        if not messages or messages[-1]["role"] != "assistant":
            raise RowError("the last message must be the judged assistant turn", field=key)
        prompt, completion = messages[:-1], messages[-1:]
    else:
        prompt = _prompt(_required(row, "prompt"), "prompt")
        completion = _messages(_required(row, "completion"), "completion")
    return {"prompt": prompt, "completion": completion, "label": label}


def auto_pref_map_fn(row: Any) -> Preference:
    """Picks the format from the row's keys: a row with no ``chosen`` / ``rejected`` but a
    ``completion`` or ``messages`` is an unpaired (KTO) row, even without its ``label``."""
    row = as_object(row)
    unpaired = "chosen" not in row and "rejected" not in row
    if "label" in row or (unpaired and ("completion" in row or "messages" in row)):
        return kto_map_fn(row)
    if "conversations" in row:
        return sharegpt_pref_map_fn(row)
    if "instruction" in row:
        return alpaca_pref_map_fn(row)
    return openai_pref_map_fn(row)


PREF_MAP_FNS: dict[str, PrefMapFn] = {
    "auto": auto_pref_map_fn,
    "sharegpt": sharegpt_pref_map_fn,
    "openai": openai_pref_map_fn,
    "alpaca": alpaca_pref_map_fn,
    "kto": kto_map_fn,
}


def get_pref_map_fn(map_fn: str | PrefMapFn) -> PrefMapFn:
    return pick_map_fn(map_fn, PREF_MAP_FNS, "train_dataset.map_fn: unknown preference format")


def validate_preference(item: Any, paired: bool) -> Preference:
    """Check a map fn's output: a prompt ending with a user (or tool) turn and non-empty
    responses; for pairs, chosen != rejected."""
    keys = ("chosen", "rejected") if paired else ("completion",)
    if not isinstance(item, dict) or not all(k in item for k in ("prompt", *keys)):
        raise RowError(
            f"map fn must return a dict with 'prompt' and {' and '.join(map(repr, keys))}"
        )
    if not paired and not isinstance(item.get("label"), bool):
        raise RowError("an unpaired (KTO) row needs a boolean label", field="label")
    prompt = item["prompt"]
    if not prompt or prompt[-1]["role"] not in ("user", "tool"):
        raise RowError("the prompt must end with a user turn", field="prompt")
    for key in keys:
        response = item[key]
        if not response or response[0]["role"] != "assistant":
            raise RowError("expected an assistant response", field=key)
        if not "".join(m["content"] for m in response).strip():
            raise RowError("the response is empty", field=key)
    if paired and item["chosen"] == item["rejected"]:
        raise RowError("chosen and rejected are identical", field="rejected")
    return item


__all__ = [
    "PREF_MAP_FNS",
    "get_pref_map_fn",
    "validate_preference",
]
