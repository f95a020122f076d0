"""``xtuner serve``: an OpenAI-compatible HTTP server on the bundled inference engine, by role.

Endpoints: ``/v1/chat/completions`` and ``/v1/completions`` (both with ``stream: true`` as
server-sent events), ``/v1/models``, ``/health``. Chat completions take OpenAI's ``tools``,
``tool_choice`` and ``parallel_tool_calls`` and answer with ``tool_calls``; the client runs the
tools and sends their results back as ``tool`` messages.

- :mod:`~xtuner_lite.server.protocol`: the OpenAI protocol, no HTTP: request bodies into engine
  jobs, results into responses and chunks.
- :mod:`~xtuner_lite.server.worker`: the one thread that owns the engine, so concurrent requests
  are decoded together in one batch (continuous batching).
- :mod:`~xtuner_lite.server.transport`: HTTP (one thread per connection), and ``serve``.
"""

from xtuner_lite.server.protocol import (
    APIError,
    Job,
    OpenAIProtocol,
    ToolUse,
    check_tool_messages,
    generation_options,
    request_message,
    tool_use,
)
from xtuner_lite.server.transport import MAX_BODY_BYTES, Server, bind, serve
from xtuner_lite.server.worker import EngineWorker

__all__ = [
    "MAX_BODY_BYTES",
    "APIError",
    "EngineWorker",
    "Job",
    "OpenAIProtocol",
    "Server",
    "ToolUse",
    "bind",
    "check_tool_messages",
    "generation_options",
    "request_message",
    "serve",
    "tool_use",
]
