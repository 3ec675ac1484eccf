"""Reloading a 1,000,000-device inventory: how long does any request wait meanwhile?

    .venv/bin/python bench/bench_reload.py            # print the results (markdown)
    .venv/bin/python bench/bench_reload.py --write    # and append them to bench/RESULTS.md
    .venv/bin/python bench/bench_reload.py --devices 300000

A real gateway (`easgate run --workers 1`, policy checked every 100 ms) in front of the fast
upstreams of bench_gateway.py. Two clients ask one after the other on keep-alive connections, one
on the MDM route, one on the ActiveSync route (a decision per request: cache off, audit line
written). The inventory file (a few devices) is then replaced by an MDM export of N devices
(renamed in, as it should be), and the clients keep asking until the gateway logs the reload
and one second more. Reported: per route, the latency before the reload (for as long as a reload
takes, so that the maxima compare: on a shared machine they are scheduling noise) and during it
(p50, p99, max), and how long the reload took. The target (issue 12): no request delayed by more than 50 ms.

Before the fix (parsing in a thread, holding the GIL) one request waited ~1.85 s for 300,000 devices
and ~4 s for 1,000,000 (tests/test_hardening.py's old xfail). Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import shutil
import ssl
import statistics
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import benchlib  # noqa: E402  (bench/ is the script's directory: first on sys.path)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gateway as bg  # noqa: E402  (the fast upstreams, the gateway process helper)

AS = "/Microsoft-Server-ActiveSync"
DEVICE = "ApplBENCH0000001"  # in the policy's own inventory: allowed before, during and after


def write_inventory(path: Path, n: int) -> None:
    with open(path, "w") as f:
        f.write("device_id,owner,compliant\n")
        f.writelines(f"ApplINV{i:09d},user{i % 5000},true\n" for i in range(n))


class Client(threading.Thread):
    def __init__(self, port: int, pki: Path, route: str) -> None:
        super().__init__(daemon=True)
        self.port, self.route = port, route
        self.ctx = ssl.create_default_context(cafile=str(pki / "public-ca.pem"))
        self.samples: list[tuple[float, float, int]] = []  # (start, seconds, status)
        self.stop = threading.Event()

    def run(self) -> None:
        c = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=30)
        auth = "Basic YWxpY2U6c2VjcmV0"  # alice:secret
        while not self.stop.is_set():
            t0 = time.monotonic()
            if self.route == "mdm":
                c.request("GET", "/enroll", headers={"Host": "localhost"})
            else:
                c.request("POST", f"{AS}?Cmd=Sync&User=alice&DeviceId={DEVICE}&DeviceType=iPhone", body=b"",
                          headers={"Host": "localhost", "Authorization": auth, "User-Agent": "Apple-iPhone/1",
                                   "MS-ASProtocolVersion": "16.1"})
            r = c.getresponse()
            r.read()
            self.samples.append((t0, time.monotonic() - t0, r.status))


def stats(xs: list[float]) -> str:
    if not xs:
        return "- | - | - | 0"
    xs = sorted(xs)
    p99 = xs[min(len(xs) - 1, int(len(xs) * 0.99))]
    return f"{statistics.median(xs) * 1000:.2f} | {p99 * 1000:.2f} | {xs[-1] * 1000:.1f} | {len(xs)}"


def run(n: int, baseline_s: float) -> str:
    from easgate.tools.pki import generate_pki

    with tempfile.TemporaryDirectory(prefix="easgate-bench-reload-") as tmp:
        d = Path(tmp)
        pki = d / "pki"
        generate_pki(pki, hostnames=("localhost", "127.0.0.1"))
        big = d / "big.csv"
        t = time.monotonic()
        write_inventory(big, n)
        print(f"wrote {n} devices in {time.monotonic() - t:.1f}s", file=sys.stderr)
        inv = d / "inventory.csv"
        write_inventory(inv, 3)
        procs = []
        try:
            mdm = bg.start_server("mdm")
            ex = bg.start_server("exchange", pki)
            procs += [mdm, ex]
            cfg = bg.write_gateway_config(d, pki, mdm.port, ex.port, inventory_csv=inv,
                                          cache={"allow_ttl_s": 0, "deny_ttl_s": 0})
            gw = bg.start_easgate(cfg, "--workers", "1", "--", "--set", "easgate_policy_poll_ms=100")
            procs.append(gw)
            clients = [Client(gw.port, pki, "mdm"), Client(gw.port, pki, "activesync")]
            for c in clients:
                c.start()
            time.sleep(baseline_s)  # the "before" sample: as long as a reload, so the maxima compare
            shutil.copy(big, d / "inventory.csv.new")
            replaced = time.monotonic()
            os.replace(d / "inventory.csv.new", inv)
            while not any("policy reloaded" in ln for ln in gw.lines):
                if time.monotonic() - replaced > 600:
                    raise RuntimeError("no reload within 10 minutes:\n" + "\n".join(gw.lines[-20:]))
                time.sleep(0.05)
            reloaded = time.monotonic()
            time.sleep(1)
            for c in clients:
                c.stop.set()
                c.join(30)
        finally:
            for p in reversed(procs):
                p.stop()
            # with PYTHONASYNCIODEBUG=1: the event loop's own report of callbacks that held it
            for ln in (gw.lines if "gw" in locals() else []):
                if "Executing" in ln and "took" in ln:
                    print(f"gateway: {ln}", file=sys.stderr)
    rows = []
    for c in clients:
        before = [s for t0, s, _ in c.samples if t0 < replaced]
        during = [s for t0, s, _ in c.samples if replaced <= t0 <= reloaded + 1]
        bad = sum(1 for _, _, st in c.samples if st != 200)
        rows.append(f"| {c.route} | before | {stats(before)} | {bad} |")
        rows.append(f"| {c.route} | during the reload | {stats(during)} | |")
    return (f"## Inventory reload of {n:,} devices: request latency meanwhile (bench/bench_reload.py, {date.today()})\n\n"
            f"{bg.machine().rstrip()}\n- load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n\n"
            f"The reload (the file renamed in, until the gateway logged `policy reloaded`) took "
            f"{reloaded - replaced:.1f} s: parsing in a child process, the inventory handed over as an SQLite file.\n\n"
            "| route | when | p50 ms | p99 ms | max ms | requests | non-200 |\n|---|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")


async def _max_gap_while(work, tick_s: float = 0.001) -> tuple[float, float]:
    """(seconds the work took, longest gap between ticks of a 1 ms ticker meanwhile)."""
    done = asyncio.Event()
    gaps = [0.0]

    async def ticker() -> None:
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(tick_s)
            now = time.monotonic()
            gaps[0] = max(gaps[0], now - last - tick_s)
            last = now

    t = asyncio.get_running_loop().create_task(ticker())
    t0 = time.monotonic()
    await work()
    took = time.monotonic() - t0
    done.set()
    await t
    return took, gaps[0]


def loop_lag(n: int) -> str:
    """In one process: the event loop's longest stall while the same policy is reloaded the old way
    (a thread: `asyncio.to_thread(store.reload)`) and the new way (`reload_async` with the child
    process), and while idle for as long."""
    from easgate.authz import policyload
    from easgate.authz.policy import PolicyStore

    with tempfile.TemporaryDirectory(prefix="easgate-bench-lag-") as tmp:
        d = Path(tmp)
        write_inventory(d / "inv.csv", n)
        (d / "policy.yaml").write_text("mode: block\ninventory_file: inv.csv\n")
        work = d / "work"
        work.mkdir()
        store = PolicyStore(d / "policy.yaml", prepare=lambda p: policyload.compact(p, work))

        async def run_all() -> list[tuple[str, float, float]]:
            out = []
            took, gap = await _max_gap_while(lambda: asyncio.to_thread(store.reload, True))
            out.append(("old: parse in a thread", took, gap))
            took, gap = await _max_gap_while(
                lambda: store.reload_async(lambda path: policyload.load_policy_elsewhere(path, work), force=True))
            out.append(("new: parse in a child process, SQLite handed over", took, gap))
            took, gap = await _max_gap_while(lambda: asyncio.sleep(took))
            out.append(("idle, as long", took, gap))
            return out

        rows = asyncio.run(run_all())
    return ("| reload of the policy | took s | longest event-loop stall ms |\n|---|---|---|\n"
            + "\n".join(f"| {name} | {took:.1f} | {gap * 1000:.1f} |" for name, took, gap in rows) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=1_000_000)
    ap.add_argument("--baseline", type=float, default=30, help="seconds of requests before the reload (default 30)")
    ap.add_argument("--write", action="store_true", help="append the results to bench/RESULTS.md")
    args = ap.parse_args()
    benchlib.refuse_dirty_write(args.write, "bench_reload")
    out = run(args.devices, args.baseline)
    out += ("\nThe same reload in one process, nothing else running in it: the event loop's longest stall "
            "(a 1 ms ticker), old way against new.\n\n" + loop_lag(args.devices))
    print(out)
    if args.write:
        benchlib.append(out, "bench_reload")
    return 0


if __name__ == "__main__":
    sys.exit(main())
