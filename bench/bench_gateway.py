"""What the gateway costs: throughput and latency against bare mitmdump, callouts per 10,000
requests, decision cost against policy size, a bounded soak, and a profile of the request path.

    apt-get install -y wrk                                     # the load generator (HTTPS, Lua)
    .venv/bin/python bench/bench_gateway.py throughput         # bare mitmdump vs easgate, 3 routes
    .venv/bin/python bench/bench_gateway.py callouts           # connector calls per 10,000 requests
    .venv/bin/python bench/bench_gateway.py policy-size        # 10 / 10,000 / 1,000,000 devices
    .venv/bin/python bench/bench_gateway.py soak --minutes 10  # mixed traffic: RSS growth, errors
    .venv/bin/python bench/bench_gateway.py profile            # py-spy on the gateway under load
    .venv/bin/python bench/bench_gateway.py all --write        # everything; append to bench/RESULTS.md

Each command prints a markdown section (machine, date, numbers); `--write` appends it to
bench/RESULTS.md. Everything runs on loopback on this machine: the load generator (wrk -t1, 32
keep-alive HTTPS connections), the upstreams (small asyncio HTTP/1.1 servers in their own
processes, HTTP for the MDM and HTTPS for Exchange, so they are not the bottleneck), the connector
(an asyncio XNC stand-in that counts calls), and the proxies, which are measured one after the other
in alternating rounds (medians over the rounds: the machine is shared).

`profile` needs py-spy in the venv (`.venv/bin/pip install py-spy`; a benchmark tool, not a project
dependency). The held-Ping capacity benchmark is bench/bench_scale.py.

Not a test: nothing here asserts; it reports.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import gc
import json
import os
import platform
import random
import re
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

HOSTNAME = "mail.example.test"
BIN = ROOT / ".venv" / "bin"
PY = str(BIN / "python") if (BIN / "python").exists() else sys.executable
LISTEN_RE = re.compile(r"[Rr]everse proxy to \S+ listening at \[?([0-9.:a-f*]*)\]?:(\d+)")
AUTH = "Basic " + base64.b64encode(b"CONTOSO\\alice:secret").decode()
AS = "/Microsoft-Server-ActiveSync"
AS_HEADERS = {"Host": HOSTNAME, "Authorization": AUTH, "User-Agent": "Apple-iPhone14C2/2008.420",
              "MS-ASProtocolVersion": "16.1", "Content-Type": "application/vnd.ms-sync.wbxml"}
WBXML = "\\3\\1\\106\\0\\0\\69\\92\\79"  # a few bytes of WBXML, as a Lua string


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User+system CPU of the process and its children (a supervisor's workers)."""
    total = 0.0
    try:
        kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        kids = []
    for p in [pid, *kids]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError):
            pass
    return total


def machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import mitmproxy.version

    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split()[1] if shutil.which("wrk") else "-"
    return (f"`nproc` {os.cpu_count()}, {cpu}, Linux {platform.release()}, Python {platform.python_version()}, "
            f"mitmproxy {mitmproxy.version.VERSION}, wrk {wrk_v}; easgate at {benchlib.commit()}")


# ------------------------------------------------------------------------------------------------
# Processes


