"""`xtuner data prepare` throughput with 1 and 2 worker processes, and identical output either way.

The bundled C4 + Wikipedia demo config (every stage: normalize, language, Gopher repetition and
quality, PII, block list, GSM8K decontamination, exact and MinHash dedup) over the same fixed
tasks; each worker count in its own process, alternating, median of ``--repeats``. Documents/s
and MB/s count the whole prepare call (every datatrove run, worker start-up included, the report
excluded).

    python benchmarks/bench_dataprep.py --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
from pathlib import Path

from sides import report, run_side

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CONFIG = "prepare_c4_wiki_demo"


def run_child(workers: int, out: Path, tasks: int) -> dict:
    from xtuner_lite.dataprep import prepare
    from xtuner_lite.dataprep.settings import load_prepare_config

    overrides = {
        "inputs.data_files": [str(SHARED / "raw/llamafactory_c4_demo.jsonl"),
                              str(SHARED / "raw/llamafactory_wiki_demo.txt")],
        "output": str(out),
        "run.tasks": tasks,
    }  # fmt: skip
    done = prepare(load_prepare_config(CONFIG, overrides), workers=workers, quiet=True)
    digest = hashlib.sha256()
    for path in sorted((out / "data").glob("*.jsonl")):
        digest.update(path.name.encode() + path.read_bytes())
    seconds = sum(done["seconds"].values())
    return {
        "workers": workers,
        "seconds": seconds,
        "documents": done["documents_in"],
        "documents_out": done["documents_out"],
        "mb": done["input_bytes"] / 1e6,
        "output_sha256": digest.hexdigest(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        report(run_child(opts.child, opts.out, opts.tasks))
        return
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(opts.repeats):
        for workers in (1, 2):
            out = Path(tempfile.mkdtemp(prefix=f"bench_dataprep_{workers}_"))
            cmd = [sys.executable, __file__, "--child", str(workers), "--out", str(out),
                   "--tasks", str(opts.tasks)]  # fmt: skip
            runs[workers].append(run_side(cmd, f"workers={workers}"))
    hashes = {r["output_sha256"] for rs in runs.values() for r in rs}
    print(f"{CONFIG}: {runs[1][0]['documents']} documents, {runs[1][0]['mb']:.2f} MB in, "
          f"{runs[1][0]['documents_out']} out, {opts.tasks} tasks")  # fmt: skip
    print(f"{'workers':>7} {'seconds (median)':>17} {'documents/s':>12} {'MB/s':>7}")
    for workers, rs in runs.items():
        seconds = statistics.median(r["seconds"] for r in rs)
        print(f"{workers:7d} {seconds:17.2f} {rs[0]['documents'] / seconds:12.1f} "
              f"{rs[0]['mb'] / seconds:7.3f}")  # fmt: skip
    speedup = statistics.median(a["seconds"] / b["seconds"] for a, b in zip(runs[1], runs[2]))
    print(f"2 workers vs 1: {speedup:.2f}x; identical output in every run: {len(hashes) == 1}")


if __name__ == "__main__":
    main()
