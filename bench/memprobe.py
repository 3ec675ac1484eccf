"""A mitmproxy script for bench/bench_memory.py: on SIGUSR1, write where this process's memory is.

Started with `PYTHONTRACEMALLOC=1` (or `EASGATE_MEMPROBE_TRACE=1`) it also records Python
allocations; the snapshot goes to $EASGATE_MEMPROBE_OUT.N (N counts signals), a JSON summary next to it:
RSS, glibc's malloc in-use bytes (mallinfo2: OpenSSL's buffers and structures live there), and the
number of live objects of the classes a held connection is made of. With EASGATE_MEMPROBE_TRIM=1 it
then calls glibc's malloc_trim(0) and writes RSS again (`rss_trimmed`): what RSS over malloc is slack
that the allocator can give back.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
import tracemalloc
from collections import Counter


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_in_use() -> int:
    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = _Mallinfo2
        mi = libc.mallinfo2()
        return mi.uordblks + mi.hblkhd
    except (OSError, AttributeError):
        return 0


def rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class MemProbe:
    def __init__(self) -> None:
        self.n = 0
        if os.environ.get("EASGATE_MEMPROBE_TRACE") and not tracemalloc.is_tracing():
            tracemalloc.start(int(os.environ.get("EASGATE_MEMPROBE_FRAMES", "12")))
        signal.signal(signal.SIGUSR1, lambda *_: self.dump())

    def dump(self) -> None:
        self.n += 1
        out = os.environ.get("EASGATE_MEMPROBE_OUT", "/tmp/easgate-memprobe")
        gc.collect()
        types = Counter(f"{getattr(type(o), '__module__', '?')}.{type(o).__qualname__}" for o in gc.get_objects())
        keep = {k: v for k, v in types.items() if v >= 100}
        summary = {"rss": rss(), "malloc": malloc_in_use(), "types": keep,
                   "traced": tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else None}
        if os.environ.get("EASGATE_MEMPROBE_TRIM"):
            try:
                ctypes.CDLL(None).malloc_trim(0)
                summary["rss_trimmed"] = rss()
            except (OSError, AttributeError):
                pass
        if tracemalloc.is_tracing():
            tracemalloc.take_snapshot().dump(f"{out}.{self.n}.snap")
        with open(f"{out}.{self.n}.json", "w") as f:
            json.dump(summary, f)


addons = [MemProbe()]
