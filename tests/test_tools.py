"""Tool use: one format from template to parser, the built-in tools, the sandbox, the loop."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from xtuner_lite.commands.merge import write_tokenizer
from xtuner_lite.data import IGNORE_INDEX, get_template, tokenize_rendered
from xtuner_lite.data.templates import renders_like
from xtuner_lite.errors import XtunerError
from xtuner_lite.inference.engine import InferenceEngine
from xtuner_lite.inference.sampling import SamplingParams
from xtuner_lite.toolcalling import (
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
from xtuner_lite.toolcalling.builtin import calculator, search
from xtuner_lite.toolcalling.formats import call_ids

FIXTURES = Path(__file__).parent / "fixtures"
QWEN2_5_JINJA = (FIXTURES / "qwen2_5_chat_template.jinja").read_text()
# the chat templates published with Llama-3.1-8B-Instruct and Mistral-7B-Instruct-v0.3
NATIVE_JINJA = {
    "llama3_1_chat": (FIXTURES / "llama3_1_chat_template.jinja").read_text(),
    "mistral_v3": (FIXTURES / "mistral_v3_chat_template.jinja").read_text(),
}

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
    "one_call_per_turn": [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
        {"role": "user", "content": "And 2+2?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"name": "calculator", "arguments": {"expression": "2+2"}}],
        },
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "4."},
    ],
}


def _openai(messages: list[dict]) -> list[dict]:
    """The same messages as an OpenAI client sends them (calls under ``function``, with the
    ids the formats give them)."""
    out = copy.deepcopy(messages)
    for msg, ids in zip(out, call_ids(messages)):
        if msg.get("tool_calls"):
            msg["tool_calls"] = [
                {"type": "function", "id": i, "function": c} for c, i in zip(msg["tool_calls"], ids)
            ]
        elif msg["role"] == "tool":
            msg["tool_call_id"] = ids
    return out


def assert_renders_like_jinja(template, jinja_tokenizer, conv, tools, turns=True) -> None:
    """Every prefix of ``conv`` with a user turn renders as the tokenizer's jinja does: whole
    turns with ``render`` (unless not ``turns``), prompts (ending in a user or tool turn) with
    ``render_prompt``."""
    first_user = next(i for i, m in enumerate(conv) if m["role"] == "user")
    for end in range(first_user + 1, len(conv) + 1):
        part = conv[:end]
        if part[-1]["role"] == "assistant":
            if not turns:
                continue
            want = jinja_tokenizer.apply_chat_template(_openai(part), tools=tools, tokenize=False)
            assert "".join(t for t, _ in template.render(part, jinja_tokenizer, tools)) == want
        else:
            want = jinja_tokenizer.apply_chat_template(
                _openai(part), tools=tools, tokenize=False, add_generation_prompt=True
            )
            assert template.render_prompt(part, jinja_tokenizer, tools) == want


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
    assert_renders_like_jinja(ours, qwen_tokenizer, conv, tools)
    assert_renders_like_jinja(auto, qwen_tokenizer, conv, tools)
    assert auto.tool_format == ours.tool_format == "hermes"


@pytest.mark.parametrize(
    "name, conv",
    # Llama-3.1 takes one call per turn: two in one turn is the next test's error
    [(n, c) for n in sorted(NATIVE_JINJA) for c in sorted(CONVERSATIONS)
     if (n, c) != ("llama3_1_chat", "no_system_two_calls")],
)  # fmt: skip
@pytest.mark.parametrize("with_tools", [True, False])
def test_native_tool_formats_byte_identical_to_published_jinja(
    name, conv, with_tools, smol_tokenizer
):
    """Llama-3.1's JSON calls and Mistral v3's [TOOL_CALLS] render as the models' published
    chat templates do, with and without tools; ``auto`` over that jinja parses the same way."""
    tok = copy.copy(smol_tokenizer)
    tok.chat_template = NATIVE_JINJA[name]
    tools = TOOLS if with_tools else None
    ours, auto = get_template(name), get_template("auto", tok)
    assert_renders_like_jinja(ours, tok, CONVERSATIONS[conv], tools)
    # Mistral's jinja moves the tools and the system prompt to the last user turn, so an earlier
    # turn renders differently once the conversation goes on: ``auto`` cannot cut it into
    # trained turns and says so (prompts it renders whole, as the jinja does)
    moving = name == "mistral_v3" and (tools or conv == "system")
    two_users = sum(m["role"] == "user" for m in CONVERSATIONS[conv]) > 1
    assert_renders_like_jinja(auto, tok, CONVERSATIONS[conv], tools, turns=not moving)
    if moving and two_users:
        with pytest.raises(XtunerError, match="does not render conversations prefix by prefix"):
            auto.render(CONVERSATIONS[conv], tok, tools)
    assert auto.tool_format == ours.tool_format


def test_llama3_1_refuses_two_calls_in_one_turn(smol_tokenizer):
    with pytest.raises(XtunerError, match="one tool call per assistant turn, got 2"):
        get_template("llama3_1_chat").render(CONVERSATIONS["no_system_two_calls"], None, TOOLS)


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


@pytest.mark.parametrize("name", ["smollm2", "llama3_1_chat", "mistral_v3", "internlm2_chat"])
def test_each_format_reads_back_what_it_writes(name, smol_tokenizer):
    """A call as the template trains it parses back to itself; a forced call (``prefill``)
    starts as training writes one; streaming holds back every prefix of a call, never text."""
    template = get_template(name)
    fmt = get_tool_format(template.tool_format)
    conv = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
    ]
    trained = [t for t, on in template.render(conv, smol_tokenizer, TOOLS) if on][-1]
    reply = trained
    for stop in template.stop_words(smol_tokenizer):
        reply = reply.removesuffix(stop)
    parsed = fmt.parse(reply, TOOLS)
    assert parsed.calls == [CALL] and not parsed.errors and parsed.content == ""
    for name_ in ("get_weather", ""):
        assert reply.lstrip().startswith(fmt.prefill(name_)), fmt.prefill(name_)
    assert all(fmt.held_back(reply[:k]) == k for k in range(1, len(reply) + 1))
    assert fmt.held_back("Sure.") == 0
    if name in ("llama3_1_chat", "mistral_v3"):  # a call is the rest of the reply
        assert fmt.parse(reply + "\nI called it.", TOOLS).calls == [CALL]
    plain = fmt.parse("Just an answer.", TOOLS)
    assert plain.content == "Just an answer." and not plain.calls and not plain.errors
    broken = fmt.parse(fmt.prefill("get_weather") + " {city}", TOOLS)
    assert not broken.calls and "not valid JSON" in broken.errors[0]
    unknown = fmt.parse(fmt.prefill("rm") + " {}" + "}" * (name != "llama3_1_chat"), TOOLS)
    assert not unknown.calls and unknown.errors, unknown


def test_parallel_calls_read_back_in_mistral_and_internlm():
    mistral = get_tool_format("mistral").parse(
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}, "id": "a1b2c3d4e"}, '
        '{"name": "calculator", "arguments": {"expression": "1+1"}, "id": "f5g6h7i8j"}]',
        TOOLS,
    )
    internlm = get_tool_format("internlm").parse(
        'Checking.<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": '
        '"Oslo"}}<|action_end|><|action_start|><|plugin|>\n{"name": "calculator", "parameters": '
        '{"expression": "1+1"}}<|action_end|>',
        TOOLS,
    )
    both = [
        {"name": "get_weather", "arguments": {"city": "Oslo"}},
        {"name": "calculator", "arguments": {"expression": "1+1"}},
    ]
    assert mistral.calls == internlm.calls == both
    assert internlm.content == "Checking."


def test_internlm2_5_tools_as_its_chat_format_guide_writes_them():
    """InternLM2.5's tokenizer template has no tools; the expected text follows InternLM's
    chat-format guide (plugin system turn, <|action_start|><|plugin|> call, environment)."""
    conv = [
        {"role": "system", "content": "You are InternLM2-Chat, a harmless AI assistant."},
        {"role": "user", "content": "Weather in Shanghai?"},
        {
            "role": "assistant",
            "content": "Sure, I will search for the weather of Shanghai.",
            "tool_calls": [{"name": "get_weather", "arguments": {"city": "Shanghai"}}],
        },
        {"role": "tool", "content": '{"temperature": 22}'},
        {"role": "assistant", "content": "It is 22 degrees."},
    ]
    tok = SimpleNamespace(bos_token="<s>", eos_token="</s>")
    segments = get_template("internlm2_chat").render(conv, tok, [WEATHER])
    assert "".join(t for t, _ in segments) == (
        "<s><|im_start|>system\nYou are InternLM2-Chat, a harmless AI assistant.<|im_end|>\n"
        "<|im_start|>system name=<|plugin|>\n"
        "[\n"
        "    {\n"
        '        "name": "get_weather",\n'
        '        "description": "Weather in a city",\n'
        '        "parameters": {\n'
        '            "type": "object",\n'
        '            "properties": {\n'
        '                "city": {\n'
        '                    "type": "string"\n'
        "                }\n"
        "            },\n"
        '            "required": [\n'
        '                "city"\n'
        "            ]\n"
        "        }\n"
        "    }\n"
        "]<|im_end|>\n"
        "<|im_start|>user\nWeather in Shanghai?<|im_end|>\n"
        "<|im_start|>assistant\nSure, I will search for the weather of Shanghai."
        '<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": "Shanghai"}}'
        "<|action_end|><|im_end|>\n"
        '<|im_start|>environment name=<|plugin|>\n{"temperature": 22}<|im_end|>\n'
        "<|im_start|>assistant\nIt is 22 degrees.<|im_end|>\n"
    )
    trained = "".join(t for t, on in segments if on)
    assert "<|action_start|><|plugin|>" in trained and "temperature" not in trained


def test_decoding_keeps_only_the_special_tokens_a_call_needs(smol_tokenizer):
    """InternLM's and Mistral's calls open with special tokens: the engine keeps those a
    request asks for and drops the rest, as before."""
    ids = smol_tokenizer("<|im_start|>hi<|im_end|>", add_special_tokens=False)["input_ids"]
    keep = smol_tokenizer.convert_tokens_to_ids("<|im_start|>")
    engine = SimpleNamespace(tokenizer=smol_tokenizer)

    def decode(params):
        return InferenceEngine.decode(engine, SimpleNamespace(output_ids=ids, params=params))

    assert decode(SamplingParams()) == "hi"
    assert decode(SamplingParams(keep_token_ids=[keep])) == "<|im_start|>hi"


@pytest.mark.parametrize("name", sorted(NATIVE_JINJA))
def test_merge_keeps_a_published_template_that_renders_like_ours(name, smol_tokenizer, tmp_path):
    tok = copy.copy(smol_tokenizer)
    tok.chat_template = NATIVE_JINJA[name]
    assert renders_like(get_template(name), tok)
    write_tokenizer(tmp_path, tok, name)
    assert tok.chat_template == NATIVE_JINJA[name]
    # SmolLM2's own jinja has no tools: the smollm2 template is written in its place
    smol = copy.copy(smol_tokenizer)
    assert not renders_like(get_template("smollm2"), smol)
    write_tokenizer(tmp_path, smol, "smollm2")
    assert smol.chat_template == get_template("smollm2").to_jinja()


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
    assert calculator("9**9**9").startswith("error: the result would have about")


def test_search_reads_a_local_folder(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("Paris is the capital of France.\n\nBerlin has bears.")
    (tmp_path / "b.md").write_text("Nothing here.")
    monkeypatch.setenv("XTUNER_SEARCH_DIR", str(tmp_path))
    found = search("capital of France", max_results=1)
    assert "[a.txt]" in found and "Paris" in found and "Berlin" not in found
    assert "no passage" in search("zebra")


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
    undefined = tmp_path / "undefined.py"  # a NameError escaped as a traceback
    undefined.write_text(
        "from __future__ import annotations\n\n"
        'def fetch(url: Url) -> str:\n    """Fetch."""\n    return url\n'
    )
    unreadable = r"undefined.py: function 'fetch': its annotations cannot be read \(NameError"
    with pytest.raises(ToolError, match=unreadable):
        load_tools(tools_file=str(undefined))


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
