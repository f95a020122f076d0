"""Seeded arithmetic word problems with exact answers: a verifiable task small enough to show RL
learning on a CPU in minutes (``benchmarks/grpo_heldout.py``, the bundled GRPO config).

Each problem is one or two steps of addition or subtraction with small numbers, worded from a
few templates; the answer is a non-negative integer. Rows: ``{question, answer, steps}``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# asked of every question: the format the numeric-answer reward reads first
FINAL_LINE = "Finish with the line #### followed by the number."
NAMES = "Ada Ben Cleo Dan Eva Finn Gia Hugo Ines Jon Kai Lena Milo Nora Omar Pia".split()
THINGS = "apples marbles stickers books pencils coins shells cards stamps cookies".split()

ONE_STEP = [
    ("{n} has {a} {t}. {n} gets {b} more {t}. How many {t} does {n} have now?", "+"),
    ("{n} has {a} {t} and gives away {b} of them. How many {t} are left?", "-"),
    ("There are {a} {t} in a box. {n} puts in {b} more. How many {t} are in the box?", "+"),
    ("{n} had {a} {t}. {n} lost {b}. How many {t} does {n} have?", "-"),
]
TWO_STEP = [
    "{n} has {a} {t}, buys {b} more and then gives {c} to a friend. How many {t} does {n} have?",
]


def _problem(rng: random.Random, two_step: bool) -> dict:
    n, t = rng.choice(NAMES), rng.choice(THINGS)
    if two_step:
        a, b = rng.randint(5, 40), rng.randint(2, 30)
        c = rng.randint(1, a + b - 1)
        question = rng.choice(TWO_STEP).format(n=n, t=t, a=a, b=b, c=c)
        return {"question": f"{question} {FINAL_LINE}", "answer": str(a + b - c), "steps": 2}
    template, op = rng.choice(ONE_STEP)
    a, b = rng.randint(5, 60), rng.randint(2, 40)
    if op == "-":
        a, b = max(a, b + 1), min(a, b)
    question = f"{template.format(n=n, t=t, a=a, b=b)} {FINAL_LINE}"
    return {"question": question, "answer": str(a + b if op == "+" else a - b), "steps": 1}


def make_problems(count: int, seed: int = 0, two_step_share: float = 0.3) -> list[dict]:
    rng = random.Random(seed)
    return [_problem(rng, rng.random() < two_step_share) for _ in range(count)]


def write_splits(folder: Path, train: int = 256, test: int = 100, seed: int = 0) -> None:
    """``arithmetic_train.jsonl`` and ``arithmetic_test.jsonl`` (disjoint questions)."""
    problems = make_problems(train + test * 2, seed)
    test_rows = problems[:test]
    held = {r["question"] for r in test_rows}
    train_rows = [r for r in problems[test:] if r["question"] not in held][:train]
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train_rows), ("test", test_rows)):
        with (folder / f"arithmetic_{name}.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


__all__ = ["make_problems", "write_splits"]
