"""Scale: lean master vs stock mitmdump, 1 vs 2 workers, and 10,000 held ActiveSync Pings.

    apt-get install wrk nginx-light              # the load generator and the fast upstreams
    .venv/bin/python bench/bench_scale.py                 # print the results (markdown)
    .venv/bin/python bench/bench_scale.py --write         # and append them to bench/RESULTS.md
    .venv/bin/python bench/bench_scale.py --pings 2000 --duration 5 --rounds 1   # a quick look

Throughput (wrk -t1 -c32, HTTPS keep-alive, nginx upstreams on loopback, all on this machine):

* `mitmdump` bare reverse proxy (stock addons, `flow_detail=0`) to the nginx MDM stand-in;
* `easgate run --full --workers 1` (mitmproxy's DumpMaster + gateway), `easgate run --workers 1`
  (lean), `easgate run --workers 2`: on the MDM route (routing, client-cert header) and on the
  ActiveSync route (`authorize: activesync`, policy file, decision cache hit on every request, one
  audit line per request, upstream HTTPS verified with the internal CA).

The gateways run side by side, idle while another is measured; rounds alternate between them and
each figure is the median over the rounds (the machine is shared). CPU per request is the gateway
processes' user+system time over the measurement divided by the requests wrk completed.

Held Pings: one `easgate run` (workers as given, default 2) with the ActiveSync route to an asyncio
HTTPS stand-in that holds every `Cmd=Ping` until the client goes away; an asyncio client opens N
TLS connections and sends one Ping on each (distinct DeviceIds, so N decisions are cached). With
all N held upstream: the gateways' resident memory against its value before (per held Ping), and
short requests meanwhile (keep-alive and new TLS connections, MDM route): p50/p99.

Not a test: nothing here asserts; it reports.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import benchlib  # noqa: E402  (bench/ is the script's directory: first on sys.path)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "addons"))

import yaml

from easgate.gateway.connections import raise_fd_limit
from easgate.tools.pki import generate_pki

HOSTNAME = "mail.example.test"
BIN = ROOT / ".venv" / "bin"
PY = str(BIN / "python") if (BIN / "python").exists() else sys.executable
LISTEN_RE = re.compile(r"[Rr]everse proxy to \S+ listening at \[?([0-9.:a-f*]*)\]?:(\d+)")
AS_PATH = "/Microsoft-Server-ActiveSync?Cmd=Sync&User=alice&DeviceId=ApplBENCH0000001&DeviceType=iPhone"
AS_HEADERS = {"Authorization": "Basic Q09OVE9TT1xhbGljZTpzZWNyZXQ=", "User-Agent": "Apple-iPhone14C2/2008.420",
              "MS-ASProtocolVersion": "16.1", "Content-Type": "application/vnd.ms-sync.wbxml"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# Processes


class Proc:
    def __init__(self, name: str, argv: list[str], cwd: Path | None = None, env: dict | None = None) -> None:
        self.name = name
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, errors="replace",
                                     env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
        self.lines: list[str] = []
        self.ports: list[int] = []
        self.listening = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            m = LISTEN_RE.search(line)
            if m:
                self.ports.append(int(m[2]))
                self.listening.set()

    def wait_listening(self, n: int = 1, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while len(self.ports) < n:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} did not start:\n" + "\n".join(self.lines[-40:]))
            time.sleep(0.05)
        time.sleep(0.3)
        return self.ports[0]

    def pids(self) -> list[int]:
        """The process and its children (the workers)."""
        out = [self.proc.pid]
        try:
            kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            out += [int(k) for k in kids]
        except OSError:
            pass
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def cpu_seconds(pids: list[int]) -> float:
    tck = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tck
        except (OSError, IndexError):
            pass
    return total


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


# ------------------------------------------------------------------------------------------------
# Upstreams: nginx (fast, so the gateway is what is measured)

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 3600s;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{mdm};
        default_type application/json;
        location / {{ return 200 '{{"upstream": "mdm", "ok": true}}'; }}
    }}
    server {{
        listen 127.0.0.1:{exchange} ssl;
        ssl_certificate {pki}/exchange.pem;
        ssl_certificate_key {pki}/exchange.key;
        default_type application/vnd.ms-sync.wbxml;
        location / {{ return 200 'ok'; }}
    }}
}}
"""


