"""The ``xtuner`` command, generated from the typed signatures and docstrings of the verbs.

Every verb is a function of ``xtuner_lite.commands`` (or one such a module re-exports): required
parameters are arguments, the others ``--flags`` with the function's own defaults; the
docstring's first line is the verb's help, its text the description, its ``Args:`` section each
flag's help; a ``Literal`` gives the choices, ``values.Check`` what a value must be, and a
dataclass parameter (``SamplingParams``) one flag per simple field, built and validated by its own
``validate()``. Every failure exits non-zero with the real message, never just help.

The one place laziness is allowed: a verb's module is imported only when that verb runs (torch,
transformers and mmengine take seconds to import), and ``xtuner --help`` reads the verbs'
docstrings from their source files with ``ast``, importing none of them.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import sys
import traceback
import types
import typing
from collections.abc import Callable
from importlib import import_module
from pathlib import Path
from typing import Any, Literal

from xtuner_lite import name_cpu_accelerator
from xtuner_lite.errors import UsageError, XtunerError
from xtuner_lite.values import Check, Flag

PACKAGE = Path(__file__).resolve().parent

# verb → "module:function" under xtuner_lite.commands; a two-word verb is a group's action
VERBS: dict[str, str] = {
    "download": "download:download",
    "chat": "chat:chat",
    "serve": "serve:serve",
    "merge": "merge:merge_adapter",
    "convert pth_to_hf": "convert:pth_to_hf",
    "export gguf": "export:export_gguf",
    "data prepare": "data:prepare",
    "data report": "data:report",
    "train": "train:train",
    "plan": "plan:plan",
    "check-dataset": "check_dataset:check_config_dataset",
    "eval": "eval:evaluate",
    "contamination": "contamination:contamination",
    "plot-log": "plot_log:plot_log",
    "copy-cfg": "copy_cfg:copy_cfg",
    "list-cfg": "list_cfg:list_cfg",
    "list-templates": "list_templates:list_templates",
}
# what runs before a verb's function, given the whole command line: `xtuner train` under
# NPROC_PER_NODE=N relaunches itself with torchrun (its return code, or None to go on)
BEFORE: dict[str, str] = {"train": "xtuner_lite.training.distributed:relaunch_with_torchrun"}


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line (exit 2), without the usage block."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------- docstrings


def split_doc(doc: str) -> tuple[str, str, dict[str, str]]:
    """(first line, text before ``Args:``, help per argument name) of a docstring."""
    lines = inspect.cleandoc(doc or "").splitlines()
    cut = next((i for i, line in enumerate(lines) if line.strip() == "Args:"), len(lines))
    text = "\n".join(lines[:cut]).strip()
    helps: dict[str, str] = {}
    name = None
    for line in lines[cut + 1 :]:
        head, sep, rest = line.strip().partition(":")
        if sep and line.startswith("    ") and not line.startswith("     ") and head.isidentifier():
            name, helps[head] = head, rest.strip()
        elif name and line.strip():
            helps[name] += " " + line.strip()
    return (text.splitlines() or [""])[0], text, helps


def _source_doc(module: str, name: str, depth: int = 0) -> str:
    """The docstring of ``name`` in ``module``'s source, following ``from X import name``."""
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = path.with_suffix("") / "__init__.py"
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return ast.get_docstring(node) or ""
        if isinstance(node, ast.ImportFrom) and depth < 3:
            if any((alias.asname or alias.name) == name for alias in node.names):
                original = next(a.name for a in node.names if (a.asname or a.name) == name)
                return _source_doc(node.module or "", original, depth + 1)
    return ""


def verb_summary(verb: str) -> str:
    module, name = VERBS[verb].split(":")
    return split_doc(_source_doc(f"xtuner_lite.commands.{module}", name))[0]


# ---------------------------------------------------------------- parameters → argparse


def _python_only(hint: Any) -> bool:
    return hint is dict or typing.get_origin(hint) is dict


