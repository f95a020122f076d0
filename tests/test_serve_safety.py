"""The server under hostile but realistic use: no request stops it, /health tells the truth,
bodies are JSON of bounded size read with a deadline, many clients connect at once."""

import http.client
import json
import random
import socket
import threading
import time

import pytest

from xtuner_lite.server import MAX_BODY_BYTES

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
ASK = [{"role": "user", "content": "What is the capital of France?"}]


# ------------------------------------------------------------------ helpers
def request(address, method, path, body=None, headers=None, timeout=60):
    """(status, parsed JSON body) of one HTTP request."""
    conn = http.client.HTTPConnection(*address, timeout=timeout)
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    conn.request(
        method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    response = conn.getresponse()
    raw = response.read()
    conn.close()
    return response.status, json.loads(raw) if raw else None


def raw_exchange(address, payload: bytes, wait=10.0) -> bytes:
    """Send raw bytes, return what the server answers before closing (or ``wait`` passes)."""
    with socket.create_connection(address, timeout=wait) as sock:
        sock.sendall(payload)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks):
                    break
        except TimeoutError:
            pass
    return b"".join(chunks)


def greedy(address):
    status, body = request(
        address,
        "POST",
        "/v1/chat/completions",
        {"model": MODEL, "messages": ASK, "temperature": 0, "max_tokens": 12},
    )
    assert status == 200, body
    return body["choices"][0]["message"]["content"]


@pytest.fixture
def tiny_server(tiny_llama):
    """The server in this process on a random tiny Llama, so its engine can be broken."""
    from xtuner_lite.commands.chat import ChatModel
    from xtuner_lite.server import Server, bind

    server = Server(
        ChatModel.load(tiny_llama, template="smollm2"), MODEL, max_batch_size=4, read_timeout=1.0
    )
    httpd = bind("127.0.0.1", 0)
    httpd.RequestHandlerClass = server.handler()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield server, httpd.server_address
    httpd.shutdown()
    httpd.server_close()


# ------------------------------------------------------------------ bad values fail alone
@pytest.mark.parametrize(
    "extra,param",
    [
        ({"top_k": -1, "temperature": 0.7}, "top_k"),
        ({"seed": 2**64, "temperature": 0.7}, "seed"),
        ({"top_p": 0}, "top_p"),
        ({"temperature": 3}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_a_bad_value_is_a_400_and_the_engine_keeps_serving(smol_server, extra, param):
    before = greedy(smol_server)
    status, body = request(
        smol_server, "POST", "/v1/chat/completions", {"model": MODEL, "messages": ASK, **extra}
    )
    assert status == 400 and body["error"]["param"] == param, body
    assert greedy(smol_server) == before
    assert request(smol_server, "GET", "/health")[1]["status"] == "ok"


def test_a_tiny_temperature_samples_the_greedy_answer(smol_server):
    status, body = request(
        smol_server,
        "POST",
        "/v1/chat/completions",
        {"model": MODEL, "messages": ASK, "temperature": 1e-40, "max_tokens": 12, "seed": 3},
    )
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == greedy(smol_server)


def test_a_multi_word_stop_string_is_never_streamed(smol_server):
    import openai

    client = openai.OpenAI(
        base_url=f"http://{smol_server[0]}:{smol_server[1]}/v1", api_key="unused", max_retries=0
    )
    assert "is Paris" in greedy(smol_server)
    whole = client.chat.completions.create(
        model=MODEL, messages=ASK, temperature=0, max_tokens=12, stop=["is Paris"]
    )
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, temperature=0, max_tokens=12, stop=["is Paris"], stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    text = whole.choices[0].message.content
    assert streamed == text and "is" not in text.split("France")[-1], (streamed, text)
    assert whole.choices[0].finish_reason == "stop"


def test_a_prompt_longer_than_the_context_says_so_without_max_tokens(tiny_server):
    _, address = tiny_server  # the tiny Llama's context is 512 tokens
    status, body = request(
        address,
        "POST",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "word " * 700}]},
    )
    assert status == 400 and body["error"]["code"] == "context_length_exceeded", body


