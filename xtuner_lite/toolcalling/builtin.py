"""Tools a model can call: the built-in offline ones and the user's plain Python functions.

A tool is a function whose signature and docstring become its JSON schema
(:func:`~xtuner_lite.toolcalling.schema.function_schema`). Built in: ``calculator`` (an AST
evaluator, never ``eval``), ``python`` (code in :mod:`xtuner_lite.toolcalling.sandbox`) and
``search``
(a local folder of text files). ``--tools-file my_tools.py`` adds every public function the
file defines.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import math
import operator
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xtuner_lite.errors import XtunerError, did_you_mean
from xtuner_lite.toolcalling.sandbox import require_isolation, run_python
from xtuner_lite.toolcalling.schema import ToolSpecError, function_schema

SEARCH_DIR_ENV = "XTUNER_SEARCH_DIR"  # the folder ``search`` reads (default: the current one)
SEARCH_SUFFIXES = {".txt", ".md", ".rst"}
MAX_BITS = 14_000  # an integer the calculator would make longer than this is refused first
# (Python prints integers of up to 4,300 digits: 14,000 bits is about 4,214)
MAX_EXPRESSION = 2000  # characters
DIGITS_PER_BIT = math.log10(2)


class ToolError(XtunerError):
    """A tool that cannot be set up (unknown name, unreadable tools file)."""


@dataclass(frozen=True)
class Tool:
    name: str
    fn: Callable[..., Any]
    schema: dict  # an OpenAI function spec

    @classmethod
    def of(cls, fn: Callable[..., Any], name: str | None = None) -> Tool:
        schema = function_schema(fn)
        if name:
            schema["function"]["name"] = name
        return cls(schema["function"]["name"], fn, schema)


# --------------------------------------------------------------------------- calculator
_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {
    name: getattr(math, name)
    for name in ("sqrt", "log", "log10", "log2", "exp", "sin", "cos", "tan", "floor", "ceil")
} | {"abs": abs, "round": round, "min": min, "max": max}
_CONSTANTS = {"pi": math.pi, "e": math.e}


def _bits(value: float | int) -> int:
    return value.bit_length() if isinstance(value, int) else 0


def _check_size(op: ast.operator, left: float | int, right: float | int) -> None:
    """Refuse an integer power or product whose result would pass MAX_BITS, before making it:
    its length is estimated from the operands' (floats overflow on their own)."""
    if not (isinstance(left, int) and isinstance(right, int)):
        return
    if isinstance(op, ast.Pow) and right > 0 and abs(left) > 1:
        bits = right * math.log2(abs(left))
    elif isinstance(op, ast.Mult):
        bits = _bits(left) + _bits(right)
    else:
        return
    if bits > MAX_BITS:
        raise ValueError(f"the result would have about {int(bits * DIGITS_PER_BIT):,} digits; "
                         f"the calculator stops at {int(MAX_BITS * DIGITS_PER_BIT):,}")  # fmt: skip


def _evaluate(node: ast.AST) -> float | int:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if _bits(node.value) > MAX_BITS:
            raise ValueError("a number in the expression is too long")
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        _check_size(node.op, left, right)
        return _BINARY[type(node.op)](left, right)
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _FUNCTIONS
        and not node.keywords
    ):
        args = [_evaluate(a) for a in node.args]
        if node.func.id == "round" and len(args) == 2 and abs(args[1]) > MAX_BITS:
            raise ValueError(f"round to {args[1]} digits is out of range")
        return _FUNCTIONS[node.func.id](*args)
    raise ValueError(f"unsupported expression: {ast.unparse(node)}")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression and return the result.

    Args:
        expression: arithmetic such as "(12 + 7) * 3" or "sqrt(2) / 4"
    """
    if len(expression) > MAX_EXPRESSION:
        return f"error: the expression is longer than {MAX_EXPRESSION} characters"
    try:
        value = _evaluate(ast.parse(expression.replace("^", "**"), mode="eval"))
        if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
            value = int(value)
        return str(value)
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError) as exc:
        return f"error: {exc}"
    except RecursionError:
        return "error: the expression is nested too deeply"


# --------------------------------------------------------------------------- python
def python(code: str) -> str:
    """Run Python code and return what it prints (use print to show results).

    Args:
        code: the program; it runs in an empty folder with no network, a time limit and a
            memory limit
    """
    return run_python(code, timeout=10.0).describe()


# --------------------------------------------------------------------------- search
def search(query: str, max_results: int = 3) -> str:
    """Search the local text files for a query; returns the best-matching passages.

    Args:
        query: words to look for
        max_results: how many passages to return
    """
    root = Path(os.environ.get(SEARCH_DIR_ENV, "."))
    words = set(re.findall(r"\w+", query.lower()))
    if not words:
        return "error: the query has no words"
    scored = []
    for path in sorted(root.rglob("*")):
        if path.suffix not in SEARCH_SUFFIXES or not path.is_file():
            continue
        for passage in path.read_text(errors="replace").split("\n\n"):
            hits = len(words & set(re.findall(r"\w+", passage.lower())))
            if hits:
                scored.append((-hits, str(path.relative_to(root)), passage.strip()))
    if not scored:
        return f"no passage in {root} matches {query!r}"
    best = sorted(scored)[: max(1, int(max_results))]
    return "\n\n".join(f"[{name}]\n{passage}" for _, name, passage in best)


BUILT_IN: dict[str, Callable[..., str]] = {
    "calculator": calculator,
    "python": python,
    "search": search,
}


def _file_tools(path: str) -> list[Tool]:
    file = Path(path)
    if not file.is_file():
        raise ToolError(f"--tools-file {path}: no such file")
    spec = importlib.util.spec_from_file_location(f"xtuner_user_tools_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's file: say which and why
        raise ToolError(f"--tools-file {path}: {type(exc).__name__}: {exc}") from None
    found = [
        fn
        for name, fn in vars(module).items()
        if inspect.isfunction(fn) and fn.__module__ == module.__name__ and not name.startswith("_")
    ]
    if not found:
        raise ToolError(f"--tools-file {path} defines no public function")
    try:
        return [Tool.of(fn) for fn in found]
    except ToolSpecError as exc:
        raise ToolError(f"--tools-file {path}: function {exc.field!r}: {exc.reason}") from None


def load_tools(names: list[str] | str | None = None, tools_file: str | None = None) -> list[Tool]:
    """Built-in tools by name (a list or ``"calculator,python"``) and a file's functions."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    tools = []
    if "python" in (names or []):
        require_isolation("the python tool")  # fail closed, at start, with what is missing
    for name in names or []:
        if name not in BUILT_IN:
            raise ToolError(
                f"unknown tool {name!r}"
                + did_you_mean(name, BUILT_IN)
                + f" (built in: {', '.join(BUILT_IN)}; or --tools-file)"
            )
        tools.append(Tool.of(BUILT_IN[name]))
    if tools_file:
        tools += _file_tools(tools_file)
    seen = [t.name for t in tools]
    if dupes := sorted({n for n in seen if seen.count(n) > 1}):
        raise ToolError(f"two tools are named {', '.join(dupes)}")
    return tools
