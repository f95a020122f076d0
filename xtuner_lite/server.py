"""``xtuner serve``: an OpenAI-compatible HTTP server on the bundled inference engine.

Endpoints: ``/v1/chat/completions`` and ``/v1/completions`` (both with ``stream: true`` as
server-sent events), ``/v1/models``, ``/health``. Chat completions take OpenAI's ``tools``,
``tool_choice`` and ``parallel_tool_calls`` and answer with ``tool_calls``; the client runs
the tools and sends their results back as ``tool`` messages. Each HTTP request runs on its own
thread; one worker thread owns the engine, so concurrent requests are decoded together in one
batch (continuous batching). The standard library's HTTP server is enough for localhost and keeps
the dependency list short; a client that goes away, streaming or not, cancels its request.
"""

from __future__ import annotations

import json
import queue
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from xtuner_lite.errors import UsageError, XtunerError
from xtuner_lite.inference import InferenceEngine, SamplingParams
from xtuner_lite.inference.chat_model import ChatModel, TextStream
from xtuner_lite.inference.sampling import SamplingError
from xtuner_lite.tools.formats import ParsedReply, ToolFormat
from xtuner_lite.tools.schema import ToolSpecError, normalize_call, normalize_tools, tool_names

MAX_BODY_BYTES = 8 * 1024 * 1024  # a request body larger than this is refused unread (413)
READ_TIMEOUT_S = 30  # a client that sends nothing for this long is disconnected
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there
LISTEN_BACKLOG = 128  # connections the OS queues before accept (the default 5 reset clients)