class Proc:
    """A child process whose output is collected; `port` from mitmproxy's 'listening at' line or
    from a first line 'PORT <n>' (the servers below)."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, errors="replace",
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.lines: list[str] = []
        self.port: int | None = None
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if self.port is None:
                m = LISTEN_RE.search(line) or re.match(r"PORT (\d+)", line)
                if m:
                    self.port = int(m[m.lastindex])

    def wait(self, timeout: float = 60) -> Proc:
        deadline = time.monotonic() + timeout
        while self.port is None:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} did not start:\n" + "\n".join(self.lines[-40:]))
            time.sleep(0.05)
        time.sleep(0.3)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ------------------------------------------------------------------------------------------------
# Fast servers (run as `bench_gateway.py serve KIND ...` in their own processes)

async def _serve(kind: str, cert: str | None, key: str | None) -> None:
    counts: collections.Counter = collections.Counter()
    total = [0]
    mdm_body = b'{"upstream": "mdm", "ok": true}'
    ok = (b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, _, rest = head.partition(b"\r\n")
                length, chunked = 0, False
                for h in rest.split(b"\r\n"):
                    k, _, v = h.partition(b":")
                    k = k.strip().lower()
                    if k == b"content-length":
                        length = int(v)
                    elif k == b"transfer-encoding" and b"chunked" in v.lower():
                        chunked = True
                if length:
                    await reader.readexactly(length)
                elif chunked:
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                        await reader.readexactly(size + 2)
                        if size == 0:
                            break
                target = line.split(b" ")[1]
                total[0] += 1
                if kind == "connector":
                    if target.startswith(b"/stats"):
                        body = json.dumps({"calls": total[0] - 1, "devices": len(counts),
                                           "max_per_device": max(counts.values(), default=0)}).encode()
                        total[0] -= 1
                    else:
                        dev = re.search(rb"[?&]DeviceId=([^&]*)", target)
                        dev = dev[1].decode() if dev else ""
                        counts[dev] += 1
                        result = "Deny" if dev.startswith("ApplNO") else "Allow"
                        body = b'{"result": "%s"}' % result.encode()
                    writer.write(ok % (b"application/json", len(body), body))
                    if target.startswith(b"/stats"):
                        await writer.drain()
                        break
                elif kind == "exchange":
                    writer.write(ok % (b"application/vnd.ms-sync.wbxml", 4, b"\x03\x01\x6a\x00"))
                else:
                    writer.write(ok % (b"application/json", len(mdm_body), mdm_body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    sslctx = None
    if cert:
        sslctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        sslctx.load_cert_chain(cert, key)
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=sslctx, backlog=1024)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def start_server(kind: str, pki: Path | None = None) -> Proc:
    argv = [PY, str(Path(__file__).resolve()), "serve", kind]
    if pki is not None:
        argv += [str(pki / "exchange.pem"), str(pki / "exchange.key")]
    return Proc(kind, argv).wait()


def connector_stats(port: int) -> dict:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


# ------------------------------------------------------------------------------------------------
# Gateways


def write_gateway_config(d: Path, pki: Path, mdm_port: int, ex_port: int, *, connector_port: int | None = None,
                         cache: dict | None = None, inventory_csv: Path | None = None, name: str = "gateway.yaml",
                         audit: bool = True) -> Path:
    policy = {"mode": "block", "deny": {"user_agents": ["*BlackBerry*"]},
              "inventory": [{"device_id": "ApplBENCH0000001", "owner": "alice"}]}
    if inventory_csv is not None:
        policy["inventory_file"] = str(inventory_csv)
    (d / f"{name}.policy.yaml").write_text(yaml.safe_dump(policy))
    auth: dict = {"policy": str(d / f"{name}.policy.yaml"), "cache": cache or {}}
    if connector_port:
        auth["connector"] = {"url": f"http://127.0.0.1:{connector_port}/services/ActiveSync/Authorize",
                             "timeout_ms": 2000}
    cfg = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "tls": {"certificate": str(pki / "gateway-full.pem"),
                "client_certs": {"mode": "optional", "ca": [str(pki / "device-ca.pem"), str(pki / "root-ca.pem")]}},
        "pools": {"exchange": {"servers": [f"https://127.0.0.1:{ex_port}"], "ca": str(pki / "internal-ca.pem"),
                               "sni": "exchange.internal"},
                  "mdm": {"servers": [f"http://127.0.0.1:{mdm_port}"]}},
        "routes": [{"name": "activesync", "priority": 100, "match": {"path_prefix": AS}, "pool": "exchange",
                    "authorize": "activesync"},
                   {"name": "mdm", "priority": 110, "match": "any", "pool": "mdm", "client_cert_header": "NSClientCert"}],
        "authorization": auth,
    }
    if audit:
        cfg["audit_log"] = str(d / f"{name}.audit.jsonl")
    p = d / name
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def start_easgate(cfg: Path, *args: str) -> Proc:
    return Proc("easgate " + " ".join(args), [PY, "-m", "easgate.cli", "run", str(cfg), "--listen", "127.0.0.1:0",
                                              *args]).wait()


def start_script(cfg: Path) -> Proc:
    port = free_port()
    return _wait_port(Proc("mitmdump -s", [str(BIN / "mitmdump"), "-q", "--set", "server=false",
                                           "-s", str(ROOT / "addons" / "gateway.py"),
                                           "--set", f"easgate_config={cfg}",
                                           "--set", f"easgate_listen=127.0.0.1:{port}"]), port)


def start_bare(pki: Path, upstream: str) -> Proc:
    port = free_port()
    return _wait_port(Proc("mitmdump bare", [str(BIN / "mitmdump"), "--mode", f"reverse:{upstream}@127.0.0.1:{port}",
                                             "--certs", f"*={pki / 'gateway-full.pem'}", "-q",
                                             "--set", "ssl_insecure=true", "--set", "flow_detail=0"]), port)


def _wait_port(p: Proc, port: int) -> Proc:
    """-q hides the 'listening at' line: wait for the port to accept (TLS handshake included)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    deadline = time.monotonic() + 30
    while True:
        try:
            with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=2), server_hostname=HOSTNAME):
                break
        except (OSError, ssl.SSLError):
            if time.monotonic() > deadline or p.proc.poll() is not None:
                raise RuntimeError(f"{p.name} did not start:\n" + "\n".join(p.lines))
            time.sleep(0.2)
    p.port = port
    time.sleep(0.3)
    return p


# ------------------------------------------------------------------------------------------------
# wrk

WRK_SCRIPT = """
local headers = {{}}
{headers}
local body = {body}
local method = "{method}"
local base = "{path}"
local rotate = {rotate}
local counter = 0
local threads = {{}}
statuses = {{}}
function setup(thread)
  table.insert(threads, thread)
end
function init(args)
  statuses = {{}}
  math.randomseed(os.time() + os.clock() * 1000000)
  counter = math.random(1, 1000000000)
end
function request()
  local path = base
  if rotate > 0 then
    counter = counter + 1
    path = string.gsub(base, "DEVICE", string.format("%010d", counter % rotate))
  end
  return wrk.format(method, path, headers, body)
end
function response(status, h, b)
  statuses[status] = (statuses[status] or 0) + 1
end
function done(summary, latency, requests)
  local total = {{}}
  for _, t in ipairs(threads) do
    local s = t:get("statuses")
    for k, v in pairs(s) do total[k] = (total[k] or 0) + v end
  end
  local parts = {{}}
  for k, v in pairs(total) do table.insert(parts, k .. "=" .. v) end
  io.write("STATUSES " .. table.concat(parts, ",") .. "\\n")
end
"""


