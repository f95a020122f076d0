"""Keep glibc's heap from holding large freed buffers on CPU.

glibc raises its mmap threshold after large frees, so big activation buffers (logits chunks,
long rows' activations) land in the heap and raise its high-water mark. A fixed 4 MiB threshold
makes each of them its own mapping, returned on free: a lower peak at the same speed (lower
thresholds cost page faults).
Freed smaller buffers stay in the heap for the next step to reuse; giving them back with
``malloc_trim`` after every step lowered the peak a little and made steps slower (the next
step faults every page in again), so nothing trims.
No-op where the C library is not glibc.
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
