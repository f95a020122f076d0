"""Each benchmark side in its own process, so its peak memory and start-up are its own.

A script runs itself with ``--side NAME`` (or its own child flag); the child prints one line
``RESULT {json}`` that :func:`run_side` reads back.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys


def peak_rss_mib() -> float:
    """This process's peak resident memory."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
