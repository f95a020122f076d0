"""Seeded random JSON schemas of the kinds structured-output users write: objects with required
and optional fields, arrays with bounds, enums, numbers with bounds, nested required objects.

Used by ``bench_grammar.py`` (100 schemas, tokens/s with the constraint on and off) and by
``tests/test_grammar.py`` (a dozen, every reply validated with ``jsonschema``).
"""

from __future__ import annotations

import random

WORDS = [
    "city",
    "name",
    "count",
    "price",
    "tags",
    "owner",
    "colour",
    "size",
    "items",
    "score",
    "kind",
    "level",
    "id",
    "notes",
    "open",
    "rank",
]


def _leaf(rng: random.Random) -> dict:
    kind = rng.choice(["string", "integer", "number", "boolean", "enum", "bounded"])
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "small", "large", "none"], 3)}
    if kind == "bounded":
        low = rng.randint(-50, 50)
        return {
            "type": rng.choice(["integer", "number"]),
            "minimum": low,
            "maximum": low + rng.randint(1, 100),
        }
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(3, 24)}
    return {"type": kind}


def _node(rng: random.Random, depth: int) -> dict:
    roll = rng.random()
    if depth < 2 and roll < 0.25:
        return random_schema(rng, depth + 1)
    if depth < 2 and roll < 0.45:
        return {
            "type": "array",
            "items": _leaf(rng) if rng.random() < 0.7 else random_schema(rng, depth + 1),
            "minItems": 1,
            "maxItems": rng.randint(1, 3),
        }
    return _leaf(rng)


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """An object schema: 1-4 fields, some required, no extra properties."""
    names = rng.sample(WORDS, rng.randint(1, 4))
    properties = {name: _node(rng, depth) for name in names}
    required = [n for n in names if rng.random() < 0.7] or names[:1]
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


def schemas(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [random_schema(rng) for _ in range(count)]
