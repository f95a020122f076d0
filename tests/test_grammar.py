"""Grammar-constrained decoding on the bundled engine: JSON schemas and forced tool calls hold
with the embedded, untrained model, whatever it would have written."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from xtuner_lite.commands.chat import schema_file_grammar
from xtuner_lite.data.templates import get_template, stop_token_ids
from xtuner_lite.errors import XtunerError
from xtuner_lite.hub import load_model, load_tokenizer
from xtuner_lite.inference import InferenceEngine, SamplingParams
from xtuner_lite.inference.grammar import (
    Constraint,
    GrammarError,
    auto_tool_grammar,
    check_grammar,
    json_schema_grammar,
    tool_call_grammar,
)
from xtuner_lite.toolcalling.formats import HermesFormat

from conftest import CALCULATOR_TOOL, WEATHER_TOOL

pytestmark = pytest.mark.integration

_spec = importlib.util.spec_from_file_location(
    "random_schemas", Path(__file__).resolve().parents[1] / "benchmarks/random_schemas.py"
)
random_schemas = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(random_schemas)

CALCULATOR, WEATHER = CALCULATOR_TOOL, WEATHER_TOOL


@pytest.fixture(scope="module")
def smol():
    tok = load_tokenizer("smollm2-135m-instruct")
    template = get_template("smollm2")
    return load_model("smollm2-135m-instruct").eval(), tok, template


def _prompt(tok, template, text: str, prefill: str = "") -> list[int]:
    rendered = template.render_prompt([{"role": "user", "content": text}], tok) + prefill
    return tok(rendered, add_special_tokens=False)["input_ids"]


def test_seeded_schemas_every_reply_parses_and_validates(smol):
    """A dozen seeded schemas (objects, arrays, enums, bounded numbers, nested required
    fields; benchmarks/bench_grammar.py runs 100), decoded together in one batch, greedy and
    sampled: every reply is JSON valid under its schema."""
    model, tok, template = smol
    engine = InferenceEngine(model, tok)
    stops = stop_token_ids(template, tok)
    requests = []
    for i, schema in enumerate(random_schemas.schemas(12, seed=3)):
        params = SamplingParams(
            max_new_tokens=160, stop_token_ids=stops, temperature=0.0 if i % 2 else 0.8, seed=i
        )
        prompt = _prompt(tok, template, "Reply with a JSON object.")
        requests.append(
            (schema, engine.add_request(prompt, params, grammar=json_schema_grammar(schema)))
        )
    while engine.has_work:
        engine.step()
    for schema, request in requests:
        assert request.finish_reason == "stop", (schema, request.text)
        jsonschema.validate(json.loads(request.text), schema)


def test_the_unconstrained_model_does_not_write_the_json(smol):
    """The guard for the test above: without the grammar the same prompt is not valid JSON."""
    model, tok, template = smol
    params = SamplingParams(max_new_tokens=60, stop_token_ids=stop_token_ids(template, tok))
    text = (
        InferenceEngine(model, tok)
        .generate([_prompt(tok, template, "Reply with a JSON object.")], params)[0]
        .text
    )
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


@pytest.mark.parametrize("name", ["", "weather"])
def test_a_forced_call_is_a_valid_call_every_time(smol, name):
    """tool_choice required ("") or named: after the format's prefill, the rest of the reply is
    a call in the template's format whose arguments validate against the tool's schema."""
    model, tok, template = smol
    fmt = HermesFormat()
    tools = [CALCULATOR, WEATHER]
    prefill = fmt.prefill(name)
    grammar = tool_call_grammar(fmt.call_text, tools, name, prefill)
    engine = InferenceEngine(model, tok)
    params = SamplingParams(max_new_tokens=80, stop_token_ids=stop_token_ids(template, tok))
    questions = ["What is 17 * 23?", "Weather in Paris?", "Hello!", "Tell me a joke."]
    requests = [
        engine.add_request(_prompt(tok, template, q, prefill), params, grammar=grammar)
        for q in questions
    ]
    while engine.has_work:
        engine.step()
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for request in requests:
        parsed = fmt.parse(prefill + request.text, tools)
        assert len(parsed.calls) == 1 and not parsed.errors, request.text
        call = parsed.calls[0]
        assert call["name"] == (name or call["name"])
        jsonschema.validate(call["arguments"], schemas[call["name"]])


def test_unsupported_schema_features_are_named():
    with pytest.raises(GrammarError, match="if"):
        check_grammar(json_schema_grammar({"type": "object", "if": {"type": "object"}}))
    with pytest.raises(GrammarError, match="must be an object"):
        json_schema_grammar(["not", "a", "schema"])


def test_chat_json_schema_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(XtunerError, match="bad.json: not JSON"):
        schema_file_grammar(str(bad))
    unsupported = tmp_path / "if.json"
    unsupported.write_text(json.dumps({"type": "object", "if": {}}))
    with pytest.raises(XtunerError, match=r"if.json: .*if"):
        schema_file_grammar(str(unsupported))
    with pytest.raises(XtunerError, match="missing.json: cannot read"):
        schema_file_grammar(str(tmp_path / "missing.json"))


def test_auto_lets_the_model_choose_but_a_started_call_is_valid(smol_tokenizer):
    """tool_choice auto: plain text passes, a call after some text or at once passes, a call
    that breaks the tool's schema is refused at the first token that breaks it."""
    fmt = HermesFormat()
    grammar = auto_tool_grammar(fmt.call_text, [CALCULATOR, WEATHER], fmt.prefill(""))
    call = fmt.call_text({"name": "weather", "arguments": {"city": "Oslo", "unit": "C"}})
    for text, valid in [
        ("It is sunny, no tool needed.", True),
        ("Let me check. " + call, True),
        (call, True),
        ('Let me check. <tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}', False),
        ('<tool_call>\n{"name": "rm", "arguments": {}}', False),
    ]:
        matcher = Constraint(grammar, smol_tokenizer).matcher
        ids = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
        consumed = matcher.try_consume_tokens(ids)
        assert (consumed == len(ids) and matcher.is_accepting()) == valid, text


def test_xtuner_chat_json_schema_prints_a_valid_document(tmp_path):
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "blue"]},
              "count": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["colour", "count"], "additionalProperties": False}  # fmt: skip
    path = tmp_path / "answer.json"
    path.write_text(json.dumps(schema))
    run = subprocess.run(
        [sys.executable, "-m", "xtuner_lite.cli", "chat", "smollm2-135m-instruct",
         "--json-schema", str(path), "--prompt", "Pick a colour.", "--no-stream"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    jsonschema.validate(json.loads(run.stdout.strip().splitlines()[-1]), schema)
    path.write_text(json.dumps({"type": "object", "if": {}}))
    run = subprocess.run(
        [sys.executable, "-m", "xtuner_lite.cli", "chat", "smollm2-135m-instruct",
         "--json-schema", str(path), "--prompt", "hi"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode != 0 and "answer.json" in run.stderr and "Traceback" not in run.stderr
