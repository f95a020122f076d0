"""Seeded calculator-use conversations, in the glaive/ShareGPT tool format the ``sharegpt`` map
fn reads: the model is offered the ``calculator`` tool and either calls it (arithmetic a small
model cannot do in its head) and answers from the result, or answers directly (questions that
need no tool). Rows also carry ``expression`` and ``answer`` for evaluation.

    python -m xtuner_lite.toolcalling.calculator_data xtuner_lite/examples/data
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from xtuner_lite.toolcalling.builtin import Tool, calculator

NAMES = "Ada Ben Cleo Dan Eva Finn Gia Hugo Ines Jon Kai Lena Milo Nora Omar Pia".split()
ITEMS = "boxes crates bags shelves trays packs rows cartons".split()
THINGS = "pens apples bolts cards cups eggs tiles seeds".split()
OPS = {"+": "plus", "-": "minus", "*": "times"}

ASKS = [
    "What is {a} {op} {b}?",
    "Calculate {a} {op} {b}.",
    "Can you work out {a} {op} {b} for me?",
    "I need the result of {a} {op} {b}.",
]
WORD = "{n} has {a} {items} with {b} {things} in each. How many {things} is that in total?"
DIRECT = [
    ("What is the opposite of {w}?", {"hot": "cold", "up": "down", "big": "small",
                                      "fast": "slow", "early": "late", "open": "closed"}),
    ("What is the plural of {w}?", {"cat": "cats", "box": "boxes", "city": "cities",
                                    "mouse": "mice", "child": "children", "leaf": "leaves"}),
    ("What colour is {w}?", {"grass": "green", "snow": "white", "the sky on a clear day": "blue",
                             "a ripe banana": "yellow", "coal": "black"}),
]  # fmt: skip


def calculator_tools() -> str:
    """The tools column: the calculator's spec as glaive writes it (a JSON string)."""
    return json.dumps([Tool.of(calculator).schema["function"]])


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    """(question, expression)"""
    if rng.random() < 0.25:
        n, items, things = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(THINGS)
        a, b = rng.randint(12, 99), rng.randint(12, 99)
        return WORD.format(n=n, a=a, b=b, items=items, things=things), f"{a} * {b}"
    op = rng.choice(list(OPS))
    a = rng.randint(100, 9999)
    b = rng.randint(12, 99) if op == "*" else rng.randint(100, 9999)
    style = rng.choice(ASKS)
    return style.format(a=a, b=b, op=rng.choice([op, OPS[op]])), f"{a} {op} {b}"


def _with_call(question: str, expression: str) -> dict:
    result = calculator(expression)
    call = {"name": "calculator", "arguments": {"expression": expression}}
    return {
        "conversations": [
            {"from": "human", "value": question},
            {"from": "function_call", "value": json.dumps(call)},
            {"from": "observation", "value": result},
            {"from": "gpt", "value": f"{expression} = {result}."},
        ],
        "tools": calculator_tools(),
        "expression": expression,
        "answer": result,
    }


def _direct(rng: random.Random) -> dict:
    template, answers = rng.choice(DIRECT)
    word = rng.choice(sorted(answers))
    answer = answers[word]
    reply = f"The answer is {answer}."
    return {
        "conversations": [
            {"from": "human", "value": template.format(w=word)},
            {"from": "gpt", "value": reply},
        ],
        "tools": calculator_tools(),
        "expression": None,
        "answer": answer,
    }


def make_rows(count: int, seed: int = 0, direct_share: float = 0.25) -> list[dict]:
    rng = random.Random(seed)
    return [
        _direct(rng) if rng.random() < direct_share else _with_call(*_arithmetic(rng))
        for _ in range(count)
    ]


def write_splits(folder: Path, train: int = 320, test: int = 100, seed: int = 0) -> None:
    """``calculator_train.jsonl`` and ``calculator_test.jsonl``: no arithmetic question of the
    test split is in train (the direct questions come from a small fixed set)."""
    rows = make_rows((train + test) * 2, seed)
    test_rows, held = [], set()
    for row in rows:
        question = row["conversations"][0]["value"]
        if len(test_rows) < test and row["expression"] and question not in held:
            test_rows.append(row)
            held.add(question)
    train_rows = [r for r in rows if r["conversations"][0]["value"] not in held][:train]
    folder.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", train_rows), ("test", test_rows)):
        with open(folder / f"calculator_{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in split)


if __name__ == "__main__":
    write_splits(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