class APIError(Exception):
    """An OpenAI-style error: HTTP status, message, offending parameter."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status,
            message,
            param,
            code,
            kind,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


# --------------------------------------------------------------------------- the engine worker
@dataclass
class Job:
    """One request as the HTTP thread sees it: events arrive on ``events``."""

    prompt_ids: list[int]
    params: Any
    # ("text", delta) ... then ("done", finish_reason, full text) or ("error", status, message)
    events: queue.Queue = field(default_factory=queue.Queue)
    request: Any = None
    completion_tokens: int = 0
    tools: ToolUse | None = None  # the request's tools, when the model may call them


class EngineWorker:
    """The only thread that touches the engine; HTTP threads talk to it through queues."""

    def __init__(self, engine: InferenceEngine):
        self.engine = engine
        self.commands: queue.Queue = queue.Queue()
        self.jobs: dict[int, tuple[Job, TextStream]] = {}  # engine request id → job
        self.stats = {"finished": 0, "cancelled": 0, "failed": 0, "peak_batch": 0}
        self.fatal: str | None = None  # why the engine thread stopped, if it ever does
        self._publish_load()
        self.thread = threading.Thread(target=self._run, name="xtuner-engine", daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and self.fatal is None

    def submit(self, job: Job) -> Job:
        self.commands.put(("add", job))
        return job

    def cancel(self, job: Job) -> None:
        self.commands.put(("cancel", job))

    def load(self) -> dict[str, int]:
        """Queue lengths after the engine's last step, requests finished and cancelled so far,
        the largest batch (a snapshot the engine thread publishes: its lists change mid-step)."""
        return dict(self._load)

    def _publish_load(self) -> None:
        self._load = {
            "running": len(self.engine.running),
            "waiting": len(self.engine.waiting),
            **self.stats,
        }

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - never die silently: /health says so
            self.fatal = f"{type(exc).__name__}: {exc}"
            for job, _ in self.jobs.values():
                job.events.put(("error", 500, f"the engine stopped: {self.fatal}"))
            raise

    def _loop(self) -> None:
        while True:
            block = not self.engine.has_work
            try:
                while True:
                    self._handle(*self.commands.get(block=block))
                    block = False
            except queue.Empty:
                pass
            self._publish_load()
            if self.engine.has_work:
                try:
                    finished = self.engine.step()
                except Exception as exc:  # noqa: BLE001 - a step that fails as a whole: its
                    # requests get a 500, the engine starts again from an empty batch
                    finished = self.engine.fail_all(f"internal error: {type(exc).__name__}: {exc}")
                self.stats["peak_batch"] = max(
                    self.stats["peak_batch"], len(self.engine.running) + len(finished)
                )
                for request in finished:
                    self._finish(request)
                self._publish_load()

    def _finish(self, request) -> None:
        kind = {"cancelled": "cancelled", "error": "failed"}.get(request.finish_reason, "finished")
        self.stats[kind] += 1
        job, stream = self.jobs.pop(request.id)
        job.completion_tokens = len(request.output_ids)
        if request.finish_reason == "error":
            job.events.put(("error", 500, request.error))
            return
        if rest := stream.delta(request, final=True):
            job.events.put(("text", rest))
        job.events.put(("done", request.finish_reason, self.engine.decode(request)))

    def _handle(self, command: str, job: Job) -> None:
        if command == "cancel":
            request = job.request
            if request is not None and not request.finished:
                self.engine.cancel(request)
                if request not in self.engine.running:  # was waiting: it never reaches step()
                    self.jobs.pop(request.id, None)
                    self.stats["cancelled"] += 1
                    job.events.put(("done", "cancelled", ""))
            return
        stream = TextStream(self.engine, job.tools.hold if job.tools else None)

        def on_token(request, _token: int) -> None:
            if text := stream.delta(request):
                job.events.put(("text", text))

        try:
            job.request = self.engine.add_request(job.prompt_ids, job.params, on_token=on_token)
        except XtunerError as exc:
            job.events.put(("error", 400, str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 - this request fails alone
            job.events.put(("error", 500, f"internal error: {type(exc).__name__}: {exc}"))
            return
        self.jobs[job.request.id] = (job, stream)


# --------------------------------------------------------------------------- request parsing
def _get(body: dict, key: str, kinds: tuple[type, ...], default: Any = None) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise APIError(
            400, f"'{key}' must be {names}, got {type(value).__name__}", key, "invalid_type"
        )
    return value


def request_message(message: Any, index: int) -> dict:
    """One request message as the template takes it; assistant ``tool_calls`` normalized
    (their JSON-string arguments parsed)."""
    where = f"messages[{index}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise APIError(400, f"{where} must be an object with a 'role'", where)
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise APIError(
                400, f"{where}.content: only text parts are supported", f"{where}.content"
            )
        content = "".join(str(p.get("text", "")) for p in content)
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise APIError(400, f"{where}.content must be a string", f"{where}.content")
    if message["role"] not in ("system", "user", "assistant", "tool"):
        raise APIError(
            400,
            f"{where}.role {message['role']!r} is not one of system, user, assistant, tool",
            f"{where}.role",
        )
    out = {"role": message["role"], "content": content}
    calls = message.get("tool_calls")
    if calls and message["role"] == "assistant":
        if not isinstance(calls, list):
            raise APIError(400, f"{where}.tool_calls must be a list", f"{where}.tool_calls")
        try:
            out["tool_calls"] = [
                normalize_call(c, None, f"{where}.tool_calls[{i}]") for i, c in enumerate(calls)
            ]
        except ToolSpecError as exc:
            raise APIError(400, f"{exc.field}: {exc.reason}", exc.field) from None
    return out


def client_gone(connection: socket.socket) -> bool:
    """Whether the client closed its end: readable with nothing to read (a pipelined next
    request would be something to read)."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def check_tool_messages(messages: list[dict]) -> None:
    """Each ``tool`` message answers a call of the assistant message before it (other tool
    results may come between), by that call's id, as OpenAI requires."""
    calls: list[str | None] | None = None  # the ids of the last assistant message's calls
    where_calls = ""
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "assistant":
            found = message.get("tool_calls") or []
            calls = [c.get("id") if isinstance(c, dict) else None for c in found] or None
            where_calls = f"messages[{i}]"
        elif role == "tool":
            _check_tool_message(message, f"messages[{i}]", calls, where_calls)
        else:
            calls = None


def _check_tool_message(message: dict, where: str, calls: list | None, where_calls: str) -> None:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise APIError(400, f"{where}.tool_call_id: a tool message needs the id of the call it "
                       "answers", f"{where}.tool_call_id")  # fmt: skip
    if calls is None:
        raise APIError(400, f"{where}: a tool message must follow an assistant message with "
                       "'tool_calls'", where)  # fmt: skip
    ids = [c for c in calls if c]
    if ids and call_id not in ids:
        raise APIError(400, f"{where}.tool_call_id {call_id!r} matches no call of {where_calls} "
                       f"(ids: {', '.join(map(str, ids))})", f"{where}.tool_call_id")  # fmt: skip


