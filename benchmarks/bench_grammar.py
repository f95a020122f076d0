"""Grammar-constrained decoding with the embedded, untrained SmolLM2-135M-Instruct: does every
reply hold, and what does the constraint cost?

- 100 seeded JSON schemas (``random_schemas.py``: objects, arrays, enums, bounded numbers,
  nested required fields), all in one continuous batch: every reply must parse and validate
  (``jsonschema``).
- Forced tool calls: questions × (``tool_choice`` required, named), each must be one call whose
  arguments validate against the tool's parameters.
- Cost: the same prompts decoded with the JSON-schema constraint and without, each side in its
  own process, alternating; generated tokens/s of each (the median over the pairs).

Run: python benchmarks/bench_grammar.py [--schemas 100] [--pairs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jsonschema
from random_schemas import schemas
from sides import cpu_name, report, run_side

from xtuner_lite.data.templates import get_template, stop_token_ids
from xtuner_lite.hub import load_model, load_tokenizer
from xtuner_lite.inference import InferenceEngine, SamplingParams
from xtuner_lite.inference.grammar import Constraint, json_schema_grammar, tool_call_grammar
from xtuner_lite.toolcalling.formats import HermesFormat

MODEL = "smollm2-135m-instruct"
QUESTIONS = ["What is 17 * 23?", "Hello!", "Weather in Oslo?", "Tell me a joke.",
             "Convert 3 km to miles.", "Who wrote Hamlet?"]  # fmt: skip
TOOLS = [
    {"type": "function", "function": {"name": "calculator", "parameters": {
        "type": "object", "properties": {"expression": {"type": "string", "maxLength": 40}},
        "required": ["expression"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                         "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
]  # fmt: skip


def setup():
    tok = load_tokenizer(MODEL)
    template = get_template("smollm2")
    return load_model(MODEL).eval(), tok, template, stop_token_ids(template, tok)


def prompt_ids(tok, template, text: str, prefill: str = "") -> list[int]:
    rendered = template.render_prompt([{"role": "user", "content": text}], tok) + prefill
    return tok(rendered, add_special_tokens=False)["input_ids"]


def run(engine, jobs) -> list:
    """``jobs``: (prompt ids, params, grammar); all admitted at once, run to the end."""
    requests = [engine.add_request(p, params, grammar=g) for p, params, g in jobs]
    while engine.has_work:
        engine.step()
    return requests


def schema_replies(count: int, max_new_tokens: int) -> tuple[list[dict], list, list[int]]:
    """The ``count`` seeded schemas, the embedded model's constrained replies to them (decoded
    together in one batch) and the stop tokens."""
    model, tok, template, stops = setup()
    engine = InferenceEngine(model, tok)
    prompt = prompt_ids(tok, template, "Reply with a JSON object.")
    params = SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=stops)
    cases = schemas(count, seed=0)
    return cases, run(engine, [(prompt, params, json_schema_grammar(s)) for s in cases]), stops


def check_schemas(count: int) -> tuple[int, int]:
    cases, requests, _ = schema_replies(count, max_new_tokens=256)
    valid = 0
    for schema, request in zip(cases, requests):
        try:
            jsonschema.validate(json.loads(request.text), schema)
            valid += 1
        except (json.JSONDecodeError, jsonschema.ValidationError) as exc:
            print(f"INVALID ({type(exc).__name__}): {json.dumps(schema)}\n  {request.text!r}")
    return valid, count


def check_calls() -> tuple[int, int]:
    model, tok, template, stops = setup()
    engine, fmt = InferenceEngine(model, tok), HermesFormat()
    params = SamplingParams(max_new_tokens=96, stop_token_ids=stops)
    parameters = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    valid = total = 0
    for name in ["", "calculator", "weather"]:  # "": required (any tool)
        prefill = fmt.prefill(name)
        grammar = tool_call_grammar(fmt.call_text, TOOLS, name, prefill)
        jobs = [(prompt_ids(tok, template, q, prefill), params, grammar) for q in QUESTIONS]
        for request in run(engine, jobs):
            parsed = fmt.parse(prefill + request.text, TOOLS)
            total += 1
            calls = parsed.calls
            if (
                len(calls) == 1
                and not parsed.errors
                and calls[0]["name"] == (name or calls[0]["name"])
            ):
                jsonschema.validate(calls[0]["arguments"], parameters[calls[0]["name"]])
                valid += 1
            else:
                print(f"NOT A VALID CALL ({name or 'required'}): {request.text!r}")
    return valid, total


def _timed_constraint() -> list[float]:
    """Seconds spent in the constraint's work (mask and advance), appended per call."""
    spent: list[float] = []
    for name in ("mask", "advance"):
        method = getattr(Constraint, name)

        def timed(self, *args, _method=method):
            start = time.perf_counter()
            out = _method(self, *args)
            spent.append(time.perf_counter() - start)
            return out

        setattr(Constraint, name, timed)
    return spent


