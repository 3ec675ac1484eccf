"""What counting one request against a per-device rate limit costs, per store (gateway/ratelimits.py):
this process's sliding window (`RateLimiter`), the machine table every worker maps
(`authz/ratetable.py`) alone and with a second process hammering the same table (lock contention),
and Redis (`RATE_SCRIPT`, one round trip; only when `redis-server` is on PATH). Not a test: prints a
markdown section; `--write` appends it to RESULTS.md.

    .venv/bin/python bench/bench_ratelimit.py [--n 50000] [--devices 1000] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import benchlib  # noqa: E402  (bench/ is the script's directory: first on sys.path)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "addons"))

from easgate.authz.cache import DecisionCache  # noqa: E402
from easgate.authz.commands import RateLimit, RateLimiter  # noqa: E402
from easgate.authz.ratetable import MachineRateLimits  # noqa: E402
from easgate.gateway.ratelimits import RateLimits  # noqa: E402
from easgate.gateway.sharedcache import SharedCache  # noqa: E402
from easgate.tools.clusterservers import TestRedis  # noqa: E402

LIMITS = (RateLimit("per-device", 120, 60.0, None),)


def per_hit_us(hit, n: int, devices: int) -> float:
    keys = [("alice", f"dev{i}") for i in range(devices)]
    t0 = time.perf_counter()
    for i in range(n):
        hit(keys[i % devices], "Sync")
    return (time.perf_counter() - t0) / n * 1e6


def _hammer(directory: str, stop) -> None:
    t = MachineRateLimits(LIMITS, directory)
    i = 0
    while not stop.is_set():
        t.hit(("bob", f"dev{i % 1000}"), "Sync")
        i += 1


async def redis_us(n: int, devices: int) -> float | None:
    if shutil.which("redis-server") is None:
        return None
    r = TestRedis().start()
    try:
        shared = SharedCache(r.url, DecisionCache(300, 30, 1000), lock_ms=2000)
        limits = RateLimits(LIMITS, shared, run_dir="")
        await limits.hit(("alice", "warm"), "Sync")
        t0 = time.perf_counter()
        for i in range(n):
            await limits.hit(("alice", f"dev{i % devices}"), "Sync")
        us = (time.perf_counter() - t0) / n * 1e6
        await shared.close()
        return us
    finally:
        r.stop()


def main(n: int, devices: int) -> str:
    d = tempfile.mkdtemp(prefix="easgate-bench-rate-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
    try:
        local = per_hit_us(RateLimiter(LIMITS).hit, n, devices)
        machine = MachineRateLimits(LIMITS, d)
        alone = per_hit_us(machine.hit, n, devices)
        stop = multiprocessing.Event()
        other = multiprocessing.Process(target=_hammer, args=(d, stop))
        other.start()
        time.sleep(0.5)  # let it start hammering
        contended = per_hit_us(machine.hit, n, devices)
        stop.set()
        other.join(10)
        machine.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    redis = asyncio.run(redis_us(min(n, 10_000), devices))
    rows = [("this process (`RateLimiter`, sliding window)", local),
            ("machine table (`authz/ratetable.py`), one process", alone),
            ("machine table, a second process hitting the same table", contended)]
    if redis is not None:
        rows.append(("Redis (`RATE_SCRIPT`, loopback, one round trip)", redis))
    out = [f"## bench_ratelimit.py: cost of one rate-limit count ({time.strftime('%Y-%m-%d')}, "
           f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, easgate at "
           f"{benchlib.commit()})", "",
           f"{n} requests over {devices} devices, one limit of 120 requests per 60 s.", "",
           "| store | µs per request |", "|---|---|"]
    out += [f"| {name} | {us:.1f} |" for name, us in rows]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--write", action="store_true", help="append the section to bench/RESULTS.md")
    a = ap.parse_args()
    benchlib.refuse_dirty_write(a.write, "bench_ratelimit")
    text = main(a.n, a.devices)
    print(text)
    if a.write:
        benchlib.append(text, "bench_ratelimit")
