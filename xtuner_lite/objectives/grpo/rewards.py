"""Reward functions for RL with verifiable rewards, and their weighted combination.

A reward function takes the prompt row (every field of the dataset row: the reference answer,
test cases, ...) and one completion's text, and returns a float. The config names built-in
rewards by type, or gives any callable (or a dotted path to one) with its weight.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from xtuner_lite.errors import XtunerError
from xtuner_lite.toolcalling.sandbox import require_isolation, run_tests

RewardFn = Callable[[dict, str], float]

GSM8K_ANSWER = re.compile(r"####\s*([-+]?[\d,]*\.?\d+)")
BOXED = re.compile(r"\\boxed\{\s*([^{}]*?)\s*\}")
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")
CODE_BLOCK = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


class RewardError(XtunerError):
    """A reward function failed or returned something other than a finite number."""


def _number(text: str) -> Fraction | None:
    try:
        return Fraction(text.replace(",", "").strip())
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(text: str) -> Fraction | None:
    """The final number of a solution: GSM8K's ``#### N``, else the last ``\\boxed{N}``, else
    the last number in the text (commas in numbers are ignored; exact, as a fraction)."""
    for pattern in (GSM8K_ANSWER, BOXED):
        found = pattern.findall(text)
        if found:
            value = _number(found[-1])
            if value is not None:
                return value
    numbers = NUMBER.findall(text)
    return _number(numbers[-1]) if numbers else None


def numeric_answer(answer_key: str = "answer") -> RewardFn:
    """1.0 when the completion's final number equals the row's reference number (the row's
    ``answer_key`` field: a number, or a solution ending in one, as GSM8K's), else 0.0."""

    def reward(row: dict, completion: str) -> float:
        if answer_key not in row:
            raise KeyError(f"the row has no {answer_key!r} field (the reference answer)")
        reference = extract_answer(str(row[answer_key]))
        if reference is None:
            raise ValueError(f"no number in the reference answer {str(row[answer_key])[:80]!r}")
        return 1.0 if extract_answer(completion) == reference else 0.0

    return reward


def format_match(pattern: str) -> RewardFn:
    """1.0 when the completion matches the regular expression (searched, dot matches newline)."""
    compiled = re.compile(pattern, re.DOTALL)
    return lambda row, completion: 1.0 if compiled.search(completion) else 0.0


def length_penalty(max_chars: int = 1000) -> RewardFn:
    """0 up to ``max_chars`` characters, then down linearly to -1 at twice that."""
    return lambda row, completion: -min(max(len(completion) / max_chars - 1.0, 0.0), 1.0)


def code_tests(tests_key: str = "tests", timeout: float = 5.0) -> RewardFn:
    """The share of the row's test statements (``tests_key``: a list of ``assert ...`` lines)
    that pass when run after the completion's code (its last ```python block, else the whole
    text), in one :func:`~xtuner_lite.toolcalling.sandbox.run_tests` process: the harness
    reports each test that passed, so code that exits early scores 0 on the tests it did not
    reach. Refused at set-up where the machine cannot isolate the code."""
    require_isolation("code_tests")

    def reward(row: dict, completion: str) -> float:
        tests = row.get(tests_key)
        if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
            raise KeyError(f"the row has no {tests_key!r} list of test statements")
        blocks = CODE_BLOCK.findall(completion)
        code = blocks[-1] if blocks else completion
        return sum(run_tests(code, tests, timeout)) / len(tests)

    return reward


BUILT_IN: dict[str, Callable[..., RewardFn]] = {
    "numeric_answer": numeric_answer,
    "format": format_match,
    "length_penalty": length_penalty,
    "code_tests": code_tests,
}


@dataclass
class Reward:
    name: str
    fn: RewardFn
    weight: float


def _import(path: str) -> Callable:
    module, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise XtunerError(f"cannot import reward function {path!r}: {exc}") from None


def build_rewards(specs: list[Any]) -> list[Reward]:
    """``specs``: callables, dotted paths, or dicts ``dict(type=BUILT_IN name | fn=callable or
    dotted path, weight=1.0, name=..., **settings)``. Every problem is raised at once."""
    if not specs:
        raise XtunerError("objective.rewards: give at least one reward function")
    rewards, problems = [], []
    for i, spec in enumerate(specs):
        where = f"objective.rewards[{i}]"
        spec = spec if isinstance(spec, dict) else {"fn": spec}
        settings = {k: v for k, v in spec.items() if k not in ("type", "fn", "weight", "name")}
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            problems.append(f"{where}.weight: expected a number, got {weight!r}")
            continue
        try:
            if "type" in spec:
                if spec["type"] not in BUILT_IN:
                    raise XtunerError(
                        f"unknown reward {spec['type']!r} (built in: {', '.join(BUILT_IN)})"
                    )
                fn, name = BUILT_IN[spec["type"]](**settings), spec["type"]
            else:
                fn = _import(spec["fn"]) if isinstance(spec.get("fn"), str) else spec.get("fn")
                if not callable(fn):
                    raise XtunerError("expected dict(type=...) or a callable / dotted path")
                if settings:
                    raise XtunerError(f"unknown settings {sorted(settings)} for a callable")
                name = getattr(fn, "__name__", f"reward_{i}")
        except (XtunerError, TypeError, re.error) as exc:
            problems.append(f"{where}: {exc}")
            continue
        rewards.append(Reward(spec.get("name", name), fn, float(weight)))
    names = [r.name for r in rewards]
    for name in {n for n in names if names.count(n) > 1}:
        problems.append(f"objective.rewards: two rewards are named {name!r}; give each a name=")
    if problems:
        raise XtunerError("reward configuration:\n" + "\n".join(f"  - {p}" for p in problems))
    return rewards


def score(rewards: list[Reward], row: dict, completion: str, where: str) -> list[float]:
    """Each reward's value for one completion; a failure names the reward and the row."""
    values = []
    for reward in rewards:
        try:
            value = reward.fn(row, completion)
        except (Exception, SystemExit) as exc:  # user code: stop with its name and the row
            raise RewardError(
                f"reward {reward.name!r} raised {type(exc).__name__}: {exc} (prompt {where}, "
                f"completion {completion[:80]!r})"
            ) from exc
        values.append(_finite(value, reward.name, where))
    return values


def _finite(value: Any, name: str, where: str) -> float:
    """A reward's value as a float: any real number (numpy scalars and 0-d arrays included),
    never a bool, NaN or infinity."""
    number = math.nan
    if not isinstance(value, (bool, str, bytes)) and not getattr(value, "ndim", 0):
        with contextlib.suppress(TypeError, ValueError):
            number = float(value)
    if not math.isfinite(number):
        raise RewardError(
            f"reward {name!r} returned {value!r} ({type(value).__name__}), not a finite number "
            f"(prompt {where})"
        )
    return number


__all__ = [
    "BUILT_IN",
    "Reward",
    "RewardError",
    "build_rewards",
    "code_tests",
    "extract_answer",
    "format_match",
    "length_penalty",
    "numeric_answer",
    "score",
]
