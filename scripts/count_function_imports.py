"""Count the imports written inside functions, per file (the module graph should be visible at
the top of each file). Run: python scripts/count_function_imports.py [xtuner_lite]"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from pathlib import Path


def function_imports(root: Path) -> Counter:
    counts: Counter = Counter()
    for path in sorted(root.rglob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                counts[str(path)] += sum(
                    isinstance(node, (ast.Import, ast.ImportFrom)) for node in ast.walk(fn)
                )
    return +counts


def main() -> int:
    parser = argparse.ArgumentParser(description="imports written inside functions, per file")
    parser.add_argument("root", nargs="?", default="xtuner_lite")
    parser.add_argument("--max", type=int, help="fail (exit 1) above this many")
    args = parser.parse_args()
    counts = function_imports(Path(args.root))
    total = sum(counts.values())
    print(f"{total} function-level imports" + (f" (at most {args.max})" if args.max else ""))
    for name, n in counts.most_common():
        print(f"{n:4d} {name}")
    return 1 if args.max is not None and total > args.max else 0


if __name__ == "__main__":
    sys.exit(main())