def start_nginx(d: Path, pki: Path) -> tuple[Proc, int, int]:
    mdm, exchange = free_port(), free_port()
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(d=d, mdm=mdm, exchange=exchange, pki=pki))
    p = Proc("nginx", [shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(conf), "-p", str(d)])
    for port in (mdm, exchange):
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("nginx did not start: " + "\n".join(p.lines))
                time.sleep(0.05)
    return p, mdm, exchange


def gateway_config(d: Path, pki: Path, mdm_url: str, exchange_url: str, name: str) -> Path:
    (d / "policy.yaml").write_text(yaml.safe_dump({"mode": "permit"}))
    cfg = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "tls": {"certificate": str(pki / "gateway-full.pem"),
                "client_certs": {"mode": "optional", "ca": [str(pki / "device-ca.pem"), str(pki / "root-ca.pem")]}},
        "pools": {"exchange": {"servers": [exchange_url], "ca": str(pki / "internal-ca.pem"), "sni": "exchange.internal"},
                  "mdm": {"servers": [mdm_url]}},
        "routes": [
            {"name": "activesync", "priority": 100, "match": {"path_prefix": "/Microsoft-Server-ActiveSync"},
             "pool": "exchange", "authorize": "activesync"},
            {"name": "mdm", "priority": 110, "match": "any", "pool": "mdm", "client_cert_header": "NSClientCert"},
        ],
        "authorization": {"policy": str(d / "policy.yaml"),
                          "cache": {"allow_ttl_s": 3600, "deny_ttl_s": 60, "max_entries": 200_000}},
        "audit_log": str(d / f"audit-{name}.jsonl"),
    }
    p = d / f"gateway-{name}.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


# ------------------------------------------------------------------------------------------------
# Throughput with wrk

WRK_POST = """
wrk.method = "POST"
wrk.body = "\\3\\1\\106\\0"
wrk.headers["Host"] = "{host}"
{headers}
"""
WRK_GET = """
wrk.headers["Host"] = "{host}"
"""


def machine_busy() -> float:
    """CPU seconds (all cores) the machine has been busy since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wrk(port: int, path: str, d: Path, duration: float, post: bool, connections: int = 32,
        ours: list[int] | None = None) -> dict:
    """One wrk run; with `ours` (pids of the gateway and the upstream), also the CPU the rest of the
    machine used meanwhile (`foreign`, in cores): other people's work disturbs the measurement."""
    script = d / ("wrk-post.lua" if post else "wrk-get.lua")
    if post:
        script.write_text(WRK_POST.format(host=HOSTNAME, headers="\n".join(
            f'wrk.headers["{k}"] = "{v}"' for k, v in AS_HEADERS.items())))
    else:
        script.write_text(WRK_GET.format(host=HOSTNAME))
    pids = list(ours or [])
    busy0, mine0, t0 = machine_busy(), cpu_seconds(pids), time.monotonic()
    p = subprocess.Popen(["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", "-s", str(script),
                          f"https://127.0.0.1:{port}{path}"], stdout=subprocess.PIPE, text=True)
    wrk_cpu = 0.0
    while p.poll() is None:
        wrk_cpu = max(wrk_cpu, cpu_seconds([p.pid]))
        time.sleep(0.2)
    text = p.stdout.read()
    elapsed = time.monotonic() - t0
    foreign = max(0.0, (machine_busy() - busy0) - (cpu_seconds(pids) - mine0) - wrk_cpu) / elapsed
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text)[1])
    total = int(re.search(r"(\d+) requests in", text)[1])
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors = re.search(r"Socket errors: (.*)", text)
    lat = {}
    for q in ("50%", "99%"):
        m = re.search(rf"{q}\s+([\d.]+)(us|ms|s)", text)
        if m:
            lat[q] = float(m[1]) * {"us": 0.001, "ms": 1, "s": 1000}[m[2]]
    return {"rps": rps, "requests": total, "non2xx": int(non2xx[1]) if non2xx else 0,
            "errors": errors[1] if errors else "", "p50_ms": lat.get("50%"), "p99_ms": lat.get("99%"),
            "foreign": foreign, "wrk_cores": wrk_cpu / elapsed, "raw": text}