def _unwrap(hint: Any) -> tuple[Any, list[Any]]:
    """(the type a flag's text becomes, the Annotated extras): None and Python-only members of
    a union dropped (a dict), ``str`` where several remain (``resume: bool | str``)."""
    extras: list[Any] = []
    while True:
        if typing.get_origin(hint) is typing.Annotated:
            hint, *more = typing.get_args(hint)
            extras += more
        elif typing.get_origin(hint) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            args = [a for a in args if not _python_only(a)] or args
            hint = args[0] if len(args) == 1 else (str if str in args else args[0])
        else:
            return hint, extras


def _checked(check: Check) -> Callable[[str], Any]:
    """An argparse type: convert the text, then check it, else say what is accepted."""

    def parse(text: str) -> Any:
        try:
            value = check.convert(text)
        except (ValueError, XtunerError):
            raise argparse.ArgumentTypeError(f"must be {check.accepted}, got {text!r}") from None
        if not check.ok(value):
            raise argparse.ArgumentTypeError(f"must be {check.accepted}, got {text!r}")
        return value

    parse.__name__ = check.accepted  # argparse names the type in some messages
    return parse


def _value_options(hint: Any, extras: list[Any], default: Any) -> dict[str, Any]:
    """argparse keywords for a value of type ``hint``."""
    check = next((e for e in extras if isinstance(e, Check)), None)
    origin = typing.get_origin(hint)
    if origin is list:
        return {"nargs": "+"}
    if origin is Literal:
        choices = list(typing.get_args(hint))
        return {"choices": choices, "type": type(choices[0])}
    if hint is bool:
        if default is False:
            return {"action": "store_true"}
        return {"action": argparse.BooleanOptionalAction}
    if check is not None:
        return {"type": _checked(check)}
    return {"type": hint} if hint in (int, float) else {}


def add_parameter(
    parser: argparse.ArgumentParser, name: str, hint: Any, default: Any, help_text: str | None
) -> None:
    hint, extras = _unwrap(hint)
    flag = next((e for e in extras if isinstance(e, Flag)), Flag())
    required = default is inspect.Parameter.empty
    options = {**_value_options(hint, extras, default), "help": help_text}
    if flag.metavar:
        options["metavar"] = flag.metavar
    if flag.positional:
        parser.add_argument(name, nargs=options.pop("nargs", "?"), default=default, **options)
    elif required and not flag.option:
        parser.add_argument(name, **options)
    else:
        flags = flag.flags or ("--" + name.replace("_", "-"),)
        if "action" in options:
            options.pop("type", None)
        parser.add_argument(*flags, dest=name, required=required,
                            default=None if required else default, **options)  # fmt: skip


def _dataclass_fields(cls: type) -> list[tuple[str, Any, Any]]:
    """(name, type, default) of a dataclass's fields that a flag can hold (no lists)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = []
    for f in dataclasses.fields(cls):
        bare = _unwrap(hints[f.name])[0]
        if f.default is not dataclasses.MISSING and typing.get_origin(bare) is not list:
            fields.append((f.name, hints[f.name], f.default))
    return fields


def build_parser(verb: str, fn: Callable) -> tuple[ArgumentParser, dict[str, type]]:
    """The verb's parser, and the dataclass parameters whose fields became flags."""
    summary, text, helps = split_doc(inspect.getdoc(fn) or "")
    parser = ArgumentParser(
        prog=f"xtuner {verb}",
        description=text or summary,
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the docstring as written
    )
    hints = typing.get_type_hints(fn, include_extras=True)
    composite: dict[str, type] = {}
    for name, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or name not in hints:
            continue
        bare = _unwrap(hints[name])[0]
        if _python_only(bare):
            continue  # a Python-only setting
        if dataclasses.is_dataclass(bare):
            composite[name] = bare
            field_helps = split_doc(inspect.getdoc(bare) or "")[2]
            for field, hint, default in _dataclass_fields(bare):
                add_parameter(parser, field, hint, default, field_helps.get(field))
        else:
            add_parameter(parser, name, hints[name], param.default, helps.get(name))
    return parser, composite


