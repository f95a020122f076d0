"""The consolidation's numbers for a tree: the longest functions, the function-level imports, how
many modules outside an objective's own package name it, and the walk of ``train``'s config
(which modules ``train``'s own module calls into during a two-step run, and how many calls
return to it).

Run from a checkout: python scripts/code_metrics.py [--walk]
"""

from __future__ import annotations

import argparse
import ast
import inspect
import sys
import tempfile
from pathlib import Path

from count_function_imports import function_imports

OBJECTIVE_CLASSES = (
    "NextTokenObjective",
    "SFTObjective",
    "PreferenceObjective",
    "DPOObjective",
    "ORPOObjective",
    "SimPOObjective",
    "KTOObjective",
    "RewardObjective",
    "GRPOObjective",
)


def longest_functions(root: Path, top: int) -> list[tuple[int, int, str]]:
    """(lines, lines without the docstring, name) of the longest functions."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                first = node.body[0]
                documented = isinstance(first, ast.Expr) and isinstance(
                    getattr(first, "value", None), ast.Constant
                )
                doc = first.end_lineno - first.lineno + 1 if documented else 0
                found.append((lines, lines - doc, f"{path.relative_to(root.parent)}:{node.name}"))
    return sorted(found, reverse=True)[:top]


def names_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    return names


def defining_package(root: Path, name: str) -> str | None:
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.ClassDef) and n.name == name for n in ast.walk(tree)):
            return path.relative_to(root).parts[0]
    return None


def objective_mentions(root: Path) -> dict[str, int]:
    """Modules outside the class's top-level package (``xtuner_lite/<package>``) naming it."""
    names = {path: names_in(path) for path in root.rglob("*.py")}
    counts = {}
    for cls in OBJECTIVE_CLASSES:
        home = defining_package(root, cls)
        if home is None:
            continue
        counts[cls] = sum(
            cls in found and path.relative_to(root).parts[0] != home
            for path, found in names.items()
        )
    return counts


def config_walk() -> tuple[list[str], int]:
    """Run two SFT steps of the bundled identity config on a 1-layer SmolLM2 and record each call
    made from ``train``'s own module into another xtuner_lite module."""
    import xtuner_lite

    home = inspect.getsourcefile(xtuner_lite.train)
    package = str(Path(xtuner_lite.__file__).parent)
    calls: list[str] = []

    def profile(frame, event, arg):
        if event != "call" or frame.f_back is None:
            return
        callee, caller = frame.f_code.co_filename, frame.f_back.f_code.co_filename
        if caller == home and callee != home and callee.startswith(package):
            calls.append(str(Path(callee).relative_to(Path(package).parent)))

    # no chat samples: sample_prompts, named evaluation_inputs on trees before the rename
    for samples in ("sample_prompts", "evaluation_inputs"):
        options = ["train.max_iters=2", "train.save_steps=1000", f"train.{samples}=[]"]
        calls.clear()
        with tempfile.TemporaryDirectory() as work_dir:
            sys.setprofile(profile)
            try:
                xtuner_lite.train("smollm2_135m_identity_lora", work_dir, cfg_options=options)
                break
            except xtuner_lite.XtunerError as exc:
                if samples not in str(exc):
                    raise
            finally:
                sys.setprofile(None)
    return sorted(set(calls)), len(calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="xtuner_lite")
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--walk", action="store_true", help="also run the config walk")
    args = parser.parse_args()
    root = Path(args.root)
    print("longest functions (lines, without the docstring):")
    for lines, code, name in longest_functions(root, args.top):
        print(f"  {lines:4d} {code:4d} {name}")
    print(f"function-level imports: {sum(function_imports(root).values())}")
    print("modules outside its package naming each objective class:")
    for cls, n in objective_mentions(root).items():
        print(f"  {n:3d} {cls}")
    if args.walk:
        modules, calls = config_walk()
        print(f"train's walk: {len(modules)} modules called, {calls} returns to train's module")
        for name in modules:
            print(f"  {name}")


if __name__ == "__main__":
    main()
