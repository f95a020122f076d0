"""Count the imports written inside functions, per file (the module graph should be visible at
the top of each file). Run: python scripts/count_function_imports.py [xtuner_lite]"""

from __future__ import annotations

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


if __name__ == "__main__":
    counts = function_imports(Path(sys.argv[1] if len(sys.argv) > 1 else "xtuner_lite"))
    print(f"{sum(counts.values())} function-level imports")
    for name, n in counts.most_common():
        print(f"{n:4d} {name}")