# ------------------------------------------------------------------ the body and the socket
@pytest.mark.parametrize(
    "headers,status",
    [
        ({"Content-Type": "text/plain"}, 415),
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ({"Content-Length": "abc"}, 400),
        ({"Content-Length": "-1"}, 400),
        ({"Content-Length": str(10**12)}, 413),
        ({"Content-Length": str(MAX_BODY_BYTES + 1)}, 413),  # refused before a byte is read
    ],
)
def test_bodies_must_be_json_of_a_sane_declared_size(tiny_server, headers, status):
    _, address = tiny_server
    fields = {"Content-Type": "application/json", "Content-Length": "2", **headers}
    head = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    answer = raw_exchange(
        address, f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{head}\r\n{{}}".encode()
    )
    assert answer.startswith(f"HTTP/1.1 {status}".encode()), answer[:200]


def test_a_silent_client_is_disconnected(tiny_server):
    _, address = tiny_server
    start = time.perf_counter()
    answer = raw_exchange(address, b"POST /v1/completions HTTP/1.1\r\n", wait=20)
    assert time.perf_counter() - start < 10  # closed by the server's 1 s deadline
    assert b"200" not in answer


def test_32_clients_connect_at_once():
    from xtuner_lite.server import bind

    httpd = bind("127.0.0.1", 0)  # listening, not yet accepting: connections queue
    connected = []

    def connect():
        sock = socket.socket()
        sock.settimeout(2)
        try:
            sock.connect(httpd.server_address)
            connected.append(sock)
        except OSError:
            sock.close()

    threads = [threading.Thread(target=connect) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for sock in connected:
        sock.close()
    httpd.server_close()
    assert len(connected) == 32


# ------------------------------------------------------------------ the engine breaking
def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(tiny_server, monkeypatch):
    server, address = tiny_server
    body = {"model": MODEL, "messages": ASK, "temperature": 0, "max_tokens": 4}
    before = request(address, "POST", "/v1/chat/completions", body)[1]
    real, failures = server.engine.step, []

    def step_fails_once():
        if not failures:
            failures.append(1)
            raise RuntimeError("boom")
        return real()

    monkeypatch.setattr(server.engine, "step", step_fails_once)
    status, answer = request(address, "POST", "/v1/chat/completions", body)
    assert status == 500 and "boom" in answer["error"]["message"]
    assert request(address, "POST", "/v1/chat/completions", body)[1]["choices"] == before["choices"]
    health = request(address, "GET", "/health")[1]
    assert health["status"] == "ok" and health["failed"] == 1


def test_health_reports_a_dead_engine(tiny_server, monkeypatch):
    server, address = tiny_server

    def dies():
        raise SystemExit("engine thread killed")

    monkeypatch.setattr(server.engine, "step", dies)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # expected: keep it quiet
    status, answer = request(
        address,
        "POST",
        "/v1/chat/completions",
        {"model": MODEL, "messages": ASK, "max_tokens": 4},
        timeout=30,
    )
    assert status == 500 and "engine stopped" in answer["error"]["message"]
    server.worker.thread.join(timeout=10)
    status, health = request(address, "GET", "/health")
    assert status == 503 and health["status"] == "error"
    assert (
        request(address, "POST", "/v1/chat/completions", {"model": MODEL, "messages": ASK})[0]
        == 503
    )


def test_max_batch_size_zero_is_refused(tiny_llama):
    from transformers import AutoModelForCausalLM

    from xtuner_lite.errors import UsageError
    from xtuner_lite.inference import InferenceEngine

    with pytest.raises(UsageError, match="max_batch_size must be an integer >= 1"):
        InferenceEngine(AutoModelForCausalLM.from_pretrained(tiny_llama), max_batch_size=0)


# ------------------------------------------------------------------ fuzz
def _random_value(rng: random.Random, depth: int = 0):
    kinds = ["int", "float", "str", "bool", "none", "list", "dict", "big", "tiny"]
    kind = rng.choice(kinds if depth < 2 else kinds[:5])
    return {
        "int": lambda: rng.randint(-5, 5),
        "float": lambda: rng.uniform(-3, 3),
        "str": lambda: rng.choice(["", "x", "<|im_start|>", "\u2028", "é" * 10, "null"]),
        "bool": lambda: rng.random() < 0.5,
        "none": lambda: None,
        "list": lambda: [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))],
        "dict": lambda: {
            rng.choice(["role", "content", "type", "text", "a"]): _random_value(rng, depth + 1)
            for _ in range(rng.randint(0, 3))
        },
        "big": lambda: rng.choice([2**64, 2**31, 1e308, -1e308, 10**20]),
        "tiny": lambda: rng.choice([1e-40, 5e-324, -0.0, 1e-9]),
    }[kind]()


