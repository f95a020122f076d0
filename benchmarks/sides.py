"""Each benchmark side in its own process, so its peak memory and start-up are its own.

A script runs itself with ``--side NAME`` (or its own child flag); the child prints one line
``RESULT {json}`` that :func:`run_side` reads back.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from xtuner_lite.resources import peak_rss_bytes


def peak_rss_mib() -> float:
    """This process's peak resident memory (its own, not its parent's: see peak_rss_bytes)."""
    return peak_rss_bytes() / 2**20


def report(result: dict) -> None:
    """The child's answer: its result with its peak memory."""
    print("RESULT " + json.dumps({**result, "peak_rss_mib": peak_rss_mib()}))


def run_side(cmd: list[str], name: str, env: dict | None = None) -> dict:
    """Run a child command line (in ``env``, default this process's) and return its RESULT;
    exit with its stderr if it failed."""
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode != 0 or not line:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(line[0][7:])


def train_ours(cfg: dict, prefix: str) -> dict:
    """``xtuner_lite.train`` of ``cfg`` in a new work dir: its seconds (model loading included)
    and the real tokens its loss log counts."""
    import tempfile
    import time

    from xtuner_lite import train

    work = tempfile.mkdtemp(prefix=prefix)
    start = time.perf_counter()
    train(cfg, work_dir=work)
    seconds = time.perf_counter() - start
    tokens = sum(json.loads(line)["tokens"] for line in open(Path(work) / "loss.jsonl"))
    return {"seconds": seconds, "tokens": tokens}


def cpu_name() -> str:
    """The CPU's model name and whether it has native bf16 (AMX, AVX512-bf16): rows name it."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), platform.machine())  # fmt: skip
    flags = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in info.split()]
    return f"{name} ({', '.join(flags) or 'no AVX2'}), {os.cpu_count()} cores"
