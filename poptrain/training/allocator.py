"""A stacking host's C allocator: a step's large temporaries reuse memory the last step freed.

A stacked step allocates and frees the same few-megabyte temporaries every step (500 members'
activations and their gradients, 5 MB each for seed 000's network). glibc's ``malloc`` serves
blocks above its mmap threshold (128 KiB to 32 MiB, adjusted as it goes) with fresh ``mmap``
calls and gives the top of its heap back to the system above its trim threshold, so each step
faulted in thousands of new pages: 1,600 to 3,200 page faults and 3 to 6 ms of system time in a
23 ms step of 500 members on one core, measured on this project's 2-core machine. With both
thresholds fixed well above a step's temporaries, the pages stay mapped between steps (about 3
faults a step) and a step on the main thread of a process takes a fifth less, at the same peak resident memory.

In a host, training runs on one of Ray's threads, whose allocations come from an arena of 64 MiB
heaps that glibc unmaps whole once empty, whatever the thresholds: there page faults went from
tens of thousands a second to hundreds in some runs and not in others, and 1,000 members on two
hosts trained 5% faster (three interleaved pairs of runs, ``benchmarks/README.md``).

The thresholds are ``mallopt``'s, set when a host that stacks members starts, for the whole
process (every thread's arena) and for as long as it lives (a warm process keeps them). A host of
members trained one by one leaves them as they are: a member alone gained nothing measurable,
and its process's peak resident memory grew by 27 MiB (461 to 488 MiB for the 1.06M-parameter
benchmark member). Elsewhere than glibc (macOS, musl) nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt's parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap, not their own mmap: a host's largest per-step
# temporaries stay below it (a parameter this large is allocated once and kept).
MMAP_THRESHOLD = 64 << 20
# Free memory at the top of the heap is given back to the system only beyond this much.
TRIM_THRESHOLD = 256 << 20


def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds (:data:`MMAP_THRESHOLD`, :data:`TRIM_THRESHOLD`) for
    this process; whether they were set (False where the C library is not glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  glibc only: musl has mallopt as a stub that ignores these
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Both, and the mmap threshold first: setting either one stops glibc's own adjustment of the
    # other, and a trim threshold alone leaves every block above 128 KiB mmapped.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