def wrk_script(d: Path, name: str, method: str, path: str, headers: dict, rotate: int = 0) -> Path:
    lua_headers = "\n".join(f'headers["{k}"] = "{v}"' for k, v in headers.items())
    body = f'"{WBXML}"' if method == "POST" else "nil"
    p = d / f"{name}.lua"
    p.write_text(WRK_SCRIPT.format(headers=lua_headers, body=body, method=method, path=path, rotate=rotate))
    return p


def wrk(port: int, script: Path, duration: float, connections: int = 32) -> dict:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--timeout", "10s", "--latency",
                          "-s", str(script), f"https://127.0.0.1:{port}/"],
                         capture_output=True, text=True, timeout=duration + 60)
    text = out.stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not m:
        raise RuntimeError(f"wrk failed: {out.stdout}\n{out.stderr}")
    lat = {}
    for q in ("50%", "99%"):
        mm = re.search(rf"{q}\s+([\d.]+)(us|ms|s)\b", text)
        if mm:
            lat[q] = float(mm[1]) * {"us": 0.001, "ms": 1, "s": 1000}[mm[2]]
    st = re.search(r"STATUSES (\S*)", text)
    statuses = {int(k): int(v) for k, v in (x.split("=") for x in st[1].split(",") if x)} if st and st[1] else {}
    errors = re.search(r"Socket errors: (.*)", text)
    return {"rps": float(m[1]), "requests": int(re.search(r"(\d+) requests in", text)[1]),
            "p50_ms": lat.get("50%"), "p99_ms": lat.get("99%"), "statuses": statuses,
            "socket_errors": errors[1] if errors else ""}


# ------------------------------------------------------------------------------------------------
# 1. Throughput and latency


def bench_throughput(d: Path, pki: Path, duration: float, rounds: int) -> str:
    mdm, ex, conn = start_server("mdm"), start_server("exchange", pki), start_server("connector")
    cached_cfg = write_gateway_config(d, pki, mdm.port, ex.port, connector_port=conn.port, name="cached.yaml")
    uncached_cfg = write_gateway_config(d, pki, mdm.port, ex.port, connector_port=conn.port, name="uncached.yaml",
                                        cache={"max_entries": 0})
    scripts = {
        "mdm": wrk_script(d, "mdm", "GET", "/enroll?device=ios", {"Host": HOSTNAME, "User-Agent": "MDM-Agent/1.0"}),
        "as-cached": wrk_script(d, "as-cached", "POST",
                                f"{AS}?Cmd=Sync&User=alice&DeviceId=ApplBENCH0000001&DeviceType=iPhone", AS_HEADERS),
        # a DeviceId per request (10^9 of them): with the cache off, every request is one callout
        "as-uncached": wrk_script(d, "as-uncached", "POST",
                                  f"{AS}?Cmd=Sync&User=alice&DeviceId=ApplDEVICE&DeviceType=iPhone", AS_HEADERS,
                                  rotate=1_000_000_000),
    }
    procs: dict[str, Proc] = {}
    try:
        procs["bare-mdm"] = start_bare(pki, f"http://127.0.0.1:{mdm.port}")
        procs["bare-exchange"] = start_bare(pki, f"https://127.0.0.1:{ex.port}")
        for cfg, tag in ((cached_cfg, "cached"), (uncached_cfg, "uncached")):
            procs[f"lean-{tag}"] = start_easgate(cfg, "--workers", "1")
            procs[f"full-{tag}"] = start_easgate(cfg, "--workers", "1", "--full")
            procs[f"script-{tag}"] = start_script(cfg)
        procs["lean2-cached"] = start_easgate(cached_cfg)  # `easgate run` as it defaults (one worker per core)
        plan = [  # (route, row label, proc key)
            ("mdm", "bare mitmdump", "bare-mdm"), ("mdm", "easgate run --workers 1", "lean-cached"),
            ("mdm", "easgate run --workers 1 --full", "full-cached"), ("mdm", "mitmdump -s addons/gateway.py", "script-cached"),
            ("mdm", f"easgate run (default: {os.cpu_count()} workers)", "lean2-cached"),
            ("as-cached", "bare mitmdump", "bare-exchange"), ("as-cached", "easgate run --workers 1", "lean-cached"),
            ("as-cached", "easgate run --workers 1 --full", "full-cached"),
            ("as-cached", "mitmdump -s addons/gateway.py", "script-cached"),
            ("as-cached", f"easgate run (default: {os.cpu_count()} workers)", "lean2-cached"),
            ("as-uncached", "bare mitmdump", "bare-exchange"), ("as-uncached", "easgate run --workers 1", "lean-uncached"),
            ("as-uncached", "easgate run --workers 1 --full", "full-uncached"),
            ("as-uncached", "mitmdump -s addons/gateway.py", "script-uncached"),
        ]
        results: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
        for r in range(rounds):
            for route, label, key in (plan if r % 2 == 0 else list(reversed(plan))):
                p = procs[key]
                wrk(p.port, scripts[route], 2)  # warm up: connections, cache, JIT-less Python caches
                calls0 = connector_stats(conn.port)["calls"]
                cpu0 = cpu_seconds(p.pid)
                res = wrk(p.port, scripts[route], duration)
                res["cpu_ms"] = (cpu_seconds(p.pid) - cpu0) * 1000 / max(res["requests"], 1)
                res["callouts"] = connector_stats(conn.port)["calls"] - calls0
                results[(route, label)].append(res)
                print(f"  round {r + 1} {route:12} {label:34} {res['rps']:8.0f} req/s p50 {res['p50_ms']:.2f} ms "
                      f"p99 {res['p99_ms']:.2f} ms cpu {res['cpu_ms']:.2f} ms/req statuses {res['statuses']} "
                      f"callouts {res['callouts']}", file=sys.stderr)
    finally:
        for p in (*procs.values(), mdm, ex, conn):
            p.stop()

    def med(route, label, k):
        return statistics.median(x[k] for x in results[(route, label)])

    titles = {"mdm": "MDM route (GET, HTTP upstream, client-cert header step)",
              "as-cached": "ActiveSync route, cached decision (POST, HTTPS upstream, audit line per request)",
              "as-uncached": "ActiveSync route, uncached: one connector callout per request (cache off, a new DeviceId each request)"}
    out = [f"## Gateway cost: bare mitmdump vs easgate (bench/bench_gateway.py throughput, {time.strftime('%Y-%m-%d')})",
           "", f"Machine: {machine()}.", "",
           f"Load: `wrk -t1 -c32 -d{duration:g}s`, HTTPS with keep-alive to 127.0.0.1, {rounds} alternating rounds "
           "(medians), 2 s warm-up before each. Upstreams: asyncio HTTP/1.1 servers in their own processes (MDM over "
           "HTTP, Exchange over HTTPS); connector: an asyncio XNC stand-in. Bare mitmdump: `mitmdump --mode "
           "reverse:URL@PORT --certs *=gateway-full.pem -q` (upstream certificate not verified: `ssl_insecure`, "
           "which favours it). easgate: the ActiveSync route authorizes (policy file + connector, default TTLs, "
           "audit log on), the MDM route inserts the client-certificate header (none presented here). "
           "CPU is the proxy process's user+system time per request.", ""]
    for route in ("mdm", "as-cached", "as-uncached"):
        labels = [label for r, label, _ in plan if r == route]
        base = med(route, "bare mitmdump", "rps")
        out += [f"**{titles[route]}**", "", "| proxy | req/s | p50 | p99 | CPU/req | vs bare | callouts/req |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for label in labels:
            rps = med(route, label, "rps")
            reqs = sum(x["requests"] for x in results[(route, label)])
            calls = sum(x["callouts"] for x in results[(route, label)])
            bad = collections.Counter()
            for x in results[(route, label)]:
                bad.update({s: n for s, n in x["statuses"].items() if s != 200})
            note = f" (non-200: {dict(bad)})" if bad else ""
            out.append(f"| {label}{note} | {rps:,.0f} | {med(route, label, 'p50_ms'):.2f} ms | "
                       f"{med(route, label, 'p99_ms'):.2f} ms | {med(route, label, 'cpu_ms'):.2f} ms | "
                       f"{rps / base:.2f} | " + ("-" if "bare" in label else f"{calls / reqs:.2f}") + " |")
        out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# 2. Callouts per 10,000 requests


async def _client_run(port: int, pki: Path, requests: list[bytes], connections: int) -> tuple[collections.Counter, float]:
    ctx = ssl.create_default_context(cafile=str(pki / "public-ca.pem"))
    statuses: collections.Counter = collections.Counter()
    queue = collections.deque(requests)

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=HOSTNAME)
        try:
            while queue:
                writer.write(queue.popleft())
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
                if m:
                    await reader.readexactly(int(m[1]))
                statuses[status] += 1
        finally:
            writer.close()

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return statuses, time.monotonic() - t0


