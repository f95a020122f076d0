"""Our side of a benchmark on an earlier tree and on this one, alternating: did a change move it?

A benchmark's peer (TRL, transformers) is the same code on both trees, so its ratio to ours moves
exactly as ours does; this runs only our side, from each tree's own copy of the benchmark script
with that tree's package first on the path, in pairs (earlier, this), and prints the median
seconds of each and the speed ratio (earlier seconds / this tree's).

    python benchmarks/before_after.py --before /tmp/before --pairs 3 bench_train.py -- \\
        --side ours --checkpoint-fraction 0.5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

from sides import cpu_name, run_side

HERE = Path(__file__).resolve().parents[1]


def run_in(tree: Path, script: str, args: list[str]) -> float:
    """Seconds of one run of ``script``'s side from ``tree``, with that tree's package first."""
    cmd = [sys.executable, str(tree / "benchmarks" / script), *args]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return float(run_side(cmd, f"{script} in {tree}", env)["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the earlier tree (a checkout)")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("script", help="a benchmark under benchmarks/, e.g. bench_train.py")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then its child's arguments")
    opts = parser.parse_args()
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
    seconds: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(opts.pairs):
        seconds["before"].append(run_in(opts.before.resolve(), opts.script, args))
        seconds["after"].append(run_in(HERE, opts.script, args))
        print(f"pair: before {seconds['before'][-1]:.1f} s, after {seconds['after'][-1]:.1f} s",
              flush=True)  # fmt: skip
    before, after = (statistics.median(seconds[k]) for k in ("before", "after"))
    ratios = [b / a for b, a in zip(seconds["before"], seconds["after"])]
    print(f"{opts.script} {' '.join(args)} on {cpu_name()}")
    print(f"median seconds: before {before:.1f}, after {after:.1f}; speed after/before "
          f"{before / after:.3f} (pairs: {', '.join(f'{r:.3f}' for r in ratios)})")  # fmt: skip


if __name__ == "__main__":
    main()
