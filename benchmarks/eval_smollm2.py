"""SmolLM2-135M-Instruct on the public sets in ../shared/data/eval, next to its model card.

Full sets where CPU time allows, otherwise a seeded subset (``--limit``, at least 1,000
questions) with its 95 % interval. Results are appended task by task to ``--out`` (JSON lines),
so an interrupted run keeps what it finished. The model card's numbers come from lighteval with
its own prompts (0-shot; GSM8K 5-shot), so differences of a few points are expected.
Run: python benchmarks/eval_smollm2.py [--data-root ../shared/data/eval] [--tasks ...]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from xtuner_lite.evaluation import evaluate_model, load_for_eval, resolve_task

ROOT = Path(__file__).resolve().parents[1]
# task → (rows to score, None = all; model card value, card's metric name)
PLAN = {
    "arc_easy": (None, 37.3, "ARC average (easy+challenge)"),
    "arc_challenge": (None, 37.3, "ARC average (easy+challenge)"),
    "piqa": (None, 66.3, "PIQA"),
    "hellaswag": (1000, 40.9, "HellaSwag"),
    "mmlu_cloze": (1000, 29.3, "MMLU (cloze)"),
    "mmlu": (1000, None, "-"),
    "gsm8k": (1000, 1.4, "GSM8K 5-shot"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared/data/eval"))
    parser.add_argument("--tasks", nargs="+", default=list(PLAN))
    parser.add_argument("--out", default="work_dirs/eval_smollm2.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = load_for_eval("smollm2-135m-instruct")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.tasks:
        limit, card, card_name = PLAN[name]
        spec = resolve_task(name)
        start = time.perf_counter()
        result = evaluate_model(model, [spec], args.data_root, limit, args.seed)[name]
        seconds = time.perf_counter() - start
        record = {
            "task": name,
            "n": result.n,
            "limit": limit,
            "seed": args.seed,
            "metrics": {k: round(v * 100, 2) for k, v in result.metrics.items()},
            "ci95": {
                k: round(result.interval(k) * 100, 2)
                for k in result.metrics
                if k in ("acc", "acc_norm", "circular_acc")
            },
            "model_card": card,
            "model_card_metric": card_name,
            "seconds": round(seconds, 1),
        }
        print(json.dumps(record), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
