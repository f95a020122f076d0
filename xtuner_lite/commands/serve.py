"""``xtuner serve``: the OpenAI-compatible HTTP server (``xtuner_lite.server``)."""

from xtuner_lite.server import serve

__all__ = ["serve"]
