"""``xtuner list-templates``: the chat templates and their stop words."""

from __future__ import annotations

from xtuner_lite.data.templates import TEMPLATES


def list_templates() -> None:
    """List chat templates and their stop words."""
    print("auto (the tokenizer's own jinja template)")
    for name, template in sorted(TEMPLATES.items()):
        print(f"{name:16s} stop words: {list(template.stops)}")


__all__ = ["list_templates"]
