"""The OpenAI protocol, with no HTTP in it: request bodies parsed and validated into engine jobs
(prompt ids, ``SamplingParams``, tools), and jobs' results written back as OpenAI responses and
streamed chunks (``tool_calls`` included). Every bad value is an :class:`APIError` naming it."""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from xtuner_lite.data.images import split_content
from xtuner_lite.errors import RowError, XtunerError
from xtuner_lite.inference import SamplingParams
from xtuner_lite.inference.chat_model import ChatModel
from xtuner_lite.inference.grammar import (
    ANY_JSON_OBJECT,
    GrammarError,
    auto_tool_grammar,
    check_grammar,
    json_schema_grammar,
    tool_call_grammar,
)
from xtuner_lite.inference.sampling import SamplingError
from xtuner_lite.toolcalling.formats import ParsedReply, ToolFormat
from xtuner_lite.toolcalling.schema import (
    ToolSpecError,
    normalize_call,
    normalize_tools,
    tool_names,
)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


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


@dataclass
class Job:
    """One request as the HTTP thread sees it: events arrive on ``events``."""

    prompt_ids: list[int]
    params: Any
    # ("text", delta) ... then ("done", finish_reason, full text) or ("error", status, message)
    events: queue.Queue = field(default_factory=queue.Queue)
    request: Any = None
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens found in the prefix cache
    tools: ToolUse | None = None  # the request's tools, when the model may call them
    grammar: str | None = None  # what the reply must follow (response_format, a forced call)
    images: Any = None  # the image inputs of an image-text model's prompt


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


def content_parts(parts: list, where: str) -> tuple[str, list[str]]:
    """(the text parts joined, the image parts' URLs: data URLs or files on the server; a
    remote URL is refused where images are read, since nothing is fetched)."""
    try:
        return split_content(parts, where)
    except RowError as exc:
        raise APIError(400, f"{exc.field}: {exc.reason}", exc.field) from None


def request_message(message: Any, index: int) -> dict:
    """One request message as the template takes it; assistant ``tool_calls`` normalized
    (their JSON-string arguments parsed); image parts in ``images`` (their text placed before
    the message's text, LLaVA's order)."""
    where = f"messages[{index}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise APIError(400, f"{where} must be an object with a 'role'", where)
    content, images = message.get("content"), []
    if isinstance(content, list):  # [{"type": "text", "text": ...}, {"type": "image_url"...}]
        content, images = content_parts(content, f"{where}.content")
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
    if images:
        if message["role"] != "user":
            raise APIError(400, f"{where}: only user messages carry images", f"{where}.content")
        out["images"] = images
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
        return ToolUse(tools, tool_format, tool_format.prefill(name), parallel, forced=name)
    if choice not in ("auto", "required"):
        raise APIError(
            400, f"'tool_choice' {choice!r} is not auto, none or required", "tool_choice"
        )
    if choice == "required":
        return ToolUse(tools, tool_format, tool_format.prefill(""), parallel, forced="")
    return ToolUse(tools, tool_format, "", parallel)


@dataclass
class ToolUse:
    """What a request's tools change: the prompt, the start of the reply (``tool_choice``
    required or named), what is streamed as text, and how the reply is read."""

    tools: list[dict]
    format: ToolFormat
    prefill: str = ""  # forced start of the reply
    parallel: bool = True
    forced: str | None = None  # the tool a call must be to ("": any; None: the model chooses)

    def grammar(self) -> str | None:
        """The grammar of the reply: the rest of a forced call, or (``auto``) text or a call
        (None for a format that does not write a call as one JSON block: its forced call
        rests on the prefill alone)."""
        call_text = getattr(self.format, "call_text", None)
        if call_text is None:
            return None
        if self.forced is None:
            return auto_tool_grammar(call_text, self.tools, self.format.prefill(""))
        return tool_call_grammar(call_text, self.tools, self.forced, self.prefill)

    def hold(self, text: str) -> int:
        """Streamed text stops where a call begins (all of it when a call is forced)."""
        return len(text) if self.prefill else self.format.held_back(text)

    def read(self, text: str) -> ParsedReply:
        parsed = self.format.parse(self.prefill + text, self.tools)
        if not self.parallel:
            parsed.calls = parsed.calls[:1]
        return parsed


