"""Tool use: one format from template to parser, the built-in tools, the sandbox, the loop."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from xtuner_lite.data import IGNORE_INDEX, get_template, tokenize_rendered
from xtuner_lite.sandbox import run_python
from xtuner_lite.tools import (
    ToolBox,
    ToolError,
    ToolSpecError,
    function_schema,
    get_tool_format,
    load_tools,
    normalize_call,
    normalize_tools,
    run_tool_turn,
    run_tool_turns,
)
from xtuner_lite.tools.builtin import calculator, search

QWEN2_5_JINJA = (Path(__file__).parent / "fixtures" / "qwen2_5_chat_template.jinja").read_text()

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CALC = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Évalue une expression",  # non-ASCII stays as it is (tojson)
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}},
    },
}
TOOLS = [WEATHER, CALC]
CALL = {"name": "get_weather", "arguments": {"city": "Zürich"}}
CONVERSATIONS = {
    "system": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Zürich and 2+2?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "21 degrees."},
    ],
    "no_system_two_calls": [
        {"role": "user", "content": "Weather in Zürich and 2+2?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [CALL, {"name": "calculator", "arguments": {"expression": "2+2"}}],
        },
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "21 degrees; 4."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You are welcome."},
    ],
}


def _openai(messages: list[dict]) -> list[dict]:
    """The same messages as an OpenAI client sends them (calls under ``function``)."""
    out = copy.deepcopy(messages)
    for msg in out:
        if msg.get("tool_calls"):
            msg["tool_calls"] = [{"type": "function", "function": c} for c in msg["tool_calls"]]
    return out


@pytest.fixture()
def qwen_tokenizer(smol_tokenizer):
    """SmolLM2's tokenizer (same chatml tokens) with Qwen2.5-Instruct's published template."""
    tok = copy.copy(smol_tokenizer)
    tok.chat_template = QWEN2_5_JINJA
    return tok


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("with_tools", [True, False])
def test_qwen2_5_tools_byte_identical_to_its_jinja(name, with_tools, qwen_tokenizer):
    conv, tools = CONVERSATIONS[name], TOOLS if with_tools else None
    ours, auto = get_template("qwen2_5"), get_template("auto", qwen_tokenizer)
    for end in range(1, len(conv) + 1):
        part = conv[:end]
        if part[-1]["role"] == "assistant":
            want = qwen_tokenizer.apply_chat_template(_openai(part), tools=tools, tokenize=False)
            assert "".join(t for t, _ in ours.render(part, qwen_tokenizer, tools)) == want
            assert "".join(t for t, _ in auto.render(part, qwen_tokenizer, tools)) == want
        else:
            want = qwen_tokenizer.apply_chat_template(
                _openai(part), tools=tools, tokenize=False, add_generation_prompt=True
            )
            assert ours.render_prompt(part, qwen_tokenizer, tools) == want
            assert auto.render_prompt(part, qwen_tokenizer, tools) == want
    assert auto.tool_format == ours.tool_format == "hermes"


@pytest.mark.parametrize("name", ["chatml", "smollm2", "qwen2_5"])
def test_exported_jinja_renders_tools_like_the_template(name, smol_tokenizer):
    """``xtuner merge`` writes ``to_jinja()``: transformers (and vLLM) then render tools,
    calls and results exactly as training did."""
    template = get_template(name)
    jinja = template.to_jinja()
    for conv in CONVERSATIONS.values():
        for tools in (TOOLS, None):
            want = "".join(t for t, _ in template.render(conv, smol_tokenizer, tools))
            got = smol_tokenizer.apply_chat_template(
                _openai(conv), tools=tools, tokenize=False, chat_template=jinja
            )
            assert got == want
            prompt = conv[:2]
            got = smol_tokenizer.apply_chat_template(
                _openai(prompt),
                tools=tools,
                tokenize=False,
                add_generation_prompt=True,
                chat_template=jinja,
            )
            assert got == template.render_prompt(prompt, smol_tokenizer, tools)


def test_tool_calls_are_trained_results_and_schemas_are_not(smol_tokenizer):
    template = get_template("smollm2")
    conv = CONVERSATIONS["no_system_two_calls"]
    segments = template.render(conv, smol_tokenizer, TOOLS)
    ids, labels = tokenize_rendered([segments], smol_tokenizer, None).sample(0)
    trained = smol_tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}' in trained
    assert '{"name": "calculator", "arguments": {"expression": "2+2"}}\n</tool_call>' in trained
    assert "21 degrees; 4." in trained and "You are welcome." in trained
    for untrained in ("<tool_response>", '{"temp": 21}', "<tools>", "Weather in a city"):
        assert untrained not in trained


def test_hermes_parse_and_streaming_hold():
    fmt = get_tool_format("hermes")
    text = (
        'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "calculator", "arguments": "{\\"expression\\": '
        '\\"1+1\\"}"}\n</tool_call>'
    )
    parsed = fmt.parse(text, TOOLS)
    assert parsed.content == "Checking."
    assert parsed.calls == [
        {"name": "get_weather", "arguments": {"city": "Oslo"}},
        {"name": "calculator", "arguments": {"expression": "1+1"}},
    ]
    assert not parsed.errors
    # the rendered call parses back to itself
    rendered = get_template("smollm2").render(
        [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": [CALL]},
        ]
    )
    body = rendered[-2][0].removesuffix("<|im_end|>")
    assert fmt.parse(body, TOOLS).calls == [CALL]
    # unterminated (generation stopped) still reads; bad JSON and unknown tools are errors
    assert fmt.parse('<tool_call>\n{"name": "get_weather", "arguments": {}}', TOOLS).calls
    bad = fmt.parse(
        '<tool_call>\n{"name": "get_weather", "arguments": {city}}\n</tool_call>', TOOLS
    )
    assert not bad.calls and "not valid JSON" in bad.errors[0]
    unknown = fmt.parse('<tool_call>{"name": "rm", "arguments": {}}</tool_call>', TOOLS)
    assert "'rm', which is not among the tools" in unknown.errors[0]
    assert fmt.parse("Just an answer.", TOOLS).content == "Just an answer."
    # streaming: text from a call's start, or what may be its start, is held back
    assert fmt.held_back("Sure <tool") == len("<tool")
    assert fmt.held_back("Sure <tool_call>\n{") == len("<tool_call>\n{")
    assert fmt.held_back("Sure.") == 0


def test_react_fallback_round_trip(smol_tokenizer):
    template = get_template("llama2_chat")
    assert template.tool_format == "react"
    conv = CONVERSATIONS["system"]
    text = "".join(t for t, _ in template.render(conv, smol_tokenizer, TOOLS))
    assert "Action: get_weather\nAction Input: " in text and "Observation: " in text
    assert '"name": "get_weather"' in text  # the tool list in the system prompt
    fmt = get_tool_format("react")
    parsed = fmt.parse(
        'Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Oslo"}\n'
        "Observation: made up",
        TOOLS,
    )
    assert parsed.content == "I need the weather."
    assert parsed.calls == [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    assert fmt.parse("Thought: done\nFinal Answer: 42", TOOLS).content == "42"
    assert "Observation:" in fmt.stop_words


def test_normalize_tools_and_calls():
    glaive = json.dumps([WEATHER["function"]])
    assert normalize_tools(glaive) == [WEATHER]
    assert normalize_tools([WEATHER]) == [WEATHER]
    with pytest.raises(ToolSpecError) as err:
        normalize_tools("[{]", field="tools")
    assert err.value.field == "tools" and "not valid JSON" in err.value.reason
    with pytest.raises(ToolSpecError) as err:
        normalize_tools([{"description": "no name"}])
    assert err.value.field == "tools[0]"
    openai_call = {"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    assert normalize_call(openai_call, ["get_weather"], "c") == {
        "name": "get_weather",
        "arguments": {},
    }
    with pytest.raises(ToolSpecError) as err:
        normalize_call({"name": "get_weather", "arguments": "[1]"}, None, "calls[0]")
    assert err.value.field == "calls[0].arguments"


def _example_tool(city: str, days: int = 1, units: list[str] | None = None) -> str:
    """Forecast for a city.

    More text that is not the description.

    Args:
        city: the city's name
        days (int): how many days ahead
    """
    return f"{city}:{days}"


def test_function_schema_from_signature_and_docstring():
    schema = function_schema(_example_tool)["function"]
    assert schema["name"] == "_example_tool"
    assert schema["description"] == "Forecast for a city."
    props = schema["parameters"]["properties"]
    assert props["city"] == {"type": "string", "description": "the city's name"}
    assert props["days"] == {"type": "integer", "description": "how many days ahead"}
    assert schema["parameters"]["required"] == ["city"]


def test_calculator_is_exact_and_refuses_code():
    assert calculator("(12 + 7) * 3") == "57"
    assert calculator("2^10") == "1024"
    assert calculator("sqrt(16) / 8") == "0.5"
    assert calculator("1/0").startswith("error")
    assert "unsupported expression" in calculator("__import__('os').system('ls')")
    assert "too large" in calculator("9**9**9")


def test_search_reads_a_local_folder(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("Paris is the capital of France.\n\nBerlin has bears.")
    (tmp_path / "b.md").write_text("Nothing here.")
    monkeypatch.setenv("XTUNER_SEARCH_DIR", str(tmp_path))
    found = search("capital of France", max_results=1)
    assert "[a.txt]" in found and "Paris" in found and "Berlin" not in found
    assert "no passage" in search("zebra")


HOSTILE = {
    "network": "import socket\nsocket.create_connection(('127.0.0.1', 80), 1)",
    "write outside": "open('/tmp/xtuner_sandbox_escape.txt', 'w').write('x')",
    "fork bomb": "import os\nwhile True:\n    os.fork()",
    "10 GB": "x = bytearray(10 << 30)",
    "endless loop": "while True:\n    pass",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_python_tool_stops_hostile_code(case):
    result = run_python(HOSTILE[case], timeout=2.0)
    assert not result.ok
    report = result.describe()
    expected = {
        "network": "network access is not allowed",
        "write outside": "writing outside the working folder",
        "fork bomb": "starting processes is not allowed",
        "10 GB": "MemoryError",
        "endless loop": "time limit of 2 s",
    }[case]
    assert expected in report
    assert not Path("/tmp/xtuner_sandbox_escape.txt").exists()
    # and the sandbox still works afterwards
    assert run_python("print(6 * 7)").describe() == "42"


def test_tool_loop_runs_calls_until_an_answer():
    """A scripted model: it calls the calculator, reads the result, then answers."""
    tools = load_tools("calculator")
    fmt = get_tool_format("hermes")
    seen = []

    def generate(messages):
        seen.append(messages[-1])
        if messages[-1]["role"] == "user":
            return '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}'
        return f"The answer is {messages[-1]['content']}."

    calls = []
    turn = run_tool_turn(
        generate,
        [{"role": "user", "content": "6 times 7?"}],
        ToolBox(tools),
        fmt,
        on_call=lambda c, r: calls.append((c["name"], r)),
    )
    assert turn.answer == "The answer is 42."
    assert calls == [("calculator", "42")]
    assert [m["role"] for m in turn.messages] == ["assistant", "tool", "assistant"]


def test_tool_loops_run_in_lockstep_batches():
    """Many conversations: each round generates only those still calling tools, in one batch;
    one that never stops calling ends with the rounds."""
    fmt = get_tool_format("hermes")
    batches = []

    def generate(conversations):
        batches.append(len(conversations))
        replies = []
        for messages in conversations:
            question = messages[0]["content"]
            if question == "loop?" or messages[-1]["role"] == "user" and question != "hi":
                replies.append('<tool_call>\n{"name": "calculator", "arguments": '
                               f'{{"expression": "{question}"}}}}')  # fmt: skip
            else:
                replies.append(f"Answer: {messages[-1]['content']}")
        return replies

    turns = run_tool_turns(
        generate,
        [[{"role": "user", "content": q}] for q in ("hi", "6*7", "loop?")],
        ToolBox(load_tools("calculator")),
        fmt,
        max_rounds=3,
    )
    assert batches == [3, 2, 1]
    assert [t.answer for t in turns][:2] == ["Answer: hi", "Answer: 42"]
    assert turns[2].answer.startswith("(stopped") and len(turns[2].calls) == 3


def test_tool_failures_reach_the_model_not_the_caller():
    def broken(x: int) -> str:
        """Fails."""
        raise RuntimeError("disk on fire")

    box = ToolBox(load_tools("calculator") + [type(load_tools("calculator")[0]).of(broken)])
    assert box.run({"name": "broken", "arguments": {"x": 1}}) == "error: RuntimeError: disk on fire"
    assert "bad arguments" in box.run({"name": "calculator", "arguments": {"x": 1}})
    assert "no tool 'nope'" in box.run({"name": "nope", "arguments": {}})


def test_load_tools_errors_name_the_problem(tmp_path):
    with pytest.raises(ToolError, match="unknown tool 'calculater'; did you mean 'calculator'"):
        load_tools("calculater")
    broken = tmp_path / "tools.py"
    broken.write_text("raise ValueError('oops')\n")
    with pytest.raises(ToolError, match=r"tools.py: ValueError: oops"):
        load_tools(tools_file=str(broken))
    good = tmp_path / "mine.py"
    good.write_text(
        'def shout(text: str) -> str:\n    """Upper-case text."""\n    return text.upper()\n'
    )
    (tool,) = load_tools(tools_file=str(good))
    assert tool.name == "shout" and tool.fn("hi") == "HI"


def test_server_reads_tools_tool_choice_and_call_messages():
    from xtuner_lite.server import APIError, request_message, tool_use

    hermes = get_tool_format("hermes")
    assert tool_use({}, hermes) is None
    assert tool_use({"tools": TOOLS, "tool_choice": "none"}, hermes) is None
    auto = tool_use({"tools": TOOLS}, hermes)
    assert auto.tools == TOOLS and auto.prefill == ""
    assert tool_use({"tools": TOOLS, "tool_choice": "required"}, hermes).prefill == (
        '<tool_call>\n{"name": "'
    )
    named = tool_use(
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "calculator"}}},
        hermes,
    )
    reply = named.read('{"expression": "1+1"}}\n</tool_call>')
    assert reply.calls == [{"name": "calculator", "arguments": {"expression": "1+1"}}]
    single = tool_use({"tools": TOOLS, "parallel_tool_calls": False}, hermes)
    two = '<tool_call>{"name": "calculator", "arguments": {}}</tool_call>' * 2
    assert len(single.read(two).calls) == 1
    for body, param in [
        ({"tools": "x"}, "tools"),
        ({"tools": [{"function": {}}]}, "tools[0]"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ]:
        with pytest.raises(APIError) as err:
            tool_use(body, hermes)
        assert err.value.param == param
    message = request_message(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        3,
    )
    assert message == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"name": "f", "arguments": {}}],
    }