FOREIGN_MAX = 0.15  # cores used by other processes during a measurement before it is repeated
RETRIES = 4


def throughput(d: Path, pki: Path, nginx: Proc, mdm_port: int, ex_port: int, duration: float, rounds: int) -> dict:
    mdm_url, ex_url = f"http://127.0.0.1:{mdm_port}", f"https://127.0.0.1:{ex_port}"
    procs: dict[str, Proc] = {}
    try:
        procs["mitmdump"] = Proc("mitmdump", [str(BIN / "mitmdump"), "--mode", f"reverse:{mdm_url}@127.0.0.1:0",
                                              "--set", "flow_detail=0", "--set", f"confdir={d / 'mitmconf'}"])
        for name, argv in (("full-1", ["--full", "--workers", "1"]), ("lean-1", ["--workers", "1"]),
                           ("lean-2", ["--workers", "2"])):
            cfg = gateway_config(d, pki, mdm_url, ex_url, name)
            procs[name] = Proc(name, [str(BIN / "easgate"), "run", str(cfg), *argv])
        ports = {k: p.wait_listening(2 if k == "lean-2" else 1) for k, p in procs.items()}
        cases = [("mitmdump", "bare", "/enroll", False)]
        for name in ("full-1", "lean-1", "lean-2"):
            cases += [(name, "mdm", "/enroll", False), (name, "activesync", AS_PATH, True)]
        # warm-up: TLS sessions, caches, first decisions
        for name, route, path, post in cases:
            r = wrk(ports[name], path, d, 2, post)
            if r["non2xx"] or r["errors"]:
                raise RuntimeError(f"{name} {route}: {r['non2xx']} non-2xx, errors {r['errors']}\n{r['raw']}")
        results: dict[tuple[str, str], list[dict]] = {(n, r): [] for n, r, _, _ in cases}
        for rnd in range(rounds):
            for name, route, path, post in cases:
                pids = procs[name].pids()
                for attempt in range(RETRIES + 1):
                    c0 = cpu_seconds(pids)
                    r = wrk(ports[name], path, d, duration, post, ours=pids + nginx.pids())
                    r["cpu_ms_per_req"] = (cpu_seconds(pids) - c0) * 1000 / max(1, r["requests"])
                    r["retries"] = attempt
                    print(f"  round {rnd + 1}: {name:9} {route:10} {r['rps']:8.0f} req/s  p99 {r['p99_ms']:.1f} ms  "
                          f"{r['cpu_ms_per_req']:.2f} ms CPU/req  wrk {r['wrk_cores']:.2f} cores  "
                          f"other load {r['foreign']:.2f} cores", file=sys.stderr, flush=True)
                    if r["foreign"] <= FOREIGN_MAX:
                        break
                    time.sleep(5)  # somebody else is busy: wait and measure again
                results[(name, route)].append(r)
        out = {}
        for key, runs in results.items():
            out[key] = {"rps": statistics.median(x["rps"] for x in runs),
                        "p99_ms": statistics.median(x["p99_ms"] for x in runs),
                        "cpu_ms_per_req": statistics.median(x["cpu_ms_per_req"] for x in runs),
                        "all_rps": [round(x["rps"]) for x in runs],
                        "foreign": max(x["foreign"] for x in runs),
                        "wrk_cores": statistics.median(x["wrk_cores"] for x in runs),
                        "non2xx": sum(x["non2xx"] for x in runs)}
        return out
    finally:
        for p in procs.values():
            p.stop()


# ------------------------------------------------------------------------------------------------
# Held Pings


