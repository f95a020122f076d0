"""Give freed CPU memory back to the operating system.

glibc keeps the activations a step frees in its heap (and raises its mmap threshold after large
frees), so a CPU run's resident memory creeps up step after step although nothing is live. One
``malloc_trim`` per optimizer step (well under a millisecond against seconds of compute) keeps
resident memory at the real working set; a fixed 4 MiB mmap threshold makes every larger buffer
(logits chunks, long rows' activations) its own mapping, returned on free instead of raising the
heap's high-water mark: ~40 MiB lower peak on a SmolLM2 LoRA step at the same speed. (Lower
thresholds cost page faults: at 1 MiB a step took 5x the faults and 14 % longer, measured.)
No-ops where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


@functools.cache
def _libc_function(symbol: str):
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), symbol) if name else None
    except (OSError, AttributeError):
        return None


def cap_mmap_threshold(nbytes: int = 4 << 20) -> bool:
    """Serve allocations of ``nbytes`` and more by mmap; False where that is not possible."""
    mallopt = _libc_function("mallopt")
    return bool(mallopt and mallopt(M_MMAP_THRESHOLD, nbytes))


def release_freed_memory() -> bool:
    """Return freed heap pages to the OS; False where that is not possible."""
    trim = _libc_function("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True