def as_request(device: str, user_agent: str = "Apple-iPhone14C2/2008.420", close: bool = False) -> bytes:
    path = f"{AS}?Cmd=Sync&User=alice&DeviceId={device}&DeviceType=iPhone"
    head = (f"POST {path} HTTP/1.1\r\nHost: {HOSTNAME}\r\nAuthorization: {AUTH}\r\nUser-Agent: {user_agent}\r\n"
            + ("Connection: close\r\n" if close else "") +
            "MS-ASProtocolVersion: 16.1\r\nContent-Type: application/vnd.ms-sync.wbxml\r\nContent-Length: 4\r\n\r\n")
    return head.encode() + b"\x03\x01\x6a\x00"


def bench_callouts(d: Path, pki: Path) -> str:
    mdm, ex, conn = start_server("mdm"), start_server("exchange", pki), start_server("connector")
    rng = random.Random(1)
    devices = [f"ApplDEV{i:05d}" for i in range(50)] + [f"ApplNO{i:05d}" for i in range(50)]  # 50 allowed, 50 denied
    reqs = [as_request(dev) for dev in devices for _ in range(100)]
    rng.shuffle(reqs)
    rows = []
    try:
        for label, cache in (("easgate, default TTLs (allow 300 s, deny 30 s)", {}),
                             ("easgate, cache off (`max_entries: 0`): what nginx `auth_request` without caching does", {"max_entries": 0})):
            cfg = write_gateway_config(d, pki, mdm.port, ex.port, connector_port=conn.port, cache=cache,
                                       name=f"callouts-{len(rows)}.yaml")
            g = start_easgate(cfg, "--workers", "1")
            try:
                before = connector_stats(conn.port)
                statuses, secs = asyncio.run(_client_run(g.port, pki, reqs, 32))
                after = connector_stats(conn.port)
            finally:
                g.stop()
            calls = after["calls"] - before["calls"]
            rows.append((label, len(reqs), secs, calls, dict(statuses), after["max_per_device"]))
            print(f"  {label}: {calls} callouts for {len(reqs)} requests in {secs:.1f}s {dict(statuses)}", file=sys.stderr)
    finally:
        for p in (mdm, ex, conn):
            p.stop()
    out = [f"## Callouts per 10,000 ActiveSync requests (bench/bench_gateway.py callouts, {time.strftime('%Y-%m-%d')})",
           "", f"Machine: {machine()}.", "",
           "100 devices (50 the connector allows, 50 it denies), 100 requests each, shuffled, sent over 32 kept-alive "
           "TLS connections to one `easgate run --workers 1` with the connector configured (policy file with no "
           "matching list entry, so every decision is the connector's). The run is shorter than the deny TTL, so "
           "the bound is one callout per device.", "",
           "| gateway | requests | took | callouts | bound | statuses |", "|---|---:|---:|---:|---:|---|"]
    for label, n, secs, calls, statuses, _ in rows:
        bound = "100 (one per device per TTL)" if "default" in label else "10,000"
        out.append(f"| {label} | {n:,} | {secs:.1f} s | {calls:,} | {bound} | {statuses} |")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------