def side(constrained: bool, count: int, lengths: list[int] | None) -> None:
    """One timed pass over the schemas' prompts, with their constraints, or without and each
    request held to ``lengths`` (the constrained replies' lengths: the same batch at every
    step, so tokens/s compare the same work)."""
    spent = _timed_constraint()
    model, tok, template, stops = setup()
    engine = InferenceEngine(model, tok)
    prompt = prompt_ids(tok, template, "Reply with a JSON object.")
    cases = schemas(count, seed=0)
    if constrained:
        params = SamplingParams(max_new_tokens=128, stop_token_ids=stops)
        jobs = [(prompt, params, json_schema_grammar(s)) for s in cases]
    else:
        jobs = [(prompt, SamplingParams(max_new_tokens=n), None) for n in lengths]
    run(engine, [(prompt, SamplingParams(max_new_tokens=8), None)])  # warm-up
    start = time.perf_counter()
    requests = run(engine, jobs)
    seconds = time.perf_counter() - start
    tokens = [len(r.output_ids) for r in requests]
    report(
        {
            "tokens": sum(tokens),
            "seconds": seconds,
            "tokens_per_s": sum(tokens) / seconds,
            "constraint_seconds": sum(spent),
            "lengths": tokens,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemas", type=int, default=100)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--cost-requests", type=int, default=32, help="requests per timed pass")
    parser.add_argument("--side", choices=["on", "off"], help=argparse.SUPPRESS)
    parser.add_argument("--lengths", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.side:
        lengths = json.loads(opts.lengths) if opts.lengths else None
        side(opts.side == "on", opts.cost_requests, lengths)
        return
    print(f"bench_grammar on {cpu_name()}")
    valid, total = check_schemas(opts.schemas)
    print(f"JSON schemas: {valid}/{total} replies parse and validate")
    valid_calls, calls = check_calls()
    print(f"forced tool calls (required, named): {valid_calls}/{calls} valid calls")
    rates: dict[str, list[float]] = {"off": [], "on": []}
    shares: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(opts.pairs):
        lengths = None
        for name in ("on", "off"):
            cmd = [
                sys.executable,
                __file__,
                "--side",
                name,
                "--cost-requests",
                str(opts.cost_requests),
            ]
            cmd += ["--lengths", json.dumps(lengths)] if lengths else []  # fmt: skip
            result = run_side(cmd, f"constraint {name}")
            lengths = result["lengths"]
            rates[name].append(result["tokens_per_s"])
            shares[name].append(result["constraint_seconds"] / result["seconds"])
            print(f"constraint {name}: {result['tokens']} tokens, {result['seconds']:.1f} s, "
                  f"{result['tokens_per_s']:.1f} tokens/s, of which the constraint "
                  f"{result['constraint_seconds']:.2f} s", flush=True)  # fmt: skip
    off, on = (statistics.median(rates[k]) for k in ("off", "on"))
    print(f"tokens/s, {opts.cost_requests} requests in one batch: constraint off {off:.1f}, "
          f"on {on:.1f} ({on / off:.2f}x, the same reply lengths); the constraint's own work: "
          f"{statistics.median(shares['on']):.1%} of the constrained run")  # fmt: skip


if __name__ == "__main__":
    main()