def _random_request(rng: random.Random):
    path = rng.choice(["/v1/chat/completions", "/v1/completions", "/v1/nothing"])
    if rng.random() < 0.1:
        return path, bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
    body = {
        "model": MODEL if rng.random() < 0.9 else _random_value(rng),
        "max_tokens": rng.choice([1, 2, 3, _random_value(rng)]),
    }
    if path.endswith("chat/completions"):
        body["messages"] = rng.choice(
            [ASK, [{"role": "user", "content": _random_value(rng)}], _random_value(rng)]
        )
    else:
        body["prompt"] = rng.choice(["Once upon a time", _random_value(rng)])
    for key in rng.sample(
        [
            "temperature",
            "top_p",
            "top_k",
            "seed",
            "stop",
            "stream",
            "repetition_penalty",
            "n",
            "logprobs",
            "stream_options",
        ],
        rng.randint(0, 4),
    ):
        body[key] = _random_value(rng)
    return path, json.dumps(body).encode()


def test_the_server_survives_a_bounded_fuzz_run(smol_server):
    before = greedy(smol_server)
    rng = random.Random(20261201)
    deadline = time.monotonic() + 45
    seen, sent = set(), 0
    while time.monotonic() < deadline and sent < 400:
        path, data = _random_request(rng)
        conn = http.client.HTTPConnection(*smol_server, timeout=60)
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        conn.close()
        sent += 1
        seen.add(response.status)
        assert response.status in (200, 400, 404), (path, data[:300], response.status)
    assert sent >= 50 and 400 in seen
    status, health = request(smol_server, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["running"] == 0
    assert greedy(smol_server) == before


# ------------------------------------------------------------------ tools and tool messages
CALC = {"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}
CALLED = {
    "role": "assistant",
    "content": "",
    "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "calc", "arguments": "{}"}}],
}  # fmt: skip


@pytest.mark.parametrize(
    "tools,messages,param,words",
    [
        ([CALC, CALC], ASK, "tools[1].name", "another tool is also named 'calc'"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "number"}}}],
         ASK, "tools[0].parameters", "JSON schema of type 'object', got 'number'"),
        ([{"type": "function", "function": {"name": "f", "parameters": [1]}}],
         ASK, "tools[0].parameters", "type 'object', got 'list'"),
        ([CALC], [*ASK, CALLED, {"role": "tool", "content": "2"}],
         "messages[2].tool_call_id", "needs the id of the call it answers"),
        ([CALC], [*ASK, CALLED, {"role": "tool", "tool_call_id": "call_9", "content": "2"}],
         "messages[2].tool_call_id", "'call_9' matches no call of messages[1] (ids: call_1)"),
        ([CALC], [*ASK, {"role": "tool", "tool_call_id": "call_1", "content": "2"}],
         "messages[1]", "must follow an assistant message with 'tool_calls'"),
    ],
)  # fmt: skip
def test_bad_tools_and_tool_messages_are_400s_naming_them(tiny_server, tools, messages, param,
                                                         words):  # fmt: skip
    _, address = tiny_server
    body = {"model": MODEL, "messages": messages, "tools": tools, "max_tokens": 2}
    status, reply = request(address, "POST", "/v1/chat/completions", body)
    assert status == 400, reply
    assert reply["error"]["param"] == param and words in reply["error"]["message"], reply
    good = [*ASK, CALLED, {"role": "tool", "tool_call_id": "call_1", "content": "2"}]
    status, reply = request(address, "POST", "/v1/chat/completions",
                            {**body, "messages": good, "tools": [CALC]})  # fmt: skip
    assert status == 200, reply


def test_a_deeply_nested_body_is_a_400(tiny_server):
    _, address = tiny_server
    deep = b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, reply = request(address, "POST", "/v1/chat/completions", deep)
    assert status == 400 and "nested too deeply" in reply["error"]["message"], reply
