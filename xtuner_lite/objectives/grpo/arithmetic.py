"""Seeded arithmetic word problems with exact answers: a verifiable task small enough to show RL
learning on a CPU in minutes (``benchmarks/grpo_heldout.py``, the bundled GRPO config).

Each problem is one addition or subtraction of small numbers (5-20 and 1-9), worded from a few
templates; the answer is a positive integer. Rows: ``{question, answer, op}``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = "Ada Ben Cleo Dan Eva Finn Gia Hugo Ines Jon Kai Lena Milo Nora Omar Pia".split()
THINGS = "apples marbles stickers books pencils coins shells cards stamps cookies".split()

# (template, operation): one step each, so the embedded model starts on the task without
# mastering it (its measured accuracy is in docs/benchmarks.md)
ONE_STEP = [
    ("{n} has {a} {t}. {n} gets {b} more {t}. How many {t} does {n} have now?", "+"),
    ("{n} has {a} {t} and gives away {b} of them. How many {t} are left?", "-"),
    ("There are {a} {t} in a box. {n} puts in {b} more. How many {t} are in the box?", "+"),
    ("{n} had {a} {t}. {n} lost {b}. How many {t} does {n} have?", "-"),
]


def _problem(rng: random.Random) -> dict:
    n, t = rng.choice(NAMES), rng.choice(THINGS)
    template, op = rng.choice(ONE_STEP)
    a, b = rng.randint(5, 20), rng.randint(1, 9)
    answer = a + b if op == "+" else a - b
    return {"question": template.format(n=n, t=t, a=a, b=b), "answer": str(answer), "op": op}


def make_problems(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [_problem(rng) for _ in range(count)]


def write_splits(folder: Path, train: int = 256, test: int = 100, seed: int = 0) -> None:
    """``arithmetic_train.jsonl`` and ``arithmetic_test.jsonl`` (no test question in train)."""
    problems = make_problems(train * 3 + test * 3, seed)
    test_rows, held = [], set()
    for row in problems:
        if len(test_rows) < test and row["question"] not in held:
            test_rows.append(row)
            held.add(row["question"])
    train_rows = [r for r in problems if r["question"] not in held][:train]
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train_rows), ("test", test_rows)):
        with (folder / f"arithmetic_{name}.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


__all__ = ["make_problems", "write_splits"]