def tool_use(body: dict, tool_format: ToolFormat) -> ToolUse | None:
    """The request's ``tools``, ``tool_choice`` and ``parallel_tool_calls``; None when the model
    is not to call tools (no tools, or ``tool_choice: "none"``)."""
    try:
        tools = normalize_tools(_get(body, "tools", (list,), None))
    except ToolSpecError as exc:
        raise APIError(400, f"'{exc.field}': {exc.reason}", exc.field) from None
    choice = _get(body, "tool_choice", (str, dict), "auto" if tools else "none")
    parallel = _get(body, "parallel_tool_calls", (bool,), True)
    if choice == "none":
        return None
    if not tools:
        raise APIError(400, "'tool_choice' needs 'tools'", "tool_choice")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if choice.get("type") != "function" or name not in tool_names(tools):
            raise APIError(
                400,
                "'tool_choice' must be auto, none, required or "
                "{'type': 'function', 'function': {'name': one of the tools}}",
                "tool_choice",
            )
        return ToolUse(tools, tool_format, tool_format.prefill(name), parallel)
    if choice not in ("auto", "required"):
        raise APIError(
            400, f"'tool_choice' {choice!r} is not auto, none or required", "tool_choice"
        )
    prefill = tool_format.prefill("") if choice == "required" else ""
    return ToolUse(tools, tool_format, prefill, parallel)


@dataclass
class ToolUse:
    """What a request's tools change: the prompt, the start of the reply (``tool_choice``
    required or named), what is streamed as text, and how the reply is read."""

    tools: list[dict]
    format: ToolFormat
    prefill: str = ""  # forced start of the reply
    parallel: bool = True

    def hold(self, text: str) -> int:
        """Streamed text stops where a call begins (all of it when a call is forced)."""
        return len(text) if self.prefill else self.format.held_back(text)

    def read(self, text: str) -> ParsedReply:
        parsed = self.format.parse(self.prefill + text, self.tools)
        if not self.parallel:
            parsed.calls = parsed.calls[:1]
        return parsed


def generation_options(
    body: dict, default_max_tokens: int | None
) -> tuple[SamplingParams, list[str], int | None]:
    """(sampling params, stop strings, max_tokens as asked) from an OpenAI request body; the
    ranges are ``SamplingParams``'s own (one validation for the CLI and the server)."""
    max_tokens = _get(body, "max_completion_tokens", (int,), None)
    max_tokens = _get(body, "max_tokens", (int,), max_tokens)
    for key in ("presence_penalty", "frequency_penalty"):
        if _get(body, key, (int, float), 0) != 0:
            raise APIError(
                400,
                f"'{key}' is not supported; use 'repetition_penalty'",
                key,
                "unsupported_parameter",
            )
    if _get(body, "n", (int,), 1) != 1:
        raise APIError(400, "only n=1 is supported", "n", "unsupported_parameter")
    if _get(body, "logprobs", (bool, int), False):
        raise APIError(400, "'logprobs' is not supported", "logprobs", "unsupported_parameter")
    stop = _get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(w, str) and w for w in stop) or len(stop) > 4:
        raise APIError(400, "'stop' must be a string or a list of up to 4 strings", "stop")
    params = SamplingParams(
        # without max_tokens: the room left in the context (the caller reports a prompt too long)
        max_new_tokens=max_tokens if max_tokens is not None else max(default_max_tokens or 1, 1),
        temperature=_get(body, "temperature", (int, float), 1.0),
        top_p=_get(body, "top_p", (int, float), 1.0),
        top_k=_get(body, "top_k", (int,), 0),
        repetition_penalty=_get(body, "repetition_penalty", (int, float), 1.0),
        seed=_get(body, "seed", (int,), None),
    )
    try:
        params.validate()
    except SamplingError as exc:
        param = "max_tokens" if exc.param == "max_new_tokens" else exc.param
        message = str(exc).replace("max_new_tokens", "max_tokens", 1)
        raise APIError(400, f"'{param}': {message}", param, "invalid_value") from None
    return params, stop, max_tokens