HOLD_SERVER = r"""
import asyncio, ssl, sys, time
port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
held = 0
served = 0
async def handle(reader, writer):
    global held, served
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            n = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    n = int(line.split(b":")[1])
            if n:
                await reader.readexactly(n)
            if b"Cmd=Ping" in head.split(b"\r\n", 1)[0]:
                held += 1
                try:
                    await reader.read(1)  # until the gateway goes away
                finally:
                    held -= 1
                return
            served += 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/vnd.ms-sync.wbxml\r\n\r\nok")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()
async def report():
    while True:
        print(f"held {held} served {served}", flush=True)
        await asyncio.sleep(0.5)
async def main():
    ctx = None
    if cert != "-":  # "-": plain HTTP (an http:// pool on a trusted network)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
    srv = await asyncio.start_server(handle, "127.0.0.1", port, ssl=ctx, backlog=4096)
    print("ready", flush=True)
    await report()
asyncio.run(main())
"""


class HoldServer:
    def __init__(self, d: Path, pki: Path, tls: bool = True) -> None:
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        script = d / "hold_server.py"
        script.write_text(HOLD_SERVER)
        cert, key = (str(pki / "exchange.pem"), str(pki / "exchange.key")) if tls else ("-", "-")
        self.proc = subprocess.Popen([PY, str(script), str(self.port), cert, key], stdout=subprocess.PIPE, text=True)
        self.held = 0
        first = self.proc.stdout.readline()
        assert first.strip() == "ready", first
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            m = re.match(r"held (\d+)", line)
            if m:
                self.held = int(m[1])

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


CLIENT_CERT = False  # bench_memory.py --client-cert: the held Pings' phones present the demo iPhone's certificate


def client_ctx(pki: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "public-ca.pem"))
    if CLIENT_CERT:
        ctx.load_cert_chain(str(pki / "device-iphone-bundle.pem"), str(pki / "device-iphone.key"))
    return ctx


def ping_request(i: int) -> bytes:
    path = f"/Microsoft-Server-ActiveSync?Cmd=Ping&User=user{i}&DeviceId=ApplHOLD{i:08d}&DeviceType=iPhone"
    head = f"POST {path} HTTP/1.1\r\nHost: {HOSTNAME}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in AS_HEADERS.items()) + "Content-Length: 4\r\n\r\n"
    return head.encode() + b"\x03\x01\x6a\x00"


async def open_pings(port: int, pki: Path, n: int, held: list) -> int:
    ctx = client_ctx(pki)
    sem = asyncio.Semaphore(100)
    failures = 0

    async def one(i: int) -> None:
        nonlocal failures
        async with sem:
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection(
                    "127.0.0.1", port, ssl=ctx, server_hostname=HOSTNAME), 30)
                w.write(ping_request(i))
                await w.drain()
                held.append((r, w))
            except (TimeoutError, OSError, ssl.SSLError):
                failures += 1

    await asyncio.gather(*(one(i) for i in range(n)))
    return failures


async def probe(port: int, pki: Path, seconds: float) -> dict:
    """Short requests while the Pings are held: 4 keep-alive clients and 1 new-connection client."""
    ctx = client_ctx(pki)
    keep: list[float] = []
    fresh: list[float] = []
    errors = 0
    req = f"GET /enroll HTTP/1.1\r\nHost: {HOSTNAME}\r\n\r\n".encode()
    end = time.monotonic() + seconds

    async def read_response(r) -> None:
        head = await r.readuntil(b"\r\n\r\n")
        n = int(re.search(rb"(?i)content-length:\s*(\d+)", head)[1])
        await r.readexactly(n)

    async def keepalive_client() -> None:
        nonlocal errors
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=HOSTNAME)
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                w.write(req)
                await read_response(r)
                keep.append((time.perf_counter() - t0) * 1000)
            except (OSError, asyncio.IncompleteReadError):
                errors += 1
                r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=HOSTNAME)
            await asyncio.sleep(0.02)
        w.close()

    async def new_connection_client() -> None:
        nonlocal errors
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=HOSTNAME)
                w.write(req)
                await read_response(r)
                fresh.append((time.perf_counter() - t0) * 1000)
                w.close()
            except (OSError, asyncio.IncompleteReadError):
                errors += 1
            await asyncio.sleep(0.05)

    await asyncio.gather(*(keepalive_client() for _ in range(4)), new_connection_client())

    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    return {"keepalive_n": len(keep), "keepalive_p50": pct(keep, 0.5), "keepalive_p99": pct(keep, 0.99),
            "new_n": len(fresh), "new_p50": pct(fresh, 0.5), "new_p99": pct(fresh, 0.99), "errors": errors}


