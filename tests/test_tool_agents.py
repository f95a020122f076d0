"""Tool use end to end: a LoRA adapter trained here on the seeded calculator conversations, then
driven by ``xtuner chat --tools`` in a terminal, by the official openai client against
``xtuner serve``, and by a real agent framework (smolagents' ToolCallingAgent)."""

from __future__ import annotations

import json
import sys

import pytest

from xtuner_lite.toolcalling.builtin import Tool, calculator

from conftest import EXAMPLE_DATA, run_in_pty, start_server

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
QUESTION = "What is 4821 + 377?"
CALCULATOR = Tool.of(calculator).schema


@pytest.fixture(scope="module")
def tool_adapter(tmp_path_factory):
    """SmolLM2 + LoRA after a short run on the calculator conversations alone (the bundled
    tool-call config, with its data and schedule cut down)."""
    from xtuner_lite.commands.train import train

    adapter = train(
        "smollm2_135m_toolcall_lora",
        work_dir=str(tmp_path_factory.mktemp("toolcall")),
        cfg_options={
            "train_dataset.data_files": str(EXAMPLE_DATA / "calculator_train.jsonl"),
            "train.max_iters": 14,
            "train.batch_size": 2,
            "train.accumulative_counts": 1,
            "train.lr": 1e-3,
            "train.save_steps": 1000,
        },
    )
    return str(adapter)


@pytest.fixture(scope="module")
def tool_server(tool_adapter):
    proc, (host, port) = start_server(
        MODEL, "--adapter", tool_adapter, "--served-model-name", MODEL
    )
    yield f"http://{host}:{port}/v1"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(tool_server):
    import openai

    return openai.OpenAI(base_url=tool_server, api_key="unused", max_retries=0)


def test_chat_calls_the_calculator_in_a_terminal(tool_adapter):
    cmd = [sys.executable, "-m", "xtuner_lite.cli", "chat", MODEL, "--adapter", tool_adapter]
    code, text = run_in_pty(
        [*cmd, "--tools", "calculator", "--max-new-tokens", "64"],
        timeout=300,
        typed=f"{QUESTION}\nEXIT\n",
    )
    assert code == 0, text
    assert '[tool] calculator({"expression": "4821 + 377"})' in text, text
    assert "[result] 5198" in text
    answer = text.split("[result] 5198", 1)[1]
    assert "5198" in answer  # the answer after the result uses it
    assert "<tool_call>" not in text  # the call is shown as a call, never as raw text


def test_openai_client_tool_call_round_trip(client):
    messages = [{"role": "user", "content": QUESTION}]
    first = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[CALCULATOR], max_tokens=64, temperature=0
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "calculator"
    arguments = json.loads(call.function.arguments)
    assert arguments == {"expression": "4821 + 377"}
    result = calculator(**arguments)
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    final = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[CALCULATOR], max_tokens=64, temperature=0
    )
    assert final.choices[0].finish_reason == "stop"
    assert not final.choices[0].message.tool_calls
    assert "5198" in final.choices[0].message.content


def test_streamed_tool_calls_arrive_as_deltas(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": QUESTION}],
        tools=[CALCULATOR],
        max_tokens=64,
        temperature=0,
        stream=True,
    )
    content, calls, reasons = "", [], []
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        calls += delta.tool_calls or []
        reasons.append(chunk.choices[0].finish_reason)
    assert "<tool_call>" not in content
    assert [c.function.name for c in calls] == ["calculator"]
    assert json.loads(calls[0].function.arguments) == {"expression": "4821 + 377"}
    assert reasons[-1] == "tool_calls"


def test_tool_choice_none_and_named(client):
    ask = dict(model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=64)
    plain = client.chat.completions.create(
        **ask, tools=[CALCULATOR], tool_choice="none", temperature=0
    )
    assert plain.choices[0].finish_reason != "tool_calls"
    assert not plain.choices[0].message.tool_calls
    named = client.chat.completions.create(
        **ask,
        tools=[CALCULATOR],
        tool_choice={"type": "function", "function": {"name": "calculator"}},
        temperature=0,
    )
    assert named.choices[0].message.tool_calls[0].function.name == "calculator"


def test_bad_tool_requests_name_the_parameter(client):
    import openai

    ask = dict(model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=8)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**ask, tools=[{"type": "function", "function": {}}])
    assert err.value.body["param"] == "tools[0]"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            **ask,
            tools=[CALCULATOR],
            tool_choice={"type": "function", "function": {"name": "rm"}},
        )
    assert err.value.body["param"] == "tool_choice"
    bad_call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "calculator", "arguments": "{x"}}
        ],
    }
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**{**ask, "messages": [*ask["messages"], bad_call]})
    assert err.value.body["param"] == "messages[1].tool_calls[0].arguments"


def test_smolagents_tool_calling_agent_runs_the_loop(tool_server):
    """A real agent framework drives the server: it sends its own system prompt, the tools as
    OpenAI ``tools`` and ``tool_choice: "required"``, runs the call the model makes and feeds
    the result back, and ends with the model's final answer."""
    from smolagents import OpenAIServerModel, ToolCallingAgent, tool

    calls = []

    @tool
    def calculator_tool(expression: str) -> str:
        """Evaluate an arithmetic expression and return the result.

        Args:
            expression: arithmetic such as "(12 + 7) * 3"
        """
        calls.append(expression)
        return calculator(expression)

    calculator_tool.name = "calculator"
    model = OpenAIServerModel(
        model_id=MODEL, api_base=tool_server, api_key="unused", temperature=0, max_tokens=64
    )
    agent = ToolCallingAgent(tools=[calculator_tool], model=model, max_steps=1, verbosity_level=0)
    answer = agent.run(QUESTION)
    assert calls == ["4821 + 377"]
    assert "5198" in str(answer)