# --------------------------------------------------------------------------- HTTP
class Server:
    """The served model, its engine worker, and the HTTP request handling."""

    def __init__(
        self,
        chat: ChatModel,
        name: str,
        max_batch_size: int = 32,
        read_timeout: float = READ_TIMEOUT_S,
    ):
        self.chat = chat
        self.name = name
        self.read_timeout = read_timeout
        self.engine = InferenceEngine(chat.model, chat.tokenizer, max_batch_size=max_batch_size)
        self.worker = EngineWorker(self.engine)
        self.created = int(time.time())

    def prepare(self, path: str, body: Any) -> tuple[Job, dict]:
        """Validate a completion request and turn it into a job (not yet submitted)."""
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = _get(body, "model", (str,), None)
        if model is None:
            raise APIError(400, "'model' is required", "model", "missing_required_parameter")
        if model != self.name:
            raise APIError(
                404,
                f"The model '{model}' does not exist; this server serves '{self.name}'",
                "model",
                "model_not_found",
            )
        if path == "/v1/chat/completions":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise APIError(400, "'messages' must be a non-empty list", "messages")
            tools = tool_use(body, self.chat.tool_format)
            parsed = [request_message(m, i) for i, m in enumerate(messages)]
            check_tool_messages(messages)
            prompt_ids = self.chat.prompt_ids(
                parsed,
                tools.tools if tools else None,
                tools.prefill if tools else "",
            )
            default_max = None
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise APIError(400, "'prompt' must be a non-empty string", "prompt")
            prompt_ids = self.chat.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            default_max = 16  # OpenAI's default for /v1/completions
            tools = None
        context = self.engine.context_length
        room = None if context is None else context - len(prompt_ids)
        options, stop, asked = generation_options(body, default_max or room)
        if room is not None and (room < 1 or (asked is not None and asked > room)):
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens; the "
                f"prompt is {len(prompt_ids)} and max_tokens is "
                f"{asked if asked is not None else 'at least 1'}",
                "max_tokens",
                "context_length_exceeded",
            )
        _get(body, "stream", (bool,), False)
        _get(body, "stream_options", (dict,), None)
        stop += list(tools.format.stop_words) if tools else []
        return Job(
            prompt_ids, self.chat.sampling(options, stop, tools=bool(tools)), tools=tools
        ), body

    def handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "xtuner_lite"
            timeout = server.read_timeout  # a silent or slow client cannot hold a thread forever

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
                    worker = server.worker
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
                    self._json(
                        200,
                        {
                            "object": "list",
                            "data": [
                                {
                                    "id": server.name,
                                    "object": "model",
                                    "created": server.created,
                                    "owned_by": "xtuner_lite",
                                }
                            ],
                        },
                    )
                else:
                    self._json(404, APIError(404, f"no route {self.path}").body())

            def do_POST(self) -> None:
                try:
                    raw = self._body()
                    if self.path not in ("/v1/chat/completions", "/v1/completions"):
                        raise APIError(404, f"no route {self.path}")
                    try:
                        body = json.loads(raw or b"null")
                    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                        raise APIError(400, f"the request body is not valid JSON: {exc}") from None
                    if not server.worker.alive:
                        raise APIError(
                            503, "the engine has stopped; restart the server", kind="server_error"
                        )
                    job, body = server.prepare(self.path, body)
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
                server.worker.submit(job)
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
                    raise APIError(
                        415, f"Content-Type must be application/json, got {kind or 'none'!r}"
                    )
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
                            server.worker.cancel(job)
                            self.close_connection = True
                            return
                    if event[0] == "error":
                        _, status, message = event
                        kind = "server_error" if status >= 500 else "invalid_request_error"
                        self._json(status, APIError(status, message, kind=kind).body())
                        return
                    if event[0] == "done":
                        break
                _, reason, text = event
                self._json(200, server.response(self.path, job, text, reason))

            def _stream(self, job: Job, body: dict) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                chunk = server.chunker(self.path)
                try:
                    if self.path == "/v1/chat/completions":
                        self._send(chunk({"role": "assistant", "content": ""}, None))
                    streamed = ""
                    while True:
                        event = job.events.get()
                        if event[0] == "text":
                            streamed += event[1]
                            self._send(chunk(event[1], None))
                        elif event[0] == "error":
                            _, status, message = event
                            kind = "server_error" if status >= 500 else "invalid_request_error"
                            self._send(APIError(status, message, kind=kind).body())
                            break
                        else:
                            reason = event[1]
                            if job.tools is not None:
                                reason = self._tool_calls(job, chunk, event[2], streamed) or reason
                            self._send(chunk(None, reason))
                            if (body.get("stream_options") or {}).get("include_usage"):
                                self._send(
                                    {**chunk(None, None), "choices": [], "usage": server.usage(job)}
                                )
                            break
                    self._write(b"data: [DONE]\n\n")
                    self._write(b"")
                except OSError:  # the client went away or stopped reading (timeout)
                    server.worker.cancel(job)
                    self.close_connection = True

            def _tool_calls(self, job: Job, chunk, text: str, streamed: str) -> str | None:
                """After a streamed reply: its calls as one delta ("tool_calls"), or the text
                held back as a possible call when it was none."""
                parsed = job.tools.read(text)
                if parsed.calls:
                    self._send(chunk({"tool_calls": stream_calls(parsed.calls)}, None))
                    return "tool_calls"
                if rest := (job.tools.prefill + text)[len(streamed) :]:
                    self._send(chunk(rest, None))
                return None

            def _send(self, payload: dict) -> None:
                self._write(f"data: {json.dumps(payload)}\n\n".encode())

            def _write(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

        return Handler

    def usage(self, job: Job) -> dict[str, int]:
        prompt = len(job.prompt_ids)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": job.completion_tokens,
            "total_tokens": prompt + job.completion_tokens,
        }

    def response(self, path: str, job: Job, text: str, reason: str) -> dict:
        if path == "/v1/chat/completions":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if job.tools is not None:
                parsed = job.tools.read(text)
                message["content"] = parsed.content if parsed.calls else job.tools.prefill + text
                if parsed.calls:
                    message["content"] = parsed.content or None
                    message["tool_calls"] = [openai_call(c) for c in parsed.calls]
                    reason = "tool_calls"
            choice = {"index": 0, "message": message, "finish_reason": reason}
            kind, prefix = "chat.completion", "chatcmpl"
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
            kind, prefix = "text_completion", "cmpl"
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": self.name,
            "choices": [choice],
            "usage": self.usage(job),
        }

    def chunker(self, path: str):
        """A function (delta text or role dict, finish reason) → one SSE chunk object."""
        chat = path == "/v1/chat/completions"
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())

        def chunk(delta: str | dict | None, reason: str | None) -> dict:
            if chat:
                content = (
                    delta
                    if isinstance(delta, dict)
                    else ({} if delta is None else {"content": delta})
                )
                choice = {"index": 0, "delta": content, "finish_reason": reason}
                kind = "chat.completion.chunk"
            else:
                choice = {
                    "index": 0,
                    "text": delta or "",
                    "finish_reason": reason,
                    "logprobs": None,
                }
                kind = "text_completion"
            return {
                "id": ident,
                "object": kind,
                "created": created,
                "model": self.name,
                "choices": [choice],
            }

        return chunk


def openai_call(call: dict) -> dict:
    """A parsed call as OpenAI returns it: an id, and the arguments as a JSON string."""
    arguments = json.dumps(call["arguments"], ensure_ascii=False)
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": call["name"], "arguments": arguments},
    }


def stream_calls(calls: list[dict]) -> list[dict]:
    """The calls as one streamed ``tool_calls`` delta (each complete, with its index)."""
    return [{"index": i, **openai_call(c)} for i, c in enumerate(calls)]


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
    bits: int | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str | None = None,
    max_batch_size: int = 32,
) -> None:
    """Load the model and serve until interrupted; prints the URL once it is listening."""

    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise UsageError(f"--max-batch-size must be an integer >= 1, got {max_batch_size!r}")
    httpd = bind(host, port)
    try:
        chat = ChatModel.load(model, adapter, template, bits)
        server = Server(chat, name or Path(adapter or model).name, max_batch_size)
        httpd.RequestHandlerClass = server.handler()
        url = f"http://{httpd.server_address[0]}:{httpd.server_address[1]}"
        print(f"serving {server.name!r} on {url}/v1 (OpenAI-compatible; Ctrl-C stops)", flush=True)
        httpd.serve_forever()
    finally:
        httpd.server_close()