def held_pings(d: Path, pki: Path, mdm_port: int, n: int, workers: int, probe_s: float) -> dict:
    hold = HoldServer(d, pki)
    cfg = gateway_config(d, pki, f"http://127.0.0.1:{mdm_port}", f"https://127.0.0.1:{hold.port}", f"hold-{workers}")
    g = Proc("hold-gateway", [str(BIN / "easgate"), "run", str(cfg), "--workers", str(workers), "--grace", "1"])
    try:
        port = g.wait_listening(workers)
        time.sleep(1)
        # warm up: every worker has served something before the baseline is taken
        base_probe = asyncio.run(probe(port, pki, 3))
        pids = g.pids()
        rss0 = rss_bytes(pids)
        conns: list = []

        async def scenario() -> dict:
            t0 = time.monotonic()
            failures = await open_pings(port, pki, n, conns)
            opened = time.monotonic() - t0
            deadline = time.monotonic() + 120
            while hold.held < n - failures and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
            await asyncio.sleep(2)
            rss1 = rss_bytes(pids)
            held_upstream = hold.held
            under_load = await probe(port, pki, probe_s)
            still_held = hold.held
            for _, w in conns:
                w.close()
            return {"opened_s": opened, "failures": failures, "held": held_upstream, "still_held": still_held,
                    "rss1": rss1, "probe": under_load}

        r = asyncio.run(scenario())
        r.update({"n": n, "workers": workers, "rss0": rss0, "baseline_probe": base_probe,
                  "per_ping_kb": (r["rss1"] - rss0) / max(1, r["held"]) / 1024,
                  "refused_lines": sum("refused" in line for line in g.lines)})
        return r
    finally:
        g.stop()
        hold.stop()


# ------------------------------------------------------------------------------------------------


def machine() -> str:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import mitmproxy.version

    return (f"`nproc` {os.cpu_count()}, {cpu}, Linux {platform.release()}, Python {platform.python_version()}, "
            f"mitmproxy {mitmproxy.version.VERSION}, wrk {subprocess.run(['wrk', '-v'], capture_output=True, text=True).stdout.split()[1] if shutil.which('wrk') else '?'}, "
            f"nginx upstreams, open files limit {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}; "
            f"easgate at {benchlib.commit()}")


