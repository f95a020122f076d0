"""`xtuner serve` as a real server process, driven by the official openai client."""

import http.client
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from conftest import CALCULATOR_TOOL, WEATHER_TOOL

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def server(smol_server):
    return smol_server


@pytest.fixture(scope="module")
def client(server):
    host, port = server
    return openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="unused", max_retries=0)


def _raw(server, method, path, body=None):
    conn = http.client.HTTPConnection(*server, timeout=120)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def _health(server):
    return _raw(server, "GET", "/health")[1]


ASK = [{"role": "user", "content": "Write a short poem about the sea."}]


def test_chat_completion_equals_transformers_generate_and_streams_the_same(client):
    from xtuner_lite.hub import load_model, load_tokenizer

    reply = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=24, temperature=0)
    tokenizer = load_tokenizer(MODEL)
    ids = tokenizer.apply_chat_template(
        ASK, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    out = load_model(MODEL).generate(ids, max_new_tokens=24, do_sample=False)
    expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens == ids.shape[1]
    assert reply.usage.completion_tokens == 24 and reply.choices[0].finish_reason == "length"

    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=24, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len(chunks) > 10  # token by token, not one blob


def test_completions_models_and_stop(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    text = (
        client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
        .choices[0]
        .text
    )
    assert text.startswith(" 5, 6")
    cut = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[" 7"]
    )
    assert cut.choices[0].text == text.split(" 7")[0] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == text


def test_bad_requests_get_openai_errors(server, client):
    status, body = _raw(server, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="'gpt-4' does not exist") as info:
        client.chat.completions.create(model="gpt-4", messages=ASK)
    assert info.value.code == "model_not_found"
    status, body = _raw(
        server,
        "POST",
        "/v1/chat/completions",
        json.dumps({"model": MODEL, "messages": ASK, "temperature": "hot"}),
    )
    assert status == 400 and body["error"]["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="maximum context length") as info:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=100_000)
    assert info.value.code == "context_length_exceeded"
    status, body = _raw(
        server, "POST", "/v1/chat/completions", json.dumps({"model": MODEL, "messages": "hello"})
    )
    assert status == 400 and body["error"]["param"] == "messages"
    assert _raw(server, "GET", "/v2/nothing")[0] == 404


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_slot(server, stream):
    """Streaming or not (a non-streaming request kept decoding to max_tokens with nobody to
    read the answer), the request is cancelled when its client goes away."""
    before = _health(server)
    sock = socket.create_connection(server, timeout=60)
    body = json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4000,
                       "temperature": 0, "stream": stream}).encode()  # fmt: skip
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
    if stream:
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")  # the first bytes: it is decoding
    deadline = time.time() + 30  # (/health shows the state after the engine's current step)
    while time.time() < deadline and _health(server)["running"] != 1:
        time.sleep(0.05)
    assert _health(server)["running"] == 1
    sock.close()
    deadline = time.time() + 60
    while time.time() < deadline and _health(server)["running"]:
        time.sleep(0.2)
    after = _health(server)
    assert after["running"] == 0 and after["cancelled"] == before["cancelled"] + 1


def test_32_concurrent_clients_are_all_served_in_batches(server, client):
    before = _health(server)

    def ask(i: int) -> str:
        return (
            client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"Count to {i}."}],
                max_tokens=8,
                temperature=0.7,
                seed=i,
            )
            .choices[0]
            .message.content
        )

    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(ask, range(32)))
    assert len(replies) == 32 and all(replies)
    after = _health(server)
    assert after["finished"] == before["finished"] + 32
    assert after["peak_batch"] >= 8  # decoded together, not one after another


def test_a_shared_system_prompt_is_reported_as_cached_tokens(client):
    """The second request with the same long system prompt prefills only what follows its
    cached blocks and says so as OpenAI does (usage.prompt_tokens_details.cached_tokens)."""
    system = {"role": "system", "content": "You answer in one short sentence. " * 12}
    replies = [
        client.chat.completions.create(
            model=MODEL,
            messages=[system, {"role": "user", "content": question}],
            max_tokens=4,
            temperature=0,
        )
        for question in ("Name a river.", "Name a mountain.")
    ]
    first, second = (r.usage for r in replies)
    assert second.prompt_tokens_details.cached_tokens >= 64
    assert second.prompt_tokens_details.cached_tokens < second.prompt_tokens
    assert first.prompt_tokens_details.cached_tokens < second.prompt_tokens_details.cached_tokens


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}


def test_response_format_json_schema_and_json_object_hold_streamed_or_not(client):
    """The embedded, untrained model: a json_schema reply validates, streamed and not the same
    text; json_object gives an object."""
    ask = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a person."}],
        max_tokens=120,
        temperature=0,
    )
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }
    reply = client.chat.completions.create(**ask, response_format=fmt)
    text = reply.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)
    assert reply.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(**ask, response_format=fmt, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    loose = client.chat.completions.create(**ask, response_format={"type": "json_object"})
    assert isinstance(json.loads(loose.choices[0].message.content), dict)


def test_unenforceable_schemas_are_refused_naming_the_feature(client):
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    schema = {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            **ask,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
    assert err.value.body["param"] == "response_format" and "if" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**ask, response_format={"type": "yaml"})
    assert err.value.body["param"] == "response_format.type"


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "weather"}}]
)
def test_forced_tool_choice_yields_a_valid_call_every_time(client, choice):
    """The untrained model, asked things that need no tool: required or named still yields a
    call whose arguments validate against the tool's parameters."""
    tools = [WEATHER_TOOL, CALCULATOR_TOOL]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for question in ["What is 17 * 23?", "Hello there!", "Weather in Oslo?"]:
        reply = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": question}],
            max_tokens=80,
            temperature=0,
            tools=tools,
            tool_choice=choice,
        )
        choice_ = reply.choices[0]
        assert choice_.finish_reason == "tool_calls", choice_.message
        call = choice_.message.tool_calls[0].function
        assert isinstance(choice, str) or call.name == "weather"
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])