# 3. Decision cost against policy size (in process)


def _one_size(n: int, d: Path) -> dict:
    """In this (fresh) process: load a policy with n inventory devices, time decisions, report RSS."""
    from types import SimpleNamespace

    from easgate.authz.engine import Engine, run_sync
    from easgate.authz.policy import load_policy

    csv = d / f"inventory-{n}.csv"
    if not csv.exists():
        with open(csv, "w") as f:
            f.write("device_id,owner,compliant\n")
            f.writelines(f"ApplINV{i:09d},user{i % 5000},{'true' if i % 10 else 'false'}\n" for i in range(n))
    pol = d / f"policy-{n}.yaml"
    pol.write_text(yaml.safe_dump({"mode": "block", "deny": {"user_agents": ["*BlackBerry*"]},
                                   "allow": {"users": ["CONTOSO\\svc-sync"]}, "inventory_file": str(csv)}))
    gc.collect()
    rss0 = rss_bytes(os.getpid())
    t0 = time.perf_counter()
    policy = load_policy(pol)
    load_s = time.perf_counter() - t0
    gc.collect()
    rss1 = rss_bytes(os.getpid())
    rng = random.Random(7)
    idents = []
    for _ in range(200_000):
        i = rng.randrange(n * 2)  # half of them in the inventory, half unknown
        idents.append(SimpleNamespace(user=f"CONTOSO\\user{i % 5000}", device_id=f"ApplINV{i:09d}", device_type="iPhone",
                                      user_agent="Apple-iPhone14C2/2008.420", error=None))
    decide = Engine(lambda: policy).decide  # what the gateway and the connector run (no cache here)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for ident in idents:
            run_sync(decide(ident))
        times.append((time.perf_counter() - t0) / len(idents))
    per_decision = statistics.median(times)

    # the whole requestheaders path of the gateway's addons, in mitmproxy's test context
    from mitmproxy.addons import proxyserver
    from mitmproxy.test import taddons, tflow

    from easgate.gateway.chain import make_addons

    pki = d / "pki"
    cfg = write_gateway_config(d, pki, 9081, 9443, cache={"max_entries": 0}, name=f"inproc-{n}.yaml", audit=True)
    data = yaml.safe_load(cfg.read_text())
    data["authorization"]["policy"] = str(pol)
    cfg.write_text(yaml.safe_dump(data))
    addons = make_addons()
    gw = addons[0]
    path_times = []
    with taddons.context(proxyserver.Proxyserver(), *addons) as tctx:
        tctx.configure(gw, easgate_config=str(cfg))
        chain = [a for a in gw.addons if hasattr(a, "requestheaders")] + [addons[1]]  # and the final check
        flows = []
        for k in range(20_000):
            i = rng.randrange(n * 2)
            f = tflow.tflow()
            f.request.method = "POST"
            f.request.path = f"{AS}?Cmd=Sync&User=user{i % 5000}&DeviceId=ApplINV{i:09d}&DeviceType=iPhone"
            f.request.host_header = HOSTNAME
            f.request.headers["Authorization"] = "Basic " + base64.b64encode(f"CONTOSO\\user{i % 5000}:pw".encode()).decode()
            f.request.headers["User-Agent"] = "Apple-iPhone14C2/2008.420"
            flows.append(f)

        async def run() -> float:
            t0 = time.perf_counter()
            for f in flows:
                for a in chain:
                    r = a.requestheaders(f)
                    if r is not None:
                        await r
            return (time.perf_counter() - t0) / len(flows)

        for _ in range(3):
            for f in flows:
                f.response = None
                f.metadata.clear()
            path_times.append(asyncio.run(run()))
        allowed = sum(1 for f in flows if f.response is None)
    return {"n": n, "load_s": load_s, "rss_mb": (rss1 - rss0) / 2**20, "total_rss_mb": rss_bytes(os.getpid()) / 2**20,
            "evaluate_us": per_decision * 1e6, "path_us": statistics.median(path_times) * 1e6, "allowed": allowed,
            "flows": len(flows)}


