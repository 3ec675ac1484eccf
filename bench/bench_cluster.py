"""Past one machine: callouts and latency with 1, 2 and 3 gateway nodes sharing Redis.

    .venv/bin/python bench/bench_cluster.py                     # 1, 2, 3 nodes; prints a markdown section
    .venv/bin/python bench/bench_cluster.py --devices 20 --per-device 10 --nodes 1 3   # a smoke run
    .venv/bin/python bench/bench_cluster.py --write             # append it to bench/RESULTS.md

Starts a throw-away PostgreSQL and Redis (easgate.tools.clusterservers), imports the devices into
the PostgreSQL inventory, runs two real `easgate connector` processes on it (with block events to
Redis) and N `easgate run --workers 1` nodes (node i asks connector i % 2, all share Redis),
then sends every device's requests to every node in turn (each node gets its share
over 16 kept-alive TLS connections, all nodes at once), twice: with `cache.redis` (shared) and
without (each node on its own). Reports callouts (the connectors' own counters) and per-request
latency (p50/p99 over all requests, measured by the client).

Everything runs on this machine on loopback: with 2 cores the nodes compete with the client,
Redis, PostgreSQL and the connectors, so read the callouts and the ratios, not the absolutes.
Not a test: nothing here asserts; it reports.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import re
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib  # noqa: E402  (bench/ is the script's directory: first on sys.path)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gateway as bg  # noqa: E402  (the bench's servers, configs, processes)

from easgate.tools.clusterservers import TestPostgres, TestRedis  # noqa: E402
from easgate.tools.pki import generate_pki  # noqa: E402


class Connector:
    def __init__(self, cfg: Path) -> None:
        self.proc = bg.Proc("connector", [bg.PY, "-m", "easgate.cli", "connector", str(cfg), "--listen",
                                          "127.0.0.1:0"])
        deadline = time.monotonic() + 60
        while not (m := re.search(r"listening at http://127\.0\.0\.1:(\d+)", "\n".join(self.proc.lines))):
            if time.monotonic() > deadline or self.proc.proc.poll() is not None:
                raise RuntimeError("connector did not start:\n" + "\n".join(self.proc.lines))
            time.sleep(0.05)
        self.port = int(m[1])

    def callouts(self) -> int:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        c.request("GET", "/health")
        counters = json.loads(c.getresponse().read())["counters"]
        c.close()
        return counters.get("authorize_allow", 0) + counters.get("authorize_deny", 0)


async def _node_run(port: int, pki: Path, requests: list[bytes], connections: int) -> list[float]:
    """Latencies (ms) of `requests` over `connections` kept-alive TLS connections to one node."""
    ctx = ssl.create_default_context(cafile=str(pki / "public-ca.pem"))
    queue = list(reversed(requests))
    lat: list[float] = []

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=bg.HOSTNAME)
        try:
            while queue:
                req = queue.pop()
                t = time.perf_counter()
                writer.write(req)
                head = await reader.readuntil(b"\r\n\r\n")
                m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
                if m:
                    await reader.readexactly(int(m[1]))
                lat.append((time.perf_counter() - t) * 1000)
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return lat


async def _cluster_run(ports: list[int], pki: Path, devices: list[str], per_device: int) -> tuple[list[float], float]:
    share: list[list[bytes]] = [[] for _ in ports]
    for rnd in range(per_device):  # round r sends device d to node (d + r) % n: every device visits every node
        for d, dev in enumerate(devices):
            share[(d + rnd) % len(ports)].append(bg.as_request(dev))
    t0 = time.monotonic()
    parts = await asyncio.gather(*(_node_run(p, pki, reqs, 16) for p, reqs in zip(ports, share)))
    return [x for part in parts for x in part], time.monotonic() - t0


def run(d: Path, pki: Path, node_counts: list[int], n_devices: int, per_device: int) -> str:
    devices = [f"ApplCL{i:05d}" for i in range(n_devices)]
    pg, redis = TestPostgres().start(), TestRedis().start()
    mdm, ex = bg.start_server("mdm"), bg.start_server("exchange", pki)
    rows = []
    try:
        csv = d / "inventory.csv"
        csv.write_text("device_id,user,blocked\n" + "".join(f"{dev},alice,{'yes' if i % 5 == 0 else 'no'}\n"
                                                             for i, dev in enumerate(devices)))
        for n in node_counts:
            for shared in (True, False):
                url = pg.create_database(f"bench_{n}_{int(shared)}")
                subprocess.run([bg.PY, "-m", "easgate.cli", "devices", "--db", url, "import", str(csv)], check=True,
                               capture_output=True)
                subprocess.run(["redis-cli", "-p", str(redis.port), "FLUSHALL"], capture_output=True)
                ccfg = d / f"connector-{n}-{int(shared)}.yaml"
                ccfg.write_text(f"inventory: {url}\nredis: {redis.url}\n")
                conns = [Connector(ccfg), Connector(ccfg)]
                nodes = []
                try:
                    for i in range(n):
                        cache = {"allow_ttl_s": 300, "deny_ttl_s": 300, **({"redis": redis.url} if shared else {})}
                        cfg = bg.write_gateway_config(d, pki, mdm.port, ex.port, connector_port=conns[i % 2].port,
                                                      cache=cache, name=f"node-{n}-{int(shared)}-{i}.yaml", audit=False)
                        nodes.append(bg.start_easgate(cfg, "--workers", "1"))
                    lat, secs = asyncio.run(_cluster_run([g.port for g in nodes], pki, devices, per_device))
                    calls = sum(c.callouts() for c in conns)
                finally:
                    for g in nodes:
                        g.stop()
                    for c in conns:
                        c.proc.stop()
                q = statistics.quantiles(lat, n=100)
                rows.append((n, shared, len(lat), secs, calls, q[49], q[98]))
                print(f"  {n} node(s), {'shared' if shared else 'own caches'}: {calls} callouts, "
                      f"{len(lat)} requests in {secs:.1f}s, p50 {q[49]:.1f} ms p99 {q[98]:.1f} ms", file=sys.stderr)
    finally:
        for p in (mdm, ex):
            p.stop()
        redis.stop()
        pg.stop()
    out = [f"## Gateway nodes sharing Redis (bench/bench_cluster.py, {time.strftime('%Y-%m-%d')})", "",
           f"Machine: {bg.machine()}.", "",
           f"{n_devices} devices (every fifth blocked) x {per_device} requests, each device to every node in turn, "
           "16 kept-alive TLS connections per node, all nodes at once; 2 `easgate connector` processes on one "
           "PostgreSQL inventory; TTLs 300 s, so the bound with Redis is one callout per device.", "",
           "| nodes | cache | requests | took | callouts | p50 | p99 |", "|---:|---|---:|---:|---:|---:|---:|"]
    for n, shared, reqs, secs, calls, p50, p99 in rows:
        out.append(f"| {n} | {'Redis (shared)' if shared else 'per node'} | {reqs:,} | {secs:.1f} s | {calls:,} | "
                   f"{p50:.1f} ms | {p99:.1f} ms |")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--per-device", type=int, default=30)
    ap.add_argument("--write", action="store_true", help="append the results to bench/RESULTS.md")
    args = ap.parse_args()
    benchlib.refuse_dirty_write(args.write, "bench_cluster")
    with tempfile.TemporaryDirectory(prefix="easgate-bench-cluster-") as tmp:
        d = Path(tmp)
        generate_pki(d / "pki")
        section = run(d, d / "pki", args.nodes, args.devices, args.per_device)
    print(section)
    if args.write:
        benchlib.append(section, "bench_cluster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
