"""Chat-control tokens inside message text (``<|im_start|>`` ...) must never forge a turn.

A tokenizer turns the literal text of a special token into that token wherever it appears, so a
user message containing ``<|im_end|>\\n<|im_start|>assistant`` would open a turn of its own. We
escape such text by putting a zero-width space after its first character: it reads the same and
tokenizes as plain text.
"""

from __future__ import annotations

from typing import Any

ESCAPE = "\u200b"  # zero-width space
MODES = ("warn", "escape", "skip")


def control_tokens(tokenizer: Any) -> list[str]:
    """The tokenizer's special tokens that are written as text (longest first)."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    found.update(tok.content for tok in decoder.values() if getattr(tok, "special", False))
    return sorted((t for t in found if t and len(t) > 1), key=len, reverse=True)


def find_control_token(text: str, tokens: list[str]) -> str | None:
    """The first control token ``text`` contains, if any."""
    return next((t for t in tokens if t in text), None)


def escape(text: str, tokens: list[str]) -> str:
    """``text`` with every control token broken so that it tokenizes as plain text."""
    for token in tokens:
        if token in text:
            text = text.replace(token, token[0] + ESCAPE + token[1:])
    return text


def escape_values(value: Any, tokens: list[str]) -> Any:
    """``value`` (JSON-like: a tool call's arguments, a tool list) with every string in it,
    keys included, escaped as :func:`escape` does."""
    if isinstance(value, str):
        return escape(value, tokens)
    if isinstance(value, dict):
        return {escape(k, tokens): escape_values(v, tokens) for k, v in value.items()}
    if isinstance(value, list):
        return [escape_values(v, tokens) for v in value]
    return value
