"""Tools and tool calls in one shape, whatever form they arrive in.

A tool is an OpenAI function spec ``{"type": "function", "function": {"name", "description",
"parameters"}}``; glaive's bare ``{"name", "description", "parameters"}`` and JSON strings of
either are accepted and normalized. A call is ``{"name": str, "arguments": dict}``: OpenAI's
``{"type": "function", "function": {"name", "arguments": "<json>"}}`` is normalized too, so a
template renders arguments one way whether they came from a dataset or the API. Problems raise
:class:`ToolSpecError` naming the field.
"""

from __future__ import annotations

import inspect
import json
import re
import typing
from collections.abc import Callable
from typing import Any

from xtuner_lite.errors import RowError

JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}


class ToolSpecError(RowError):
    """A tool list or tool call that cannot be used; names the field."""


def _json(value: Any, field: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ToolSpecError(f"is not valid JSON ({exc.msg})", field=field) from None


def normalize_tools(tools: Any, field: str = "tools") -> list[dict]:
    """A list of OpenAI function specs from a list (or JSON string) of specs in either form."""
    tools = _json(tools, field)
    if tools in (None, "", []):
        return []
    if not isinstance(tools, list):
        raise ToolSpecError(f"expected a list of tools, got {type(tools).__name__}", field=field)
    out = []
    for i, tool in enumerate(tools):
        spec = tool.get("function") if isinstance(tool, dict) and "function" in tool else tool
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise ToolSpecError("each tool needs a 'name' string", field=f"{field}[{i}]")
        if spec["name"] in tool_names(out):
            raise ToolSpecError(
                f"another tool is also named {spec['name']!r}", field=f"{field}[{i}].name"
            )
        params = spec.get("parameters", {"type": "object", "properties": {}})
        _check_parameters(params, f"{field}[{i}].parameters")
        function = {"name": spec["name"], "description": spec.get("description", "")}
        out.append({"type": "function", "function": {**function, "parameters": params}})
    return out


def _check_parameters(params: Any, field: str) -> None:
    """A function's parameters are a JSON schema of type object (its arguments are one)."""
    if not isinstance(params, dict) or params.get("type", "object") != "object":
        got = params.get("type") if isinstance(params, dict) else type(params).__name__
        raise ToolSpecError(f"expected a JSON schema of type 'object', got {got!r}", field=field)
    if not isinstance(params.get("properties", {}), dict):
        raise ToolSpecError("'properties' must be an object", field=f"{field}.properties")


def tool_names(tools: list[dict]) -> list[str]:
    return [t["function"]["name"] for t in tools]


def normalize_call(call: Any, names: list[str] | None, field: str) -> dict:
    """``{"name", "arguments": dict}`` from a call in either form; the name must be one of
    ``names`` when tools were given, the arguments a JSON object."""
    call = _json(call, field)
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        call = call["function"]
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise ToolSpecError("a tool call needs a 'name' string", field=field)
    if names is not None and call["name"] not in names:
        raise ToolSpecError(
            f"calls {call['name']!r}, which is not among the tools ({', '.join(names) or 'none'})",
            field=field,
        )
    arguments = _json(call.get("arguments", {}), f"{field}.arguments")
    if not isinstance(arguments, dict):
        raise ToolSpecError(
            f"expected a JSON object, got {type(arguments).__name__}", field=f"{field}.arguments"
        )
    return {"name": call["name"], "arguments": arguments}


def _param_docs(doc: str) -> dict[str, str]:
    """Parameter descriptions from a docstring's Args/Parameters section (Google style, an
    entry's more-indented lines continuing it) or ``:param name:`` lines (reST)."""
    found = dict(re.findall(r"^\s*:param\s+(\w+):\s*(.+)$", doc, re.M))
    section = re.search(r"^\s*(?:Args|Arguments|Parameters):\s*\n((?:[ \t]+.+\n?)+)", doc, re.M)
    if not section:
        return found
    lines = section[1].splitlines()
    base = len(lines[0]) - len(lines[0].lstrip())
    name = None
    for line in lines:
        indent = len(line) - len(line.lstrip())
        entry = re.match(r"\s+(\w+)(?:\s*\([^)]*\))?:\s*(.*)$", line)
        if indent == base and entry:
            name = entry[1]
            found.setdefault(name, entry[2].strip())
        elif name is not None and indent > base:
            found[name] = f"{found[name]} {line.strip()}".strip()
    return found


def _json_type(annotation: Any) -> dict:
    origin = typing.get_origin(annotation)
    if annotation in JSON_TYPES:
        return {"type": JSON_TYPES[annotation]}
    if annotation is list or origin is list:
        args = typing.get_args(annotation)
        return {"type": "array", **({"items": _json_type(args[0])} if args else {})}
    if annotation is dict or origin is dict:
        return {"type": "object"}
    if origin is typing.Literal:
        return {"enum": list(typing.get_args(annotation))}
    return {}


def function_schema(fn: Callable) -> dict:
    """An OpenAI function spec from a plain function: its signature gives the parameters and
    their types, its docstring's first paragraph the description and its Args section each
    parameter's description."""
    doc = inspect.getdoc(fn) or ""
    described = _param_docs(doc)
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:  # noqa: BLE001 - any annotation may fail to evaluate
        raise ToolSpecError(
            f"its annotations cannot be read ({type(exc).__name__}: {exc})", field=fn.__name__
        ) from None
    properties, required = {}, []
    for name, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        prop = _json_type(hints.get(name, str))
        if name in described:
            prop["description"] = described[name]
        properties[name] = prop
        if param.default is param.empty:
            required.append(name)
    description = doc.split("\n\n")[0].replace("\n", " ").strip()
    parameters = {"type": "object", "properties": properties, "required": required}
    return {
        "type": "function",
        "function": {"name": fn.__name__, "description": description, "parameters": parameters},
    }
