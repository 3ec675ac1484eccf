"""Everything issue 18 asks, side by side in one run: nginx doing the same job, bare mitmdump, the lean
master without easgate's addons, easgate with 1 and 2 workers.

    apt-get install -y wrk nginx-light openssl
    .venv/bin/python bench/bench_all.py                    # ~13 min on 2 cores; prints markdown
    .venv/bin/python bench/bench_all.py --write            # and appends it to bench/RESULTS.md (clean tree only)
    .venv/bin/python bench/bench_all.py --smoke            # tiny durations: proves it runs (~2 min), numbers meaningless

Contenders (all HTTPS on 127.0.0.1, the demo PKI's gateway certificate, nginx upstreams as in
bench_scale.py: an HTTP MDM and an HTTPS Exchange):

* `nginx`: one worker doing the gateway's job: TLS offload with an optional client certificate
  (device CA), `/Microsoft-Server-ActiveSync` to Exchange over verified HTTPS, the rest to the MDM
  with `NSClientCert: $ssl_client_escaped_cert`, kept-alive upstream connections, session tickets.
* `mitmdump`: stock mitmdump as a bare reverse proxy (one instance per upstream: it can't route;
  `ssl_insecure`, the Exchange certificate is not verified, which favours it).
* `lean-bare`: easgate's lean master without easgate's addons (bench/lean_bare.py), one per upstream,
  mitmproxy's TlsConfig serving the certificate, also `ssl_insecure`.
* `easgate-1`, `easgate-2`: `easgate run --workers 1|2` with the ActiveSync route authorized
  (policy file, decision cache, audit line) and the MDM route with the client-certificate header.

Variants of `lean-bare` and `easgate-N` (any combination, e.g. `easgate-1@abc1234+uvloop`):

* `@REF`: that commit's code (a `git worktree` of REF in the run's temporary directory, its
  `addons/` first on PYTHONPATH), e.g. the commit before a change, side by side with this tree.
* `+uvloop`: on uvloop's event loop (`EASGATE_EVENT_LOOP=uvloop`; `pip install uvloop` in the venv).
* `+py3.13`: under Python 3.13, from the venv named by `--py313-venv` (default `.venv-py3.13`:
  `~/.pyenv/versions/3.13.0/bin/python -m venv .venv-py3.13 && .venv-py3.13/bin/pip install -c
  constraints.txt -e .`).

easgate's own share of CPU per request is each `easgate-1` variant against the `lean-bare` with the
same `@REF`/`+` suffixes: `--contenders lean-bare easgate-1 lean-bare+uvloop easgate-1+uvloop
easgate-1@abc1234 --skip handshakes resumption memory` is the request-path comparison alone.

Modes (each contender idle while another is measured; rounds alternate; medians):

1. `keepalive`: wrk -t1 -c32, MDM GET and cached ActiveSync POST: CPU seconds of the contender's
   processes per 1,000 requests, req/s.
2. `handshakes`: `openssl s_time` clients (blocking, one handshake at a time each: no client spins
   on pending handshakes), new TLS connection per request (`-new`, full handshakes) and resumed
   ones (`-reuse`), TLS 1.2 and 1.3: connections/s and the contender's CPU per 1,000 connections;
   for nginx and easgate-1 also with an RSA-2048 gateway certificate instead of ECDSA P-256. The
   clients' own CPU per connection is reported too: it bounds what 2 workers can gain on 2 cores
   (`--pin-clients CPUS` runs them under taskset).
3. `resumption`: one full handshake with `openssl s_client -sess_out`, then 20 reconnects with
   `-sess_in`: how many resumed (TLS 1.2 and 1.3).
4. `memory`: N held ActiveSync Pings (an HTTPS upstream that holds each Ping): RSS per held Ping.
5. `breakdown`: for each `easgate-1` variant of this Python (this tree, `@REF`), where a held Ping's
   memory goes (bench_memory.py: RSS, malloc in use, after malloc_trim, tracemalloc by owner, live
   objects), side by side: `--contenders lean-bare easgate-1@REF easgate-1` shows a change's effect.

Not a test: nothing here asserts; it reports.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_memory as bm  # noqa: E402  (where a held Ping's memory goes)
import bench_scale as bs  # noqa: E402
import benchlib  # noqa: E402  (the processes, nginx upstreams, wrk and held-Ping helpers)
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402

from easgate.gateway.connections import raise_fd_limit  # noqa: E402
from easgate.tools.pki import generate_pki  # noqa: E402

ROOT = bs.ROOT
HOSTNAME = bs.HOSTNAME
MDM_PATH = "/enroll"

NGINX_GW = """
worker_processes 1;
daemon off;
pid {d}/nginx-gw.pid;
error_log {d}/nginx-gw-error.log warn;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 3660s;
    client_body_temp_path {d}/gw-body;
    proxy_temp_path {d}/gw-proxy;
    fastcgi_temp_path {d}/gw-fastcgi;
    uwsgi_temp_path {d}/gw-uwsgi;
    scgi_temp_path {d}/gw-scgi;
    upstream mdm {{ server 127.0.0.1:{mdm}; keepalive 64; }}
    upstream exchange {{ server 127.0.0.1:{exchange}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} ssl reuseport;
        ssl_certificate {cert};
        ssl_certificate_key {cert};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_verify_client optional;
        ssl_client_certificate {pki}/device-cas.pem;
        ssl_session_tickets on;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_read_timeout 3660s;
        location /Microsoft-Server-ActiveSync {{
            proxy_pass https://exchange;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {pki}/internal-ca.pem;
            proxy_ssl_name exchange.internal;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
        }}
        location / {{
            proxy_set_header NSClientCert $ssl_client_escaped_cert;
            proxy_pass http://mdm;
        }}
    }}
}}
"""


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def rsa_gateway(pki: Path) -> Path:
    """The demo gateway certificate again, with an RSA-2048 key (same names, same CA)."""
    full = (pki / "gateway-full.pem").read_bytes()
    certs = x509.load_pem_x509_certificates(full)
    ca_key = serialization.load_pem_private_key((pki / "public-ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((pki / "public-ca.pem").read_bytes())
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf = certs[0]
    b = (x509.CertificateBuilder().subject_name(leaf.subject).issuer_name(ca.subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(leaf.not_valid_before_utc)
         .not_valid_after(leaf.not_valid_after_utc))
    for ext in leaf.extensions:
        if isinstance(ext.value, x509.KeyUsage):
            ku = ext.value
            b = b.add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), ext.critical) \
                if ku.digital_signature else b.add_extension(ku, ext.critical)
        elif isinstance(ext.value, x509.SubjectKeyIdentifier):
            b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), ext.critical)
        else:
            b = b.add_extension(ext.value, ext.critical)
    cert = b.sign(ca_key, hashes.SHA256())
    out = pki / "gateway-rsa-full.pem"
    out.write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                    + b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs[1:])
                    + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    out.chmod(0o600)
    return out


class Variant:
    """What a contender name asks for: `base[@REF][+uvloop][+py3.13]`."""

    def __init__(self, name: str) -> None:
        head, *flags = name.split("+")
        self.base, _, self.ref = head.partition("@")
        self.uvloop = "uvloop" in flags
        self.py313 = "py3.13" in flags
        unknown = set(flags) - {"uvloop", "py3.13"}
        if unknown:
            raise SystemExit(f"bench_all: unknown variant {'+'.join(sorted(unknown))} in {name}")
        self.suffix = name[len(self.base):]  # what a lean-bare of the same kind carries

    def env(self, worktrees: dict[str, Path]) -> dict[str, str]:
        env = {}
        if self.uvloop:
            env["EASGATE_EVENT_LOOP"] = "uvloop"
        if self.ref:
            env["PYTHONPATH"] = str(worktrees[self.ref] / "addons")
        return env

    def root(self, worktrees: dict[str, Path]) -> Path:
        return worktrees[self.ref] if self.ref else ROOT

    def bin(self, py313: Path) -> Path:
        return py313 / "bin" if self.py313 else bs.BIN


class Contender:
    """One thing under test: its processes and the ports of its MDM and ActiveSync routes."""

    def __init__(self, name: str, procs: list[bs.Proc], mdm_port: int, as_port: int) -> None:
        self.name, self.procs, self.mdm_port, self.as_port = name, procs, mdm_port, as_port

    def pids(self) -> list[int]:
        return [p for proc in self.procs for p in proc.pids()]

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


WORKTREES: dict[str, Path] = {}  # REF -> a worktree of it (made by main())
PY313 = ROOT / ".venv-py3.13"


def start_contenders(d: Path, pki: Path, mdm: int, exchange: int, cert: Path, names: list[str]) -> dict[str, Contender]:
    out: dict[str, Contender] = {}
    mdm_url, ex_url = f"http://127.0.0.1:{mdm}", f"https://127.0.0.1:{exchange}"
    tag = cert.stem
    for name in names:
        v = Variant(name)
        env, bindir, root = v.env(WORKTREES), v.bin(PY313), v.root(WORKTREES)
        ctag = re.sub(r"[^A-Za-z0-9.-]", "_", f"{name}-{tag}")
        if name == "nginx":
            port = bs.free_port()
            conf = d / f"nginx-gw-{tag}.conf"
            conf.write_text(NGINX_GW.format(d=d, mdm=mdm, exchange=exchange, port=port, cert=cert, pki=pki))
            p = bs.Proc("nginx-gw", [shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(conf), "-p", str(d)])
            wait_port(port)
            out[name] = Contender(name, [p], port, port)
        elif v.base in ("mitmdump", "lean-bare"):
            procs = []
            for up in (mdm_url, ex_url):
                argv = ([str(bindir / "mitmdump"), "--set", "flow_detail=0"] if v.base == "mitmdump"
                        else [str(bindir / "python"), str(root / "bench" / "lean_bare.py")])
                argv += ["--mode", f"reverse:{up}@127.0.0.1:0", "--certs", f"*={cert}", "--set", "ssl_insecure=true",
                         "--set", f"confdir={d / ('conf-' + ctag)}"]
                procs.append(bs.Proc(name, argv, env=env))
            ports = [p.wait_listening(1) for p in procs]
            out[name] = Contender(name, procs, ports[0], ports[1])
        else:  # easgate-N
            workers = v.base.split("-")[1]
            cfg = bs.gateway_config(d, pki, mdm_url, ex_url, ctag)
            text = cfg.read_text().replace(str(pki / "gateway-full.pem"), str(cert))
            cfg.write_text(text)
            p = bs.Proc(name, [str(bindir / "python"), "-m", "easgate.cli", "run", str(cfg), "--workers", workers,
                               "--grace", "1"], env=env)
            port = p.wait_listening(int(workers))
            out[name] = Contender(name, [p], port, port)
    return out


def wait_port(port: int, timeout: float = 15) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {port}")
            time.sleep(0.05)


# ------------------------------------------------------------------------------------------------
# 1. keep-alive CPU per request


def keepalive(cs: dict[str, Contender], d: Path, duration: float, rounds: int) -> dict:
    cases = [(n, route) for n in cs for route in ("mdm", "activesync")]
    runs: dict[tuple, list] = {c: [] for c in cases}
    for name, route in cases:  # warm-up
        c = cs[name]
        bs.wrk(c.mdm_port if route == "mdm" else c.as_port, MDM_PATH if route == "mdm" else bs.AS_PATH, d,
               min(2, duration), route == "activesync")
    for _ in range(rounds):
        for name, route in cases:
            c = cs[name]
            pids = c.pids()
            c0 = bs.cpu_seconds(pids)
            r = bs.wrk(c.mdm_port if route == "mdm" else c.as_port, MDM_PATH if route == "mdm" else bs.AS_PATH, d,
                       duration, route == "activesync", ours=pids)
            r["cpu_per_1k"] = (bs.cpu_seconds(pids) - c0) * 1000 / max(1, r["requests"])
            runs[(name, route)].append(r)
            print(f"  keepalive {name:10} {route:10} {r['rps']:8.0f} req/s {r['cpu_per_1k']:.3f} s CPU/1k "
                  f"other load {r['foreign']:.2f}", file=sys.stderr, flush=True)
    return {k: {"rps": statistics.median(x["rps"] for x in v), "cpu_per_1k": statistics.median(x["cpu_per_1k"] for x in v),
                "errors": sum(x["non2xx"] for x in v), "foreign": max(x["foreign"] for x in v)} for k, v in runs.items()}


# ------------------------------------------------------------------------------------------------
# 2. handshakes with openssl s_time


PIN_CLIENTS = ""  # --pin-clients: the CPUs (taskset -c) the openssl s_time clients run on
CLIENT_CPU: dict[str, list[float]] = {}  # contender -> the clients' own CPU seconds per connection


def s_time(port: int, pki: Path, seconds: float, mode: str, version: str, clients: int, name: str = "") -> int:
    """Connections completed by `clients` parallel `openssl s_time` processes in `seconds` (their own
    CPU per connection goes to CLIENT_CPU[name])."""
    argv = ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-CAfile",
            str(pki / "public-ca.pem"), f"-{version}", f"-{mode}", "-time", str(max(1, int(seconds))),
            "-www", MDM_PATH]
    if PIN_CLIENTS:
        argv = ["taskset", "-c", PIN_CLIENTS, *argv]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(clients)]
    total = 0
    for p in procs:
        out = p.communicate()[0]
        m = re.search(r"(\d+) connections in [\d.]+s", out)
        total += int(m[1]) if m else 0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if name and total:
        cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
        CLIENT_CPU.setdefault(name, []).append(cpu / total)
    return total


def handshakes(sets: dict[str, dict[str, Contender]], pki: Path, seconds: float, rounds: int, clients: int) -> dict:
    results: dict[tuple, list] = {}
    for _ in range(rounds):
        for cert, cs in sets.items():
            for name, c in cs.items():
                for version in ("tls1_2", "tls1_3"):
                    for mode in ("new", "reuse"):
                        if cert != "ecdsa" and (version, mode) != ("tls1_3", "new"):
                            continue  # the certificate only matters for full handshakes
                        pids = c.pids()
                        c0, t0 = bs.cpu_seconds(pids), time.monotonic()
                        n = s_time(c.mdm_port, pki, seconds, mode, version, clients,
                                   name if (cert, version, mode) == ("ecdsa", "tls1_3", "new") else "")
                        el = time.monotonic() - t0
                        cpu = bs.cpu_seconds(pids) - c0
                        results.setdefault((name, cert, version, mode), []).append(
                            {"cps": n / el, "cpu_per_1k": cpu * 1000 / max(1, n)})
                        print(f"  handshakes {name:10} {cert:5} {version} {mode:5} {n / el:7.0f}/s "
                              f"{cpu * 1000 / max(1, n):.2f} s CPU/1k", file=sys.stderr, flush=True)
    return {k: {"cps": statistics.median(x["cps"] for x in v), "cpu_per_1k": statistics.median(x["cpu_per_1k"] for x in v)}
            for k, v in results.items()}


# ------------------------------------------------------------------------------------------------
# 3. resumption with openssl s_client


def resumptions(port: int, pki: Path, version: str, d: Path, n: int = 20) -> int:
    sess = d / f"sess-{port}-{version}.pem"
    base = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", HOSTNAME, "-CAfile",
            str(pki / "public-ca.pem"), f"-{version}", "-ign_eof"]
    req = f"GET {MDM_PATH} HTTP/1.1\r\nHost: {HOSTNAME}\r\nConnection: close\r\n\r\n"
    subprocess.run(base + ["-sess_out", str(sess)], input=req, capture_output=True, text=True, timeout=30)
    ok = 0
    for _ in range(n):
        p = subprocess.run(base + ["-sess_in", str(sess)], input=req, capture_output=True, text=True, timeout=30)
        ok += "Reused," in p.stdout
    return ok


# ------------------------------------------------------------------------------------------------
# 4. memory per held Ping


def held_memory(c: Contender, pki: Path, n: int, hold: bs.HoldServer) -> dict:
    pids = c.pids()
    asyncio.run(bs.probe(c.mdm_port, pki, 1))  # warm: every process has served something
    rss0 = bs.rss_bytes(pids)
    base_held = hold.held
    conns: list = []

    async def go() -> tuple[int, int]:
        failures = await bs.open_pings(c.as_port, pki, n, conns)
        deadline = time.monotonic() + 120
        while hold.held - base_held < n - failures and time.monotonic() < deadline:
            await asyncio.sleep(0.3)
        await asyncio.sleep(1)
        rss1 = bs.rss_bytes(pids)
        held = hold.held - base_held
        for _, w in conns:
            w.close()
        await asyncio.sleep(1)
        return rss1, held

    rss1, held = asyncio.run(go())
    deadline = time.monotonic() + 30
    while hold.held > base_held and time.monotonic() < deadline:
        time.sleep(0.2)
    return {"held": held, "per_ping_kb": (rss1 - rss0) / max(1, held) / 1024, "rss0_mb": rss0 / 2**20}


# ------------------------------------------------------------------------------------------------


def report(args, commit: str, dirty: bool, ka, hs, res, mem, started: float) -> str:
    o = [f"## All of issue 18 side by side (bench/bench_all.py, {time.strftime('%Y-%m-%d')}, commit {commit}"
         f"{' + uncommitted changes' if dirty else ''})", "",
         f"Machine: {bs.machine()}; load average at the start {os.getloadavg()[0]:.1f}; the run took "
         f"{(time.monotonic() - started) / 60:.1f} min.", ""]
    names = args.contenders
    if ka:
        o += [f"Keep-alive (wrk -t1 -c32 -d{args.duration:g}s, median of {args.rounds}): CPU seconds per 1,000 "
              "requests of the contender's processes (req/s).", "",
              "| route | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for route in ("mdm", "activesync"):
            o.append(f"| {route} | " + " | ".join(
                f"{ka[(n, route)]['cpu_per_1k']:.3f} s ({ka[(n, route)]['rps']:,.0f})" for n in names) + " |")
        o.append("")
        for n in names:
            v = Variant(n)
            base = "lean-bare" + v.suffix if ("lean-bare" + v.suffix) in names else "lean-bare"
            if not v.base.startswith("easgate-") or base not in names:
                continue
            shares = []
            for route in ("mdm", "activesync"):
                share = ka[(n, route)]["cpu_per_1k"] / max(1e-9, ka[(base, route)]["cpu_per_1k"]) - 1
                shares.append(f"{share:+.0%} on the {route} route")
            o.append(f"- `{n}`: easgate's own share of CPU per request over `{base}` (the same lean master without "
                     f"easgate's addons): {', '.join(shares)} (target: <= +15%).")
        o.append("")
    if hs:
        o += [f"New TLS connections (`openssl s_time`, {args.clients} clients, {args.hs_seconds:g} s each, one GET "
              "per connection, HTTP/1.0 without Host: s_time's own request): connections/s (CPU seconds per 1,000 "
              "connections; each connection also costs the proxies an upstream connection). ECDSA P-256 gateway "
              "certificate unless it says RSA-2048.", "",
              "| handshake | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for cert, version, mode in (("ecdsa", "tls1_3", "new"), ("ecdsa", "tls1_2", "new"), ("ecdsa", "tls1_3", "reuse"),
                                    ("ecdsa", "tls1_2", "reuse"), ("rsa", "tls1_3", "new")):
            label = f"{'full' if mode == 'new' else 'resumed'} {version.replace('_', '.').upper()} {'RSA-2048' if cert == 'rsa' else 'ECDSA'}"
            o.append(f"| {label} | " + " | ".join(
                f"{hs[(n, cert, version, mode)]['cps']:,.0f} ({hs[(n, cert, version, mode)]['cpu_per_1k']:.2f} s)"
                if (n, cert, version, mode) in hs else "-" for n in names) + " |")
        if ("easgate-2", "ecdsa", "tls1_3", "new") in hs and ("easgate-1", "ecdsa", "tls1_3", "new") in hs:
            r = hs[("easgate-2", "ecdsa", "tls1_3", "new")]["cps"] / max(1e-9, hs[("easgate-1", "ecdsa", "tls1_3", "new")]["cps"])
            o += ["", f"- 2 workers / 1 worker, full TLS 1.3 handshakes: {r:.2f}x (target: >= 1.4x)."]
            if "easgate-2" in CLIENT_CPU:
                c = statistics.median(CLIENT_CPU["easgate-2"]) * 1000
                g = hs[("easgate-2", "ecdsa", "tls1_3", "new")]["cpu_per_1k"]
                o += [f"- The load generator shares the cores: `openssl s_time` itself used {c:.2f} s of CPU per 1,000 "
                      f"connections against easgate-2's {g:.2f} s, so on {os.cpu_count()} cores 2 workers can do at most "
                      f"{os.cpu_count() / (c + g) * 1000:,.0f} connections/s ({os.cpu_count()} / (client + gateway CPU per "
                      f"connection)) and 1 worker {1000 / hs[('easgate-1', 'ecdsa', 'tls1_3', 'new')]['cpu_per_1k']:,.0f} "
                      f"(one core): a ceiling of {os.cpu_count() * hs[('easgate-1', 'ecdsa', 'tls1_3', 'new')]['cpu_per_1k'] / (c + g):.2f}x."
                      + (f" Clients pinned to CPUs {PIN_CLIENTS}." if PIN_CLIENTS else "")]
        if ("nginx", "ecdsa", "tls1_3", "new") in hs and ("easgate-1", "ecdsa", "tls1_3", "new") in hs:
            per_core = hs[("nginx", "ecdsa", "tls1_3", "new")]["cpu_per_1k"] / max(1e-9, hs[("easgate-1", "ecdsa", "tls1_3", "new")]["cpu_per_1k"])
            o += [f"- easgate / nginx on new connections per core (CPU per connection): {per_core:.2f}x (target: >= 0.25x)."]
        o.append("")
    if res:
        o += ["TLS session resumption (`openssl s_client -sess_out`, then 20 x `-sess_in`): reconnects that resumed.", "",
              "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for version in ("tls1_2", "tls1_3"):
            o.append(f"| {version.replace('_', '.').upper()} | " + " | ".join(f"{res[(n, version)]}/20" for n in names) + " |")
        o.append("")
    if mem:
        o += [f"Memory per held ActiveSync Ping ({args.pings:,} held through each, an HTTPS upstream holding them): "
              "RSS growth of the contender's processes / held Pings.", "",
              "| | " + " | ".join(mem) + " |", "|---|" + "---:|" * len(mem),
              "| per held Ping | " + " | ".join(f"{m['per_ping_kb']:.1f} KB" for m in mem.values()) + " |",
              "| held | " + " | ".join(f"{m['held']:,}" for m in mem.values()) + " |", ""]
    return "\n".join(o)


class worktrees:
    """`git worktree`s of the `@REF` variants' commits under `d`, removed again at the end."""

    def __init__(self, d: Path, refs: set[str]) -> None:
        self.d, self.refs = d, refs

    def __enter__(self) -> None:
        for ref in sorted(self.refs):
            wt = self.d / f"at-{re.sub(r'[^A-Za-z0-9.-]', '_', ref)}"
            subprocess.run(["git", "worktree", "add", "--detach", str(wt), ref], cwd=ROOT, check=True,
                           capture_output=True)
            WORKTREES[ref] = wt

    def __exit__(self, *exc) -> None:
        for wt in WORKTREES.values():
            subprocess.run(["git", "worktree", "remove", "--force", str(wt)], cwd=ROOT, capture_output=True)
        WORKTREES.clear()


