"""Memory per held ActiveSync Ping, where it goes, this tree against a baseline commit, in one run.

    .venv/bin/python bench/bench_memory.py                       # HEAD vs the baseline commit (~3 min)
    .venv/bin/python bench/bench_memory.py --baseline abc1234 --pings 2000
    .venv/bin/python bench/bench_memory.py --baseline main --also 1234abc --no-tree   # commits only
    .venv/bin/python bench/bench_memory.py --baseline HEAD --no-tree --http-upstream --client-cert --no-traced --write

Each variant is `easgate run --workers 1` (bench_scale.py's gateway config) with `-s bench/memprobe.py`
in front of an asyncio HTTPS upstream that holds every `Cmd=Ping`. The baseline runs the same .venv
with the baseline commit's `addons/` first on PYTHONPATH (a `git worktree` of it in a temporary
directory). Per variant, twice: once plain (RSS, glibc's malloc in use, RSS after `malloc_trim`) and once
with tracemalloc on (Python's share, by area of the code; tracemalloc's own bookkeeping inflates RSS, so
that pass gives only the Python breakdown). 20 Pings are held as a warm-up, then `--pings` more;
every figure is the difference / the Pings held.

Bytes, not time: a busy machine does not change them. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_scale as bs  # noqa: E402
import benchlib  # noqa: E402

from easgate.gateway.connections import raise_fd_limit  # noqa: E402
from easgate.tools.pki import generate_pki  # noqa: E402

ROOT = bs.ROOT
PROBE = ROOT / "bench" / "memprobe.py"
# main before issue 18's held-Ping cuts of the `perf` branch
DEFAULT_BASELINE = "72aaa5e"
WARM = 20
STDLIB = os.path.dirname(os.__file__)
# frames of the runner (asyncio.run, the CLI) sit under everything: they name nobody
RUNNER = ("/bin/easgate", "easgate/cli.py", "easgate/runtime/lean.py")

# tracemalloc file name fragments -> the part of a held connection they belong to (first match wins)
AREAS = [
    ("mitmproxy layers (proxy/layer.py, layers/)", ("mitmproxy/proxy/layer", "mitmproxy/proxy/layers/")),
    ("mitmproxy connection handler, Client/Server, context", ("mitmproxy/proxy/server.py", "mitmproxy/connection.py",
                                                               "mitmproxy/proxy/context.py", "mitmproxy/proxy/mode")),
    ("HTTP flow, request, headers", ("mitmproxy/http.py", "mitmproxy/flow.py", "mitmproxy/net/http/",
                                     "mitmproxy/coretypes/")),
    ("pyOpenSSL objects", ("OpenSSL/",)),
    ("easgate", ("easgate/",)),
]


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def area(filename: str) -> str:
    for name, frags in AREAS:
        if any(f in filename for f in frags):
            return name
    return "other Python"


class Variant:
    def __init__(self, name: str, addons: Path | None, commit: str, env: dict | None = None,
                 http_upstream: bool = False, client_cert: bool = False) -> None:
        self.name, self.addons, self.commit, self.env = name, addons, commit, env or {}
        self.http_upstream = http_upstream  # an http:// Exchange pool: no upstream TLS
        self.client_cert = client_cert  # the phones present a device certificate (as managed ones do)


def dump(pid: int, out: str, n: int, timeout: float = 120) -> dict:
    os.kill(pid, signal.SIGUSR1)
    path = Path(f"{out}.{n}.json")
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no memprobe dump at {path}")
        time.sleep(0.1)
    time.sleep(0.2)  # the snapshot is written before the JSON; the JSON is small
    return json.loads(path.read_text())


def measure(v: Variant, d: Path, pki: Path, hold: bs.HoldServer, n: int, traced: bool, keep: str | None = None) -> dict:
    """One gateway of variant `v`: the growth per held Ping between WARM and WARM + n held Pings."""
    deadline = time.monotonic() + 60
    while hold.held and time.monotonic() < deadline:  # the previous gateway's Pings are gone
        time.sleep(0.2)
    time.sleep(1)  # the hold server reports every 0.5 s
    tag = f"{v.name}-{'traced' if traced else 'plain'}"
    cfg = bs.gateway_config(d, pki, "http://127.0.0.1:9", hold.url, tag)
    out = str(d / f"probe-{tag}")
    env = {"EASGATE_MEMPROBE_OUT": out, "EASGATE_MEMPROBE_TRIM": "1"}
    if traced:
        env["EASGATE_MEMPROBE_TRACE"] = "1"
    if v.addons is not None:
        env["PYTHONPATH"] = str(v.addons)
    env.update(v.env)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        g = bs.Proc(tag, [str(bs.BIN / "easgate"), "run", str(cfg), "--workers", "1", "--grace", "0",
                          "--", "-s", str(PROBE)])
    finally:
        for k, val in old.items():
            if val is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = val
    conns: list = []
    bs.CLIENT_CERT = v.client_cert
    try:
        port = g.wait_listening(1)
        pid = g.proc.pid

        async def hold_pings(count: int) -> int:
            base = hold.held
            failures = await bs.open_pings(port, pki, count, conns)
            # until all are held, or none more for 20 s (tracemalloc slows the gateway down a lot)
            last, since = -1, time.monotonic()
            while hold.held - base < count - failures and time.monotonic() - since < 20:
                if hold.held != last:
                    last, since = hold.held, time.monotonic()
                await asyncio.sleep(0.2)
            await asyncio.sleep(1)
            return hold.held - base

        async def scenario() -> tuple[dict, dict, int]:
            await hold_pings(WARM)
            before = dump(pid, out, 1)
            held = await hold_pings(n)
            after = dump(pid, out, 2)
            for _, w in conns:
                w.close()
            return before, after, held

        before, after, held = asyncio.run(scenario())
        r = {"held": held}
        for k in ("rss", "malloc", "rss_trimmed", "traced"):
            if before.get(k) is not None and after.get(k) is not None:
                r[k] = (after[k] - before[k]) / max(1, held)
        r["types"] = {t: (after["types"].get(t, 0) - before["types"].get(t, 0)) / max(1, held)
                      for t in set(after["types"]) | set(before["types"])}
        if traced:
            if keep:  # --keep: the two snapshots, for a closer look (tracemalloc.Snapshot.load)
                for i in (1, 2):
                    shutil.copy(f"{out}.{i}.snap", Path(keep) / f"{tag}.{i}.snap")
            s1 = tracemalloc.Snapshot.load(f"{out}.1.snap")
            s2 = tracemalloc.Snapshot.load(f"{out}.2.snap")
            by_area: Counter = Counter()
            by_line: Counter = Counter()
            for stat in s2.compare_to(s1, "traceback"):
                frames = [f.filename for f in reversed(stat.traceback)]  # innermost first
                # the innermost frame outside the standard library names who asked for the memory
                owner = next((f for f in frames if not f.startswith(STDLIB) and not f.endswith(RUNNER)), None)
                by_area[area(owner) if owner else "asyncio and the rest of the standard library"] += stat.size_diff
                top = stat.traceback[-1] if len(stat.traceback) else None
                if top is not None:
                    by_line[f"{top.filename.split('site-packages/')[-1].split('addons/')[-1]}:{top.lineno}"] += stat.size_diff
            r["areas"] = {k: v / max(1, held) for k, v in by_area.items()}
            r["lines"] = {k: v / max(1, held) for k, v in by_line.most_common(15)}
        return r
    finally:
        for _, w in conns:
            w.close()
        g.stop()


def report(variants: list[Variant], res: dict, n: int) -> str:
    kb = lambda x: f"{x / 1024:.1f} KB" if x is not None else "-"  # noqa: E731
    names = [f"{v.name} ({v.commit})" for v in variants]
    o = [f"## Memory per held ActiveSync Ping, side by side (bench/bench_memory.py, {time.strftime('%Y-%m-%d')})", "",
         f"Machine: {bs.machine()}. `easgate run --workers 1`, {WARM} Pings held as a warm-up, then {n:,} more "
         "(distinct devices, TLS 1.3 on both sides, no client certificate unless the column says so); per held Ping = growth / Pings held.", "",
         "| per held Ping | " + " | ".join(names) + " |", "|---|" + "---:|" * len(variants)]
    rows = [("RSS", "plain", "rss"), ("RSS after malloc_trim(0)", "plain", "rss_trimmed"),
            ("malloc in use (glibc mallinfo2: OpenSSL, large Python objects)", "plain", "malloc"),
            ("Python objects (tracemalloc)", "traced", "traced")]
    for label, kind, key in rows:
        o.append(f"| {label} | " + " | ".join(kb(res.get((v.name, kind), {}).get(key)) for v in variants) + " |")
    o.append("| Pings held (plain / traced pass) | " + " | ".join(
        f"{res[(v.name, 'plain')]['held']:,} / {res.get((v.name, 'traced'), {}).get('held', 0):,}" for v in variants) + " |")
    traced = any((v.name, "traced") in res for v in variants)  # not with --no-traced
    if traced:
        o += ["", "Python objects by who asked for them (tracemalloc: the innermost frame outside the standard "
              "library; `asyncio` itself when no other code is on the stack, e.g. accepting a connection):", "",
              "| area | " + " | ".join(names) + " |", "|---|" + "---:|" * len(variants)]
        areas = sorted({a for v in variants for a in res.get((v.name, "traced"), {}).get("areas", {})},
                       key=lambda a: -res.get((variants[0].name, "traced"), {}).get("areas", {}).get(a, 0))
        for a in areas:
            o.append(f"| {a} | " + " | ".join(kb(res.get((v.name, "traced"), {}).get("areas", {}).get(a, 0))
                                              for v in variants) + " |")
    o += ["", "Live objects per held Ping (gc, classes with >= 0.5 per Ping in any variant):", "",
          "| class | " + " | ".join(names) + " |", "|---|" + "---:|" * len(variants)]
    classes = sorted({t for v in variants for t, c in res[(v.name, "plain")]["types"].items() if c >= 0.5},
                     key=lambda t: -max(res[(v.name, "plain")]["types"].get(t, 0) for v in variants))
    for t in classes:
        o.append(f"| `{t}` | " + " | ".join(f"{res[(v.name, 'plain')]['types'].get(t, 0):.1f}" for v in variants) + " |")
    for v in variants if traced else []:
        o += ["", f"Top allocation sites, {v.name} (tracemalloc, per held Ping):", ""]
        o += [f"- `{line}`: {size:,.0f} B" for line, size in res.get((v.name, "traced"), {}).get("lines", {}).items()]
    return "\n".join(o)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default=DEFAULT_BASELINE, help="commit to compare against (default: %(default)s)")
    ap.add_argument("--pings", type=int, default=1000)
    ap.add_argument("--traced-pings", type=int, default=300, help="Pings for the tracemalloc pass (slow)")
    ap.add_argument("--uvloop", action="store_true", help="also this tree on uvloop's event loop (EASGATE_EVENT_LOOP)")
    ap.add_argument("--no-traced", action="store_true", help="skip the (slow) tracemalloc pass")
    ap.add_argument("--also", nargs="*", default=[], metavar="REF",
                    help="more commits side by side, each from its own worktree (e.g. the steps of a branch)")
    ap.add_argument("--no-tree", action="store_true", help="leave this tree out (only --baseline and --also)")
    ap.add_argument("--http-upstream", action="store_true",
                    help="also this tree with an http:// Exchange pool (a trusted network): no upstream TLS")
    ap.add_argument("--client-cert", action="store_true",
                    help="also this tree with phones that present a device certificate (the demo iPhone's)")
    ap.add_argument("--write", action="store_true", help="append the result to bench/RESULTS.md (clean tree only)")
    ap.add_argument("--keep", metavar="DIR", help="copy the tracemalloc snapshots (before, after) into DIR")
    args = ap.parse_args()
    benchlib.refuse_dirty_write(args.write, "bench_memory.py")
    raise_fd_limit()
    head = git("rev-parse", "--short", "HEAD") + (" + uncommitted" if git("status", "--porcelain", "addons") else "")
    with tempfile.TemporaryDirectory(prefix="easgate-bench-mem-") as tmp:
        d = Path(tmp)
        trees = [(d / f"ref{i}", ref) for i, ref in enumerate([args.baseline, *args.also])]
        for wt, ref in trees:
            git("worktree", "add", "--detach", str(wt), ref)
        try:
            variants = [Variant("baseline" if i == 0 else ref, wt / "addons", git("rev-parse", "--short", ref))
                        for i, (wt, ref) in enumerate(trees)]
            if not args.no_tree:
                variants.append(Variant("this tree", None, head))
            if args.uvloop:
                variants.append(Variant("this tree+uvloop", None, head, {"EASGATE_EVENT_LOOP": "uvloop"}))
            if args.http_upstream:
                variants.append(Variant("this tree (http upstream)", None, head, http_upstream=True))
            if args.client_cert:
                variants.append(Variant("this tree (client certificate)", None, head, client_cert=True))
            pki = d / "pki"
            generate_pki(pki)
            holds = {False: bs.HoldServer(d, pki)}
            if args.http_upstream:
                holds[True] = bs.HoldServer(d, pki, tls=False)
            res = {}
            try:
                for traced in (False,) if args.no_traced else (False, True):
                    for v in variants:
                        res[(v.name, "traced" if traced else "plain")] = r = measure(
                            v, d, pki, holds[v.http_upstream], args.traced_pings if traced else args.pings, traced,
                            keep=args.keep)
                        print(f"  {v.name:10} {'traced' if traced else 'plain':6} held {r['held']} rss "
                              f"{r.get('rss', 0) / 1024:.1f} KB malloc {r.get('malloc', 0) / 1024:.1f} KB traced "
                              f"{(r.get('traced') or 0) / 1024:.1f} KB", file=sys.stderr, flush=True)
            finally:
                for hold in holds.values():
                    hold.stop()
        finally:
            for wt, _ in trees:
                git("worktree", "remove", "--force", str(wt))
    out = report(variants, res, args.pings)
    print(out)
    if args.write:
        benchlib.append(out, "bench_memory.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
