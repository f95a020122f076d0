"""What this process has used, read without heavy imports (benchmark sides read it too)."""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path


def peak_rss_bytes() -> int:
    """This process's peak resident memory: Linux's VmHWM where there is one, since
    ``ru_maxrss`` keeps the high-water mark of the process image before ``exec`` (a child
    started by a process holding 2 GiB reports at least 2 GiB)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        status = ""
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    if found:
        return int(found.group(1)) * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