def response_grammar(body: dict) -> str | None:
    """The grammar of OpenAI's ``response_format`` (None: ``text`` or absent)."""
    fmt = _get(body, "response_format", (dict,), None)
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return json_schema_grammar(ANY_JSON_OBJECT)
    if fmt.get("type") != "json_schema":
        raise APIError(400, "'response_format.type' must be text, json_object or json_schema",
                       "response_format.type")  # fmt: skip
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise APIError(400, "'response_format.json_schema' must be an object with a 'name'",
                       "response_format.json_schema")  # fmt: skip
    if not isinstance(spec.get("strict", False), bool):
        raise APIError(400, "'response_format.json_schema.strict' must be a boolean",
                       "response_format.json_schema.strict")  # fmt: skip
    schema = spec.get("schema", ANY_JSON_OBJECT)
    if not isinstance(schema, dict):
        raise APIError(400, "'response_format.json_schema.schema' must be an object",
                       "response_format.json_schema.schema")  # fmt: skip
    return json_schema_grammar(schema)


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


def error_body(status: int, message: str) -> dict[str, Any]:
    """A job's error event as OpenAI's error object."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return APIError(status, message, kind=kind).body()


class OpenAIProtocol:
    """One served model's side of the protocol: requests in, responses and chunks out."""

    def __init__(self, chat: ChatModel, name: str, context_length: int | None):
        self.chat = chat
        self.name = name
        self.context_length = context_length

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
        if path == CHAT:
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
            prompt_ids, pixels = self.images_of(parsed, prompt_ids)
            default_max = None
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise APIError(400, "'prompt' must be a non-empty string", "prompt")
            prompt_ids = self.chat.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            default_max = 16  # OpenAI's default for /v1/completions
            tools, pixels = None, None
        context = self.context_length
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
        params = self.chat.sampling(options, stop, tools=bool(tools))
        grammar = self.grammar(body, tools)
        return Job(prompt_ids, params, tools=tools, grammar=grammar, images=pixels), body

    def images_of(self, messages: list[dict], ids: list[int]) -> tuple[list[int], Any]:
        """The prompt with its image parts' tokens expanded, and their model inputs (None
        without images); a text model, or an image that cannot be read, is a 400."""
        refs = [ref for m in messages for ref in m.get("images", [])]
        if not refs:
            return ids, None
        if self.chat.images is None:
            raise APIError(400, f"'{self.name}' reads no images (a text model)", "messages")
        try:
            return self.chat.images.prompt(ids, refs)
        except XtunerError as exc:
            raise APIError(400, f"messages: {exc}", "messages") from None

    def grammar(self, body: dict, tools: ToolUse | None) -> str | None:
        """What the reply must follow: a forced tool call's grammar, else ``response_format``'s;
        what cannot be enforced is a 400 that names it."""
        where = "response_format"
        try:
            asked = response_grammar(body)
            forced = tools.grammar() if tools else None
            if forced is not None:
                asked, where = forced, "tools"
            if asked is not None:
                check_grammar(asked, self.chat.tokenizer)
        except GrammarError as exc:
            raise APIError(400, f"'{where}' cannot be enforced: {exc}", where) from None
        return asked

    def usage(self, job: Job) -> dict[str, Any]:
        prompt = len(job.prompt_ids)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": job.completion_tokens,
            "total_tokens": prompt + job.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": job.cached_tokens},
        }

    def response(self, path: str, job: Job, text: str, reason: str) -> dict:
        if path == CHAT:
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
        chat = path == CHAT
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

    def stream(self, path: str, job: Job, body: dict) -> Iterator[dict]:
        """The job's events as streamed chunks, until it ends: the role, text deltas, then its
        calls as one ``tool_calls`` delta (or the text held back as a possible call), the finish
        reason and, when asked, the usage; an error ends the stream with its error object."""
        chunk = self.chunker(path)
        if path == CHAT:
            yield chunk({"role": "assistant", "content": ""}, None)
        streamed = ""
        while (event := job.events.get())[0] == "text":
            streamed += event[1]
            yield chunk(event[1], None)
        if event[0] == "error":
            yield error_body(*event[1:])
            return
        _, reason, text = event
        if job.tools is not None:
            parsed = job.tools.read(text)
            if parsed.calls:
                yield chunk({"tool_calls": stream_calls(parsed.calls)}, None)
                reason = "tool_calls"
            elif rest := (job.tools.prefill + text)[len(streamed) :]:
                yield chunk(rest, None)
        yield chunk(None, reason)
        if (body.get("stream_options") or {}).get("include_usage"):
            yield {**chunk(None, None), "choices": [], "usage": self.usage(job)}

    def models(self, created: int) -> dict:
        """The ``/v1/models`` listing: the one served model."""
        model = {"id": self.name, "object": "model", "created": created, "owned_by": "xtuner_lite"}
        return {"object": "list", "data": [model]}
