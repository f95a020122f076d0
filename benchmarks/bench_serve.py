"""`xtuner serve` under load, prefix cache on and off: time to first token, inter-token latency,
requests/s.

N concurrent OpenAI clients (the official ``openai`` package, streaming) talk to one server of
SmolLM2-135M-Instruct. Every conversation starts with the same system prompt of about
``--system-tokens`` tokens (a product's instructions, shared by all users). Half the clients hold
a chat of ``--turns`` turns, each turn re-sending the conversation so far; the other half run a
tool loop: each round re-sends the conversation with one more tool call and its result (the
agent pattern). The two sides are the same server started with ``--prefix-cache 0`` and with
the default cache, in alternating pairs; the medians of the pairs are printed, then the ratios.

Run: python benchmarks/bench_serve.py [--clients 8] [--turns 3] [--pairs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import openai
from sides import cpu_name

from xtuner_lite.hub import load_tokenizer

MODEL = "smollm2-135m-instruct"
QUESTIONS = [
    "Name a river.",
    "What is rain?",
    "Say hello.",
    "Name a colour.",
    "Count to three.",
    "What is a cat?",
    "Name a fruit.",
    "What is snow?",
]
TOOL = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    },
}


def system_prompt(tokens: int) -> str:
    """Numbered house rules until the text is ``tokens`` tokens long."""
    tokenizer = load_tokenizer(MODEL)
    rules, i = [], 0
    while len(tokenizer(" ".join(rules))["input_ids"]) < tokens:
        i += 1
        rules.append(
            f"Rule {i}: when a question touches topic number {i}, answer politely, "
            f"briefly and without inventing facts about it."
        )
    return "You are a helpful assistant. " + " ".join(rules)


def start_server(cache: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "xtuner_lite.cli",
            "serve",
            MODEL,
            "--port",
            "0",
            "--prefix-cache",
            cache,
            "--max-batch-size",
            "16",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:
        match = re.search(r"(http://[\d.]+:\d+)", line)
        if match:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # drain its output
            return proc, match.group(1) + "/v1"
    sys.exit(f"the server did not start (prefix cache {cache})")


def timed(client: openai.OpenAI, messages: list[dict], max_tokens: int, tools=None) -> dict:
    """One streamed request: time to first token, the gaps between tokens, the reply."""
    start = time.perf_counter()
    stamps, text = [], ""
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        **({"tools": tools} if tools else {}),
    )
    cached = 0
    for chunk in stream:
        if chunk.usage is not None:
            cached = chunk.usage.prompt_tokens_details.cached_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
            text += chunk.choices[0].delta.content
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    ttft = (stamps[0] if stamps else time.perf_counter()) - start
    return {"ttft": ttft, "gaps": gaps, "text": text, "cached": cached}


def chat_client(client, system: str, question: str, turns: int, max_tokens: int) -> list[dict]:
    messages, results = [{"role": "system", "content": system}], []
    for turn in range(turns):
        messages.append({"role": "user", "content": question if turn == 0 else "Tell me more."})
        result = timed(client, messages, max_tokens)
        results.append({**result, "turn": turn})
        messages.append({"role": "assistant", "content": result["text"]})
    return results


def tool_client(client, system: str, question: str, rounds: int, max_tokens: int) -> list[dict]:
    """An agent's loop: every round re-sends the conversation with one more call and result."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    results = []
    for turn in range(rounds):
        result = timed(client, messages, max_tokens, tools=[TOOL])
        results.append({**result, "turn": turn})
        call = {
            "id": f"call_{turn}",
            "type": "function",
            "function": {
                "name": "calculator",
                "arguments": json.dumps({"expression": f"{turn} + {turn + 1}"}),
            },
        }
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": str(2 * turn + 1)},
        ]
    return results


def run_load(base_url: str, system: str, opts) -> dict:
    """Every client at once; returns the side's figures."""
    results: list[list[dict]] = [[] for _ in range(opts.clients)]

    def client_thread(i: int) -> None:
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
        kind = chat_client if i % 2 == 0 else tool_client
        results[i] = kind(
            client, system, QUESTIONS[i % len(QUESTIONS)], opts.turns, opts.max_tokens
        )

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(opts.clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    flat = [r for rs in results for r in rs]
    if len(flat) != opts.clients * opts.turns:
        sys.exit("a client failed")
    later = [r["ttft"] for r in flat if r["turn"] == 1]
    gaps = sorted(g for r in flat for g in r["gaps"])
    ttfts = sorted(r["ttft"] for r in flat)
    return {
        "requests_per_s": len(flat) / wall,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p95": ttfts[int(0.95 * (len(ttfts) - 1))],
        "turn2_ttft_p50": statistics.median(later),
        "itl_p50": statistics.median(gaps),
        "itl_p95": gaps[int(0.95 * (len(gaps) - 1))],
        "cached_tokens_mean": sum(r["cached"] for r in flat) / len(flat),
    }


def second_turn_alone(base_url: str, system: str, opts) -> float:
    """Time to first token of a conversation's second turn with nothing else running (the
    first turn, with another user's question, ran just before)."""
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    times = []
    for question in QUESTIONS[: opts.probes]:
        first = timed(
            client,
            [{"role": "system", "content": system}, {"role": "user", "content": question}],
            opts.max_tokens,
        )
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
            {"role": "assistant", "content": first["text"]},
            {"role": "user", "content": "Tell me more."},
        ]
        times.append(timed(client, messages, opts.max_tokens)["ttft"])
    return statistics.median(times)


def run_side(cache: str, system: str, opts) -> dict:
    proc, base_url = start_server(cache)
    try:
        alone = second_turn_alone(base_url, system, opts)
        return {"turn2_alone_ttft_p50": alone, **run_load(base_url, system, opts)}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--turns", type=int, default=3, help="turns (chat) or rounds (tools)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--system-tokens", type=int, default=1500)
    parser.add_argument("--probes", type=int, default=5, help="second turns timed alone")
    parser.add_argument("--pairs", type=int, default=3)
    opts = parser.parse_args()
    system = system_prompt(opts.system_tokens)
    print(
        f"bench_serve: {opts.clients} clients × {opts.turns} turns, system prompt "
        f"{opts.system_tokens} tokens, {opts.max_tokens} new tokens, on {cpu_name()}"
    )
    sides: dict[str, list[dict]] = {"off": [], "on": []}
    for pair in range(opts.pairs):
        for name, cache in (("off", "0"), ("on", "512MiB")):
            sides[name].append(run_side(cache, system, opts))
            print(
                f"pair {pair + 1} cache {name}: "
                + json.dumps({k: round(v, 4) for k, v in sides[name][-1].items()}),
                flush=True,
            )
    median = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in sides.items()}
    print(f"{'':24} {'cache off':>10} {'cache on':>10} {'ratio':>7}")
    for key in median["on"]:
        off, on = median["off"][key], median["on"][key]
        if key == "cached_tokens_mean":
            print(f"{key:24} {off:10.1f} {on:10.1f}")
            continue
        better = on / off if key == "requests_per_s" else off / on  # > 1: the cache helps
        print(f"{key:24} {off:10.4f} {on:10.4f} {better:6.2f}x")


if __name__ == "__main__":
    main()