def main() -> int:
    global PY313, PIN_CLIENTS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10, help="seconds per wrk measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hs-seconds", type=float, default=8, help="seconds per s_time measurement")
    ap.add_argument("--hs-rounds", type=int, default=1)
    ap.add_argument("--clients", type=int, default=8,
                    help="parallel openssl s_time clients (each does one handshake at a time: 4 left a 2-worker "
                         "gateway idle between handshakes, 1.17 of 2 cores busy at ecd4888)")
    ap.add_argument("--pin-clients", default="", metavar="CPUS",
                    help="run the openssl s_time clients on these CPUs (taskset -c, e.g. 0)")
    ap.add_argument("--pings", type=int, default=2000)
    ap.add_argument("--contenders", nargs="+", default=["nginx", "mitmdump", "lean-bare", "easgate-1", "easgate-2"])
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=["keepalive", "handshakes", "resumption", "memory", "breakdown"])
    ap.add_argument("--breakdown-pings", type=int, default=1000,
                    help="held Pings per easgate-1 variant for the memory breakdown (tracemalloc pass: 300)")
    ap.add_argument("--py313-venv", type=Path, default=ROOT / ".venv-py3.13", help="the venv of the +py3.13 variants")
    ap.add_argument("--smoke", action="store_true", help="tiny durations, to see that it runs")
    ap.add_argument("--write", action="store_true", help="append the results to bench/RESULTS.md (clean tree only)")
    args = ap.parse_args()
    PIN_CLIENTS = args.pin_clients
    if args.smoke:
        args.duration, args.rounds, args.hs_seconds, args.hs_rounds, args.pings = 1, 1, 1, 1, 50
    commit, dirty = git("rev-parse", "--short", "HEAD"), benchlib.dirty()
    if args.write and (dirty or args.smoke):
        print("bench_all: --write needs a clean tree (commit first) and no --smoke: RESULTS.md names the commit "
              "its numbers come from", file=sys.stderr)
        return 2
    for tool in ("wrk", "nginx", "openssl"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            print(f"bench_all: needs {tool} (apt-get install wrk nginx-light openssl)", file=sys.stderr)
            return 2
    variants = [Variant(n) for n in args.contenders]
    PY313 = args.py313_venv.resolve()
    if any(v.py313 for v in variants) and not (PY313 / "bin" / "python").exists():
        print(f"bench_all: +py3.13 needs a Python 3.13 venv at {PY313} (see this script's docstring)", file=sys.stderr)
        return 2
    raise_fd_limit()
    started = time.monotonic()
    ka = hs = res = mem = None
    breakdown = ""
    with tempfile.TemporaryDirectory(prefix="easgate-bench-all-") as tmp, worktrees(d=Path(tmp), refs={
            v.ref for v in variants if v.ref}):
        d = Path(tmp)
        pki = d / "pki"
        generate_pki(pki)
        rsa_cert = rsa_gateway(pki)
        upstreams, mdm, exchange = bs.start_nginx(d, pki)
        hold = bs.HoldServer(d, pki)
        sets: dict[str, dict[str, Contender]] = {}
        try:
            sets["ecdsa"] = start_contenders(d, pki, mdm, exchange, pki / "gateway-full.pem", args.contenders)
            cs = sets["ecdsa"]
            if "keepalive" not in args.skip:
                ka = keepalive(cs, d, args.duration, args.rounds)
            if "resumption" not in args.skip:
                res = {(n, v): resumptions(c.mdm_port, pki, v, d) for n, c in cs.items() for v in ("tls1_2", "tls1_3")}
            if "handshakes" not in args.skip:
                sets["rsa"] = start_contenders(d, pki, mdm, exchange, rsa_cert,
                                               [n for n in args.contenders if n in ("nginx", "easgate-1")])
                hs = handshakes(sets, pki, args.hs_seconds, args.hs_rounds, args.clients)
            if "memory" not in args.skip:
                for s in sets.values():
                    for c in s.values():
                        c.stop()
                mem = {}
                for name in [n for n in args.contenders if Variant(n).base in ("nginx", "mitmdump", "easgate-1")]:
                    one = start_contenders(d, pki, mdm, hold.port, pki / "gateway-full.pem", [name])[name]
                    try:
                        mem[name] = held_memory(one, pki, args.pings, hold)
                    finally:
                        one.stop()
                    print(f"  memory {name:10} {mem[name]['per_ping_kb']:.1f} KB per held Ping", file=sys.stderr, flush=True)
            # where a held Ping's memory goes, for each easgate-1 variant of this Python (this tree, @REF)
            mvs = [Variant(n) for n in args.contenders if Variant(n).base == "easgate-1" and not Variant(n).py313
                   and not Variant(n).uvloop]
            if "breakdown" not in args.skip and mvs:
                for s in sets.values():
                    for c in s.values():
                        c.stop()
                variants = [bm.Variant(f"easgate-1{v.suffix}", WORKTREES[v.ref] / "addons" if v.ref else None,
                                       git("rev-parse", "--short", v.ref or "HEAD")) for v in mvs]
                bres = {}
                n_plain, n_traced = (50, 30) if args.smoke else (args.breakdown_pings, min(300, args.breakdown_pings))
                for traced in (False, True):
                    for v in variants:
                        bres[(v.name, "traced" if traced else "plain")] = bm.measure(
                            v, d, pki, hold, n_traced if traced else n_plain, traced)
                        print(f"  breakdown {v.name} {'traced' if traced else 'plain'} done", file=sys.stderr, flush=True)
                breakdown = bm.report(variants, bres, n_plain)
        finally:
            for s in sets.values():
                for c in s.values():
                    c.stop()
            hold.stop()
            upstreams.stop()
    text = report(args, commit, dirty, ka, hs, res, mem, started)
    if breakdown:
        text += "\n" + breakdown
    print(text)
    if args.write:
        benchlib.append(text, "bench_all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
