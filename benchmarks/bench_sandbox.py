"""What the OS sandbox costs: a trivial ``print`` through the python tool, ``code_tests`` scoring
a GRPO step's completions, and a whole GRPO-LoRA step with ``code_tests``, against another tree
(the in-process audit-hook sandbox it replaced: ``git worktree add /tmp/before df6fa56``).

Each side runs in its own process with ``PYTHONPATH`` set to its tree; the sides alternate and the
median of ``--repeats`` runs is printed. The tool call is timed through ``ToolBox.run``, as
``xtuner chat --tools python`` runs it (its first call, which checks the sandbox once, is reported
apart). The GRPO run (SmolLM2-135M-Instruct, LoRA r=16, ``--prompts`` coding prompts x 8
completions of up to 96 tokens, seeded sampling, so both sides score the same completions)
reports the seconds of a run (loading and ``--steps`` steps); ``code_tests`` alone is timed on
32 fixed completions (right, wrong, crashing) of 3 tests each.

    git worktree add /tmp/before df6fa56
    python benchmarks/bench_sandbox.py --before /tmp/before --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sides import report, run_side

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
REWARD = "reward/code_tests"  # the step's mean reward, as loss.jsonl records it
TASKS = [
    ("add", "returns the sum of a and b", ["add(2, 3) == 5", "add(-1, 1) == 0", "add(0, 0) == 0"]),
    ("square", "returns x times x", ["square(3) == 9", "square(-2) == 4", "square(0) == 0"]),
    ("is_even", "returns True when n is even", ["is_even(2)", "not is_even(3)", "is_even(0)"]),
    ("maximum", "returns the larger of a and b", ["maximum(1, 2) == 2", "maximum(5, 3) == 5",
                                                   "maximum(4, 4) == 4"]),
]  # fmt: skip
COMPLETIONS = [
    "```python\ndef add(a, b):\n    return a + b\n```",
    "```python\ndef add(a, b):\n    return a - b\n```",
    "def add(a, b):\n    return a + b\nprint(add(1, 2))",
    "def add(a, b):\n    raise ValueError('no')",
] * 8


def rows() -> list[dict]:
    return [{"question": f"Write a Python function `{name}` that {what}. Answer with code only.",
             "tests": [f"assert {t}" for t in tests]}
            for name, what, tests in TASKS]  # fmt: skip


def time_tool(calls: int) -> dict:
    from xtuner_lite.toolcalling import ToolBox, load_tools

    box = ToolBox(load_tools("python"))
    call = {"name": "python", "arguments": {"code": "print(6 * 7)"}}
    start = time.perf_counter()
    assert box.run(call) == "42"
    first = time.perf_counter() - start
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        assert box.run(call) == "42"
        times.append(time.perf_counter() - start)
    return {"tool_first_s": first, "tool_call_s": statistics.median(times)}


def time_scoring() -> dict:
    from xtuner_lite.objectives.grpo.rewards import code_tests

    reward = code_tests(timeout=5.0)
    row = {"tests": [f"assert {t}" for t in TASKS[0][2]]}
    start = time.perf_counter()
    scores = [reward(row, c) for c in COMPLETIONS]
    return {"scoring_s": time.perf_counter() - start, "mean_score": statistics.mean(scores)}


def time_grpo(prompts: int, steps: int) -> dict:
    from xtuner_lite import train

    folder = Path(tempfile.mkdtemp(prefix="bench_sandbox_"))
    data = folder / "code.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    cfg = dict(
        model=dict(pretrained=MODEL, method="lora", dtype="bf16",
                   lora=dict(r=16, alpha=32, dropout=0.0, target_modules="all-linear")),
        train_dataset=dict(data_files=str(data), tokenizer=MODEL, template="smollm2",
                           map_fn="question"),
        objective=dict(type="grpo", rewards=[dict(type="code_tests", timeout=5.0)],
                       num_generations=8, max_new_tokens=96, temperature=0.7, beta=0.0),
        train=dict(batch_size=prompts, accumulative_counts=1, max_iters=steps, epochs=None,
                   lr=1e-5, warmup_ratio=0.0, dtype="bf16", save_steps=10**9,
                   log_interval=1, tensorboard=False),
    )  # fmt: skip
    start = time.perf_counter()
    train(cfg, work_dir=folder / "work")
    seconds = time.perf_counter() - start
    logs = [json.loads(x) for x in (folder / "work" / "loss.jsonl").read_text().splitlines()]
    return {"grpo_run_s": seconds, "reward": statistics.mean(r[REWARD] for r in logs)}


def child(opts: argparse.Namespace) -> None:
    import xtuner_lite

    result = {"tree": str(Path(xtuner_lite.__file__).parents[1])}
    result |= time_tool(opts.calls)
    result |= time_scoring()
    if opts.steps:
        result |= time_grpo(opts.prompts, opts.steps)
    report(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the other tree (a git worktree)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20, help="tool calls timed per run")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1, help="GRPO steps per run (0: none)")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.side:
        return child(opts)
    trees = {"before": Path(opts.before).resolve(), "after": ROOT}
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for _ in range(opts.repeats):
        for side, tree in trees.items():
            os.environ["PYTHONPATH"] = str(tree)
            cmd = [sys.executable, __file__, *sys.argv[1:], "--side", side]
            result = run_side(cmd, side)
            assert Path(result["tree"]) == tree, result["tree"]
            runs[side].append(result)
            print(side, json.dumps({k: v for k, v in result.items() if k != "tree"}), flush=True)
    keys = [k for k in runs["after"][0] if k not in ("tree", "peak_rss_mib")]
    print(f"\nmedian of {opts.repeats} alternating runs each:")
    print(f"{'measure':16s} {'before':>10s} {'after':>10s} {'after/before':>13s}")
    for key in keys:
        values = {s: [r[key] for r in runs[s] if r.get(key) is not None] for s in runs}
        if not values["before"] or not values["after"]:
            continue
        b, a = statistics.median(values["before"]), statistics.median(values["after"])
        print(f"{key:16s} {b:10.4f} {a:10.4f} {a / b if b else float('nan'):12.2f}x")


if __name__ == "__main__":
    main()