def call_arguments(values: dict[str, Any], composite: dict[str, type]) -> dict[str, Any]:
    """The function's keyword arguments: a dataclass parameter built from its fields' flags and
    validated, a value out of range named by its flag."""
    for name, cls in composite.items():
        names = [f.name for f in dataclasses.fields(cls) if f.name in values]
        built = cls(**{field: values.pop(field) for field in names})
        try:
            values[name] = built.validate() if hasattr(built, "validate") else built
        except UsageError as exc:
            param = getattr(exc, "param", None)
            if not param:
                raise
            raise UsageError(str(exc).replace(param, "--" + param.replace("_", "-"), 1)) from None
    return values


# ---------------------------------------------------------------- the command line


def print_help() -> None:
    print("usage: xtuner [--debug] COMMAND ...\n")
    print("xtuner_lite: memory-efficient LLM fine-tuning, CPU included.\n\ncommands:")
    for verb in VERBS:
        print(f"  {verb:20s} {verb_summary(verb)}")
    print("\n  --debug              show full tracebacks on errors")
    print("run `xtuner COMMAND --help` for a command's arguments")


def pick_verb(argv: list[str]) -> tuple[str, list[str]]:
    """The verb named at the start of ``argv`` and the arguments after it (help: exit 0)."""
    if not argv or argv[0] in ("-h", "--help"):
        if not argv:
            print("xtuner: error: the following arguments are required: COMMAND", file=sys.stderr)
            sys.exit(2)
        print_help()
        sys.exit(0)
    first = argv[0]
    if first in VERBS:
        return first, argv[1:]
    group = [v for v in VERBS if v.split()[0] == first]
    if not group:
        choices = ", ".join(dict.fromkeys(v.split()[0] for v in VERBS))
        print(f"xtuner: error: invalid command {first!r} (choose from {choices})", file=sys.stderr)
        sys.exit(2)
    if len(argv) > 1 and f"{first} {argv[1]}" in VERBS:
        return f"{first} {argv[1]}", argv[2:]
    if len(argv) > 1 and argv[1] in ("-h", "--help"):
        print(f"usage: xtuner {first} {{{','.join(v.split()[1] for v in group)}}} ...\n")
        for verb in group:
            print(f"  {verb:24s} {verb_summary(verb)}")
        sys.exit(0)
    actions = ", ".join(v.split()[1] for v in group)
    print(f"xtuner {first}: error: name one of: {actions}", file=sys.stderr)
    sys.exit(2)


def _load(target: str, package: str = "xtuner_lite.commands") -> Callable:
    module, name = target.split(":")
    return getattr(import_module(module if "." in module else f"{package}.{module}"), name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not sys.stderr.isatty():  # a bar redraws with carriage returns: noise in a pipe or a log
        os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is first imported
    debug = bool(argv) and argv[0] == "--debug"
    verb, rest = pick_verb(argv[1:] if debug else argv)
    name_cpu_accelerator()  # DeepSpeed's "no GPU" warning, printed by any import of it
    fn = _load(VERBS[verb])
    parser, composite = build_parser(verb, fn)
    values = vars(parser.parse_args(rest))
    try:
        if verb in BEFORE:
            code = _load(BEFORE[verb])(argv)
            if code is not None:
                return code
        _quiet_transformers()
        result = fn(**call_arguments(values, composite))
        return result if isinstance(result, int) and not isinstance(result, bool) else 0
    except UsageError as exc:  # an option out of range: like argparse's own errors
        print(f"xtuner {verb}: error: {exc}", file=sys.stderr)
        return 2
    except XtunerError as exc:
        if debug:
            traceback.print_exc()
        print(f"xtuner {verb}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`xtuner list-cfg | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # noqa: BLE001 - unexpected: full traceback plus the message, non-zero
        traceback.print_exc()
        print(f"xtuner {verb}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _quiet_transformers() -> None:
    """Weight-loading bars drown the real output (transformers is imported by then)."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