def report(tp: dict | None, hp: dict | None, args) -> str:
    out = [f"## Scale: lean master, workers, held Pings (bench/bench_scale.py, {time.strftime('%Y-%m-%d')})", "",
           f"Machine: {machine()}.", ""]
    if tp:
        base = tp[("mitmdump", "bare")]["rps"]
        lean1 = tp[("lean-1", "mdm")]["rps"]
        out += [f"Throughput: wrk -t1 -c32 -d{args.duration:g}s, HTTPS keep-alive, median of {args.rounds} rounds "
                f"(every round in the last column); CPU/req = the gateway processes' CPU time per request; wrk = "
                f"cores the load generator used; other load = the most cores other processes on the machine used "
                f"during a kept round (a round with more than {FOREIGN_MAX} was measured again, up to {RETRIES} "
                f"times).", "",
                "| gateway | route | req/s | vs mitmdump bare | p99 | CPU/req | wrk | other load | rounds |",
                "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        names = {"mitmdump": "stock `mitmdump` reverse proxy", "full-1": "`easgate run --full --workers 1`",
                 "lean-1": "`easgate run --workers 1` (lean)", "lean-2": "`easgate run --workers 2` (lean)"}
        for (name, route), r in tp.items():
            out.append(f"| {names[name]} | {route} | {r['rps']:,.0f} | {r['rps'] / base:.2f}x | {r['p99_ms']:.1f} ms | "
                       f"{r['cpu_ms_per_req']:.2f} ms | {r['wrk_cores']:.2f} | {r['foreign']:.2f} | "
                       f"{', '.join(f'{x:,}' for x in r['all_rps'])} |")
        lean_as = tp[("lean-1", "activesync")]["rps"]
        out += ["",
                f"- Bar 1: `easgate run` (1 worker, all gateway addons, cached ActiveSync decisions) / stock mitmdump "
                f"bare: **{lean_as / base:.2f}x** on the ActiveSync route, {lean1 / base:.2f}x on the MDM route "
                f"(bar: >= 1.5x).",
                f"- Bar 2: 2 workers / 1 worker on the MDM route: **{tp[('lean-2', 'mdm')]['rps'] / lean1:.2f}x** "
                f"(ActiveSync route {tp[('lean-2', 'activesync')]['rps'] / lean_as:.2f}x; bar: >= 1.7x).",
                f"- Lean / full master, same gateway, 1 worker: {lean1 / tp[('full-1', 'mdm')]['rps']:.2f}x (MDM), "
                f"{lean_as / tp[('full-1', 'activesync')]['rps']:.2f}x (ActiveSync).", ""]
    if hp:
        p, b = hp["probe"], hp["baseline_probe"]
        out += [f"Held Pings: `easgate run --workers {hp['workers']}`, {hp['n']:,} TLS connections each sending one "
                f"ActiveSync Ping (distinct devices) to an HTTPS stand-in that holds it.", "",
                "| held upstream | failed to open | opened in | gateway RSS before | with Pings held | per held Ping |",
                "|---:|---:|---:|---:|---:|---:|",
                f"| {hp['held']:,} | {hp['failures']:,} | {hp['opened_s']:.1f} s | {hp['rss0'] / 2**20:.0f} MB | "
                f"{hp['rss1'] / 2**20:.0f} MB | {hp['per_ping_kb']:.0f} KB |", "",
                "Short requests (MDM route) meanwhile, 4 keep-alive clients + 1 client opening a new TLS connection "
                f"per request, {args.probe:g} s:", "",
                "| | keep-alive p50 | keep-alive p99 | new connection p50 | new connection p99 | requests | errors |",
                "|---|---:|---:|---:|---:|---:|---:|",
                f"| idle gateway | {b['keepalive_p50']:.1f} ms | {b['keepalive_p99']:.1f} ms | {b['new_p50']:.1f} ms | "
                f"{b['new_p99']:.1f} ms | {b['keepalive_n'] + b['new_n']} | {b['errors']} |",
                f"| {hp['held']:,} Pings held | {p['keepalive_p50']:.1f} ms | {p['keepalive_p99']:.1f} ms | "
                f"{p['new_p50']:.1f} ms | {p['new_p99']:.1f} ms | {p['keepalive_n'] + p['new_n']} | {p['errors']} |",
                "", f"- Bar 3: {hp['held']:,} Pings held across {hp['workers']} workers (bar: >= 10,000), short requests "
                f"p99 {max(p['keepalive_p99'], p['new_p99']):.1f} ms (bar: < 50 ms), "
                f"{hp['per_ping_kb']:.0f} KB per held Ping; all {hp['still_held']:,} still held after the probe.", ""]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=15, help="seconds per wrk measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pings", type=int, default=10_000)
    ap.add_argument("--hold-workers", type=int, default=2)
    ap.add_argument("--probe", type=float, default=15, help="seconds of short requests while Pings are held")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-hold", action="store_true")
    ap.add_argument("--write", action="store_true", help="append the results to bench/RESULTS.md")
    args = ap.parse_args()
    benchlib.refuse_dirty_write(args.write, "bench_scale")
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            print(f"bench_scale: needs {tool} (apt-get install wrk nginx-light)", file=sys.stderr)
            return 2
    before, after = raise_fd_limit()
    print(f"open files limit: {after} (was {before})", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="easgate-bench-") as tmp:
        d = Path(tmp)
        pki = d / "pki"
        generate_pki(pki)
        nginx, mdm_port, ex_port = start_nginx(d, pki)
        try:
            tp = None if args.skip_throughput else throughput(d, pki, nginx, mdm_port, ex_port, args.duration,
                                                              args.rounds)
            hp = None if args.skip_hold else held_pings(d, pki, mdm_port, args.pings, args.hold_workers, args.probe)
        finally:
            nginx.stop()
    text = report(tp, hp, args)
    print(text)
    if args.write:
        benchlib.append(text, "bench_scale")
    return 0


if __name__ == "__main__":
    sys.exit(main())
