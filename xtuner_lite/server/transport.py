"""The HTTP transport of ``xtuner serve``: the standard library's threading server (one thread
per connection; enough for localhost, and no dependency), bodies read only when they are JSON of
a bounded size, chunked server-sent events for streams, and a client that goes away, streaming or
not, cancels its request. What a request means is :mod:`xtuner_lite.server.protocol`'s."""

from __future__ import annotations

import json
import queue
import select
import socket
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

from xtuner_lite.errors import UsageError
from xtuner_lite.inference import InferenceEngine
from xtuner_lite.inference.chat_model import ChatModel
from xtuner_lite.inference.engine import PREFIX_CACHE_BYTES
from xtuner_lite.model.precision import Precision
from xtuner_lite.server.protocol import (
    CHAT,
    COMPLETIONS,
    APIError,
    Job,
    OpenAIProtocol,
    error_body,
)
from xtuner_lite.server.worker import EngineWorker
from xtuner_lite.values import CacheSize, Port, PositiveInt, cache_bytes

MAX_BODY_BYTES = 8 * 1024 * 1024  # a request body larger than this is refused unread (413)
READ_TIMEOUT_S = 30  # a client that sends nothing for this long is disconnected
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there
LISTEN_BACKLOG = 128  # connections the OS queues before accept (the default 5 reset clients)


def client_gone(connection: socket.socket) -> bool:
    """Whether the client closed its end: readable with nothing to read (a pipelined next
    request would be something to read)."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class Server:
    """The served model: its engine, the worker thread that owns it, the protocol."""

    def __init__(
        self,
        chat: ChatModel,
        name: str,
        max_batch_size: int = 32,
        read_timeout: float = READ_TIMEOUT_S,
        prefix_cache: int = PREFIX_CACHE_BYTES,
    ):
        self.chat = chat
        self.read_timeout = read_timeout
        self.engine = InferenceEngine(
            chat.model, chat.tokenizer, max_batch_size=max_batch_size, prefix_cache=prefix_cache
        )
        self.worker = EngineWorker(self.engine)
        self.protocol = OpenAIProtocol(chat, name, self.engine.context_length)
        self.created = int(time.time())

    @property
    def name(self) -> str:
        return self.protocol.name

    def handler(self) -> type[BaseHTTPRequestHandler]:
        """The request handler class bound to this server."""
        return type("Handler", (Handler,), {"app": self, "timeout": self.read_timeout})


class Handler(BaseHTTPRequestHandler):
    """One connection's requests; ``app`` is the served model (set per server by
    :meth:`Server.handler`)."""

    app: Server
    protocol_version = "HTTP/1.1"
    server_version = "xtuner_lite"
    timeout = READ_TIMEOUT_S  # a silent or slow client cannot hold a thread forever

    def log_message(self, format: str, *args: Any) -> None:  # quiet access log
        pass

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            worker = self.app.worker
            if worker.alive:
                self._json(200, {"status": "ok", **worker.load()})
            else:
                self._json(
                    503,
                    {
                        "status": "error",
                        "error": worker.fatal or "the engine thread stopped",
                        **worker.load(),
                    },
                )
        elif self.path == "/v1/models":
            self._json(200, self.app.protocol.models(self.app.created))
        else:
            self._json(404, APIError(404, f"no route {self.path}").body())

    def do_POST(self) -> None:
        try:
            raw = self._body()
            if self.path not in (CHAT, COMPLETIONS):
                raise APIError(404, f"no route {self.path}")
            try:
                body = json.loads(raw or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise APIError(400, f"the request body is not valid JSON: {exc}") from None
            if not self.app.worker.alive:
                raise APIError(
                    503, "the engine has stopped; restart the server", kind="server_error"
                )
            job, body = self.app.protocol.prepare(self.path, body)
        except APIError as exc:
            self._json(exc.status, exc.body())
            return
        except RecursionError:  # json.loads, or a schema walked later: the client's doing
            self._json(400, APIError(400, "the request is nested too deeply").body())
            return
        except Exception as exc:  # noqa: BLE001 - this request fails alone
            self._json(
                500,
                APIError(
                    500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error"
                ).body(),
            )
            return
        self.app.worker.submit(job)
        if body.get("stream"):
            self._stream(job, body)
        else:
            self._complete(job)

    def _body(self) -> bytes:
        """The request body, read only when it is JSON of an acceptable size: a web
        page cannot post it without a CORS preflight, and size is checked unread."""
        declared = self.headers.get("Content-Length")
        if declared is None:
            length = 0
        elif not declared.strip().isdigit():
            self.close_connection = True
            raise APIError(400, f"invalid Content-Length {declared!r}")
        else:
            length = int(declared)
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the unread body must not be parsed as a request
            raise APIError(
                413, f"request body of {length} bytes is over the limit of {MAX_BODY_BYTES}"
            )
        kind = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if kind != "application/json":
            self.close_connection = True
            raise APIError(415, f"Content-Type must be application/json, got {kind or 'none'!r}")
        return self.rfile.read(length) if length else b""

    def _complete(self, job: Job) -> None:
        checked = time.monotonic()
        while True:
            try:
                event = job.events.get(timeout=DISCONNECT_POLL_S)
            except queue.Empty:
                event = ("wait",)
            if time.monotonic() - checked >= DISCONNECT_POLL_S:
                checked = time.monotonic()
                if client_gone(self.connection):  # nobody will read the answer
                    self.app.worker.cancel(job)
                    self.close_connection = True
                    return
            if event[0] == "error":
                self._json(event[1], error_body(*event[1:]))
                return
            if event[0] == "done":
                break
        _, reason, text = event
        self._json(200, self.app.protocol.response(self.path, job, text, reason))

    def _stream(self, job: Job, body: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for payload in self.app.protocol.stream(self.path, job, body):
                self._send(payload)
            self._write(b"data: [DONE]\n\n")
            self._write(b"")
        except OSError:  # the client went away or stopped reading (timeout)
            self.app.worker.cancel(job)
            self.close_connection = True

    def _send(self, payload: dict) -> None:
        self._write(f"data: {json.dumps(payload)}\n\n".encode())

    def _write(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


class HTTPServer(ThreadingHTTPServer):
    """One thread per connection, a listen queue deep enough for many simultaneous clients."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG


def bind(host: str, port: int) -> HTTPServer:
    """Bind the listening socket (before the model loads: a busy port fails at once)."""
    try:
        return HTTPServer((host, port), BaseHTTPRequestHandler, bind_and_activate=True)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def serve(
    model: str,
    adapter: str | None = None,
    template: str | None = None,
    bits: Literal[4, 8] | None = None,
    host: str = "127.0.0.1",
    port: Port = 8000,
    served_model_name: str | None = None,
    max_batch_size: PositiveInt = 32,
    prefix_cache: CacheSize = "512MiB",
    precision: Precision = "fp32",
) -> None:
    """OpenAI-compatible HTTP server (chat, completions).

    Serve /v1/chat/completions, /v1/completions (streaming included), /v1/models and /health;
    concurrent requests are batched. Loads the model and serves until interrupted; prints the
    URL once it is listening.

    Args:
        model: embedded name, local HF folder or hub id
        adapter: peft adapter folder
        template: chat template name or 'auto' (default: the model's)
        bits: 4/8-bit weights (bitsandbytes)
        host: the address to listen on
        port: 0 picks a free port
        served_model_name: the 'model' clients ask for (default: the model or adapter folder's
            name)
        max_batch_size: requests decoded together at most
        prefix_cache: memory for the keys/values of prompt blocks kept across requests, so a
            prompt that starts as an earlier one did (a system prompt, a conversation so far)
            prefills only the rest; 0 turns it off
        precision: the weights' type: fp32, bf16, or auto (bf16 on a GPU or a CPU with native
            bf16 such as AMX or AVX512-bf16, fp16 on a GPU without bf16: faster, greedy output
            may differ from fp32's)
    """
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise UsageError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
    httpd = bind(host, port)
    try:
        chat = ChatModel.load(model, adapter, template, bits, precision=precision)
        name = served_model_name or Path(adapter or model).name
        server = Server(chat, name, max_batch_size, prefix_cache=cache_bytes(prefix_cache))
        httpd.RequestHandlerClass = server.handler()
        url = f"http://{httpd.server_address[0]}:{httpd.server_address[1]}"
        print(f"serving {server.name!r} on {url}/v1 (OpenAI-compatible; Ctrl-C stops)", flush=True)
        httpd.serve_forever()
    finally:
        httpd.server_close()
