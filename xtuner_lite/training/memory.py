"""Keep glibc's heap from holding large freed buffers on CPU.

glibc raises its mmap threshold after large frees, so the biggest buffers (logits chunks, long
rows' attention probabilities) would land in the heap and raise its high-water mark. A fixed
32 MiB threshold (glibc's own ceiling for its moving one) makes each of them its own mapping,
returned on free, from the first step on. Lower thresholds lower the peak further but also map
the per-layer activations of a multi-row batch, which every layer frees and allocates again:
each reuse then faults all its pages in (the bench_dpo row in docs/benchmarks.md).
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


def cap_mmap_threshold(nbytes: int = 32 << 20) -> bool:
    """Serve allocations of ``nbytes`` and more by mmap; False where that is not possible."""
    mallopt = _libc_function("mallopt")
    return bool(mallopt and mallopt(M_MMAP_THRESHOLD, nbytes))