def bench_policy_size(d: Path, pki: Path) -> str:
    from easgate.tools.pki import generate_pki

    if not (d / "pki" / "gateway-full.pem").exists():
        generate_pki(d / "pki")
    rows = []
    for n in (10, 10_000, 1_000_000):
        out = subprocess.run([PY, str(Path(__file__).resolve()), "_one-size", str(n), str(d)], capture_output=True,
                             text=True, timeout=1800)
        if out.returncode != 0:
            raise RuntimeError(out.stderr)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  {rows[-1]}", file=sys.stderr)
    small, big = rows[0], rows[-1]
    out = [f"## Decision cost against policy size (bench/bench_gateway.py policy-size, {time.strftime('%Y-%m-%d')})", "",
           f"Machine: {machine()}.", "",
           "In process, one fresh interpreter per size. Inventory from a CSV `inventory_file` (`device_id,owner,compliant`, "
           "one device in ten non-compliant), plus a deny glob and an allow user. The engine's decision (authz.engine, no cache): 200,000 identities, "
           "half of them in the inventory, median of 5 passes. Whole path: the gateway's `requestheaders` hooks "
           "(TlsOffload, header strip, ContentSwitch, client-cert header, ActiveSyncGate with the cache off, audit "
           "line to a file, then FinalCheck) on 20,000 prepared `tflow` flows in mitmproxy's test context, median of 3 passes.", "",
           "| devices | policy load | RSS for the policy | the engine's decision | whole requestheaders path | allowed |",
           "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['n']:,} | {r['load_s']:.2f} s | {r['rss_mb']:.1f} MB | {r['evaluate_us']:.2f} µs | "
                   f"{r['path_us']:.1f} µs | {r['allowed'] / r['flows']:.0%} |")
    out += ["", f"1,000,000 vs 10 devices, per decision: the engine's decision {big['evaluate_us'] / small['evaluate_us']:.2f}x, "
            f"whole path {big['path_us'] / small['path_us']:.2f}x (target at most 1.2x). The 1,000,000-device "
            f"policy holds {big['rss_mb']:.0f} MB (process RSS {big['total_rss_mb']:.0f} MB); loading it takes "
            f"{big['load_s']:.1f} s, and a reload runs on the event loop, so every request waits that long while a "
            "changed inventory file is read.", ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# 4. Soak


def bench_soak(d: Path, pki: Path, minutes: float) -> str:
    mdm, ex, conn = start_server("mdm"), start_server("exchange", pki), start_server("connector")
    cfg = write_gateway_config(d, pki, mdm.port, ex.port, connector_port=conn.port, name="soak.yaml",
                               cache={"max_entries": 20_000})
    g = start_easgate(cfg, "--workers", "1")
    seconds = minutes * 60
    scripts = [  # four wrk processes side by side, 8 connections each: the mix
        wrk_script(d, "soak-mdm", "GET", "/enroll?x=1", {"Host": HOSTNAME}),
        wrk_script(d, "soak-cached", "POST", f"{AS}?Cmd=Sync&User=alice&DeviceId=ApplBENCH0000001&DeviceType=iPhone",
                   AS_HEADERS),
        wrk_script(d, "soak-denied", "POST", f"{AS}?Cmd=Ping&User=alice&DeviceId=ApplNODEVICE&DeviceType=iPhone",
                   AS_HEADERS, rotate=500),
        # new devices all the time: callouts, cache inserts and LRU evictions past 20,000 entries
        wrk_script(d, "soak-new", "POST", f"{AS}?Cmd=FolderSync&User=alice&DeviceId=ApplDEVICE&DeviceType=iPhone",
                   AS_HEADERS, rotate=1_000_000_000),
    ]
    samples: list[tuple[float, int]] = []
    churn = {"ok": 0, "errors": 0}
    stop = threading.Event()

    def sampler() -> None:
        t0 = time.monotonic()
        while not stop.is_set():
            samples.append((time.monotonic() - t0, rss_bytes(g.pid)))
            stop.wait(5)

    def churner() -> None:  # a new TLS connection per request, ~10/s: connection setup and teardown
        ctx = ssl.create_default_context(cafile=str(pki / "public-ca.pem"))
        while not stop.is_set():
            try:
                with ctx.wrap_socket(socket.create_connection(("127.0.0.1", g.port), timeout=10),
                                     server_hostname=HOSTNAME) as s:
                    s.sendall(as_request("ApplBENCH0000001", close=True))
                    data = b""
                    while chunk := s.recv(65536):
                        data += chunk
                churn["ok" if data.startswith(b"HTTP/1.1 200") else "errors"] += 1
            except OSError:
                churn["errors"] += 1
            stop.wait(0.1)

    threads = [threading.Thread(target=sampler), threading.Thread(target=churner)]
    for t in threads:
        t.start()
    cpu0 = cpu_seconds(g.pid)
    try:
        procs = [subprocess.Popen(["wrk", "-t1", "-c8", f"-d{seconds:g}s", "--timeout", "10s", "--latency", "-s",
                                   str(s), f"https://127.0.0.1:{g.port}/"], stdout=subprocess.PIPE, text=True)
                 for s in scripts]
        outs = [p.communicate(timeout=seconds + 120)[0] for p in procs]
    finally:
        stop.set()
        for t in threads:
            t.join()
    cpu = cpu_seconds(g.pid) - cpu0
    g.stop()
    for p in (mdm, ex, conn):
        p.stop()
    results = []
    for name, text in zip(("MDM GET", "ActiveSync, cached allow", "ActiveSync, denied (500 devices)",
                           "ActiveSync, a new device each request"), outs):
        m = re.search(r"(\d+) requests in", text)
        st = re.search(r"STATUSES (\S*)", text)
        errs = re.search(r"Socket errors: (.*)", text)
        p99 = re.search(r"99%\s+([\d.]+\w+)", text)
        results.append((name, int(m[1]) if m else 0, st[1] if st else "?", errs[1] if errs else "none",
                        p99[1] if p99 else "?"))
    tracebacks = sum("Traceback" in l or "has crashed" in l for l in g.lines)
    errors_logged = [l for l in g.lines if " error" in l.lower() and "easgate" in l.lower()]
    rss = [r for _, r in samples]
    first_min = [r for t, r in samples if t >= 60][:1] or rss[:1]
    out = [f"## Soak: {minutes:g} minutes of mixed traffic (bench/bench_gateway.py soak, {time.strftime('%Y-%m-%d')})",
           "", f"Machine: {machine()}.", "",
           f"One `easgate run --workers 1` (policy + connector, cache bounded at 20,000 entries, audit log on). Four "
           f"`wrk -t1 -c8` side by side for {seconds:g} s, plus one client opening a new TLS connection per request "
           "about ten times a second. RSS sampled every 5 s.", "",
           "| traffic | requests | statuses | socket errors | p99 |", "|---|---:|---|---|---:|"]
    for name, n, st, errs, p99 in results:
        out.append(f"| {name} | {n:,} | {st} | {errs} | {p99} |")
    out.append(f"| new TLS connection per request | {churn['ok'] + churn['errors']:,} | 200={churn['ok']} | "
               f"{churn['errors']} failed | |")
    total = sum(n for _, n, *_ in results) + churn["ok"]
    out += ["", f"RSS: {rss[0] / 2**20:.0f} MB at start, {first_min[0] / 2**20:.0f} MB after 1 min, "
            f"{rss[-1] / 2**20:.0f} MB at the end, {max(rss) / 2**20:.0f} MB peak; growth after the first minute "
            f"{(rss[-1] - first_min[0]) / 2**20:+.1f} MB over {total:,} requests. Gateway CPU {cpu:.0f} s "
            f"({cpu * 1000 / max(total, 1):.2f} ms per request). Tracebacks in the gateway log: {tracebacks}; "
            f"easgate error lines: {len(errors_logged)}.", "",
            "RSS over time (MB, every minute): " + ", ".join(f"{r / 2**20:.0f}" for t, r in samples if int(t) % 60 < 5),
            ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# 5. Profile


def bench_profile(d: Path, pki: Path, seconds: float, keep: str | None = None) -> str:
    pyspy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if not pyspy:
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    mdm, ex, conn = start_server("mdm"), start_server("exchange", pki), start_server("connector")
    cfg = write_gateway_config(d, pki, mdm.port, ex.port, connector_port=conn.port, name="profile.yaml")
    sections = []
    try:
        for scenario, script in (
            ("ActiveSync route, cached decision", wrk_script(d, "prof-as", "POST",
                                                             f"{AS}?Cmd=Sync&User=alice&DeviceId=ApplBENCH0000001&DeviceType=iPhone",
                                                             AS_HEADERS)),
            ("MDM route", wrk_script(d, "prof-mdm", "GET", "/enroll?x=1", {"Host": HOSTNAME})),
        ):
            g = start_easgate(cfg, "--workers", "1")
            try:
                wrk(g.port, script, 2)
                raw = (Path(keep) if keep else d) / f"profile-{'as' if 'ActiveSync' in scenario else 'mdm'}.txt"
                spy = subprocess.Popen([pyspy, "record", "--pid", str(g.pid), "--rate", "250", "--duration",
                                        str(int(seconds)), "--format", "raw", "--output", str(raw), "--nonblocking"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                time.sleep(0.5)
                res = wrk(g.port, script, seconds - 1)
                spy.wait(seconds + 60)
            finally:
                g.stop()
            sections.append((scenario, res, summarize_profile(raw)))
    finally:
        for p in (mdm, ex, conn):
            p.stop()
    out = [f"## Profile of the request path (bench/bench_gateway.py profile, {time.strftime('%Y-%m-%d')})", "",
           f"Machine: {machine()}.", "",
           f"py-spy 250 Hz on one `easgate run --workers 1` process for {seconds:g} s under `wrk -t1 -c32` "
           "(HTTPS keep-alive). Self: samples whose innermost frame is the function; inclusive: samples with the "
           "function anywhere on the stack. Idle samples (the event loop waiting in epoll) are left out of the "
           "percentages.", ""]
    for scenario, res, (busy, idle, selfs, incl, groups) in sections:
        out += [f"**{scenario}**: {res['rps']:,.0f} req/s; {busy:,} busy samples, {idle / (busy + idle):.0%} idle.", "",
                "Where the time goes (each sample counted once, for the innermost frame that belongs to an area):", "",
                "| area | share of busy samples |", "|---|---:|"]
        out += [f"| {k} | {v / busy:.1%} |" for k, v in groups.most_common()]
        out += ["", "| top self time | share |  | top inclusive, easgate hooks | share |", "|---|---:|---|---|---:|"]
        ea = [(k, v) for k, v in incl.most_common()
              if "easgate/" in k and not any(x in k for x in ("easgate/cli.py", "run_master", "FastAddonManager"))][:15]
        for (k1, v1), (k2, v2) in zip(selfs.most_common(15), ea + [("", 0)] * (15 - len(ea))):
            out.append(f"| `{k1}` | {v1 / busy:.1%} | | `{k2}` | {v2 / busy:.1%} |" if k2 else
                       f"| `{k1}` | {v1 / busy:.1%} | | | |")
        out.append("")
    return "\n".join(out)


AREAS = [  # (area, substrings of "function (file:line)"); a sample goes to the area of its innermost matching frame
    ("socket send/recv (syscalls: loopback TCP)", ("_SelectorSocketTransport.write", "_SelectorSocketTransport._read_ready",
                                                   "_SelectorSocketTransport._write_ready", "sock_recv", "sock_send")),
    ("TLS (OpenSSL via pyOpenSSL, ssl)", ("OpenSSL/", "(ssl.py", "/ssl.py", "sslproto.py", "layers/tls.py")),
    ("HTTP/1 parsing and serialisation (mitmproxy, h11)", ("layers/http/_http1", "net/http/", "h11/")),
    ("easgate: ActiveSyncGate (decide, enforce, cache)", ("easgate/authz.py", "easgate/cache.py", "easgate/decision.py",
                                                          "easgate/policy.py", "easgate/connector.py")),
    ("easgate: identity parser (activesync.py)", ("easgate/activesync.py",)),
    ("easgate: audit log", ("easgate/audit.py",)),
    ("easgate: routing, pools, header strip/insert", ("easgate/gateway.py", "easgate/routing.py", "easgate/config.py",
                                                      "easgate/certheader.py")),
    ("easgate: TLS offload verdicts", ("easgate/tls.py", "easgate/revocation.py")),
    ("easgate: other addons (connections, flow limit, metrics, web annotations, ...)",
     ("easgate/workers.py", "easgate/flowlimit.py", "easgate/metrics.py", "easgate/capture.py", "easgate/replay.py",
      "easgate/proxyproto.py", "easgate/contentview.py", "easgate/web")),
    ("addon dispatch (hook calls)", ("easgate/lean.py", "addonmanager.py", "mitmproxy/hooks.py")),
    ("mitmproxy: flow, request and header objects, utils", ("mitmproxy/http.py", "mitmproxy/flow.py", "mitmproxy/coretypes/",
                                                     "mitmproxy/connection.py", "mitmproxy/utils/")),
    ("mitmproxy: proxy layers, events, connection handler", ("mitmproxy/proxy/",)),
    ("logging", ("logging/",)),
    ("asyncio event loop (scheduling, tasks)", ("asyncio/",)),
]


def area_of(frames: list[str]) -> str:
    for f in reversed(frames):
        for area, subs in AREAS:
            if any(sub in f for sub in subs):
                return area
    return "other"


def summarize_profile(raw: Path):
    selfs: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    groups: collections.Counter = collections.Counter()
    busy = idle = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        if frames[-1].startswith(("select (selectors.py", "EpollSelector.select", "poll (selectors.py")):
            idle += n
            continue
        busy += n
        selfs[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
        groups[area_of(frames)] += n
    return busy, idle, selfs, incl, groups


def _short(frame: str) -> str:
    m = re.match(r"(.*) \((.*?):(\d+)\)$", frame)
    if not m:
        return frame
    fn, path = m[1], m[2]
    path = re.sub(r".*/site-packages/", "", path)
    path = re.sub(r".*/(addons/easgate/)", r"easgate/", path)
    path = re.sub(r".*/lib/python3\.\d+/", "", path)
    return f"{fn} ({path})"


# ------------------------------------------------------------------------------------------------


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        asyncio.run(_serve(sys.argv[2], *(sys.argv[3:5] or [None, None])))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "_one-size":
        print(json.dumps(_one_size(int(sys.argv[2]), Path(sys.argv[3]))))
        return 0
    # SIGTERM (timeout, kill) runs the finally blocks too, so no gateway or upstream is left behind
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["throughput", "callouts", "policy-size", "soak", "profile", "all"])
    ap.add_argument("--duration", type=float, default=10, help="seconds per throughput measurement (default 10)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--minutes", type=float, default=10, help="soak duration in minutes (default 10)")
    ap.add_argument("--profile-seconds", type=float, default=20)
    ap.add_argument("--profile-out", help="keep py-spy's raw (collapsed) stacks in this directory")
    ap.add_argument("--write", action="store_true", help="append the results to bench/RESULTS.md")
    args = ap.parse_args()
    benchlib.refuse_dirty_write(args.write, "bench_gateway")
    if not shutil.which("wrk") and args.what in ("throughput", "soak", "profile", "all"):
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    from easgate.tools.pki import generate_pki

    sections = []
    with tempfile.TemporaryDirectory(prefix="easgate-bench-") as tmp:
        d = Path(tmp)
        pki = d / "pki"
        generate_pki(pki)
        todo = ["throughput", "callouts", "policy-size", "profile", "soak"] if args.what == "all" else [args.what]
        for what in todo:
            print(f"== {what}", file=sys.stderr)
            if what == "throughput":
                sections.append(bench_throughput(d, pki, args.duration, args.rounds))
            elif what == "callouts":
                sections.append(bench_callouts(d, pki))
            elif what == "policy-size":
                sections.append(bench_policy_size(d, pki))
            elif what == "soak":
                sections.append(bench_soak(d, pki, args.minutes))
            elif what == "profile":
                sections.append(bench_profile(d, pki, args.profile_seconds, args.profile_out))
            print(sections[-1])
            if args.write:
                benchlib.append(sections[-1], "bench_gateway")
    return 0


if __name__ == "__main__":
    sys.exit(main())
