"""What N workers cost to start and to keep: `easgate run --workers N` from its start to "N workers
serving" (wall time, and the CPU of the supervisor and everything it started), then the memory of
each process once they serve (RSS, and PSS: the proportional share, which counts a page shared by
k processes as 1/k in each; /proc/PID/smaps_rollup).

    .venv/bin/python bench/bench_workers.py                      # this tree, 2 workers, 5 rounds
    .venv/bin/python bench/bench_workers.py --also 091afd1       # and that commit beside it
    .venv/bin/python bench/bench_workers.py --also 091afd1 --write   # appended to bench/RESULTS.md

Why: workers are forked from the supervisor, which has easgate and mitmproxy loaded, instead of
each starting a Python of its own (before 6d49597); this is the side-by-side measurement of that.
Not a test: nothing here asserts; it reports.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_all as ba  # noqa: E402  (its worktrees of @REF commits)
import bench_scale as bs  # noqa: E402
import benchlib  # noqa: E402

from easgate.tools.pki import generate_pki  # noqa: E402

ROOT = benchlib.ROOT
SERVING = re.compile(r"(\d+) workers serving .* \(pids ([\d, ]+)\)")


def git_short(ref: str) -> str:
    return subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def cpu(pid: int) -> float:
    """User+system CPU seconds of pid and of the children it has waited for (bench_scale.cpu_seconds
    leaves those out; here they include the supervisor's pre-flight check, a child since 6d49597)."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in f[11:15]) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def one_start(cfg: Path, n: int, env: dict[str, str]) -> dict:
    """Start, wait for serving, measure, stop."""
    t0 = time.monotonic()
    p = subprocess.Popen([str(bs.BIN / "python"), "-m", "easgate.cli", "run", str(cfg), "--workers", str(n),
                          "--grace", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=dict(os.environ, **env))
    try:
        assert p.stdout is not None
        out = ""
        for line in p.stdout:
            out += line
            if m := SERVING.search(line):
                wall = time.monotonic() - t0
                pids = [int(x) for x in m[2].split(", ")]
                break
        else:
            raise RuntimeError(f"exited with {p.wait()} before serving: {out[-2000:]}")
        spent = cpu(p.pid) + sum(cpu(c) for c in children(p.pid))
        time.sleep(1)  # settled: nothing of the start-up left in flight
        return {"wall": wall, "cpu": spent,
                "sup_rss": kb(p.pid, "Rss"), "sup_pss": kb(p.pid, "Pss"),
                "w_rss": statistics.mean(kb(w, "Rss") for w in pids), "w_pss": statistics.mean(kb(w, "Pss") for w in pids),
                "total_pss": kb(p.pid, "Pss") + sum(kb(w, "Pss") for w in pids)}
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--also", action="append", default=[], metavar="REF", help="a commit to measure beside this tree")
    ap.add_argument("--write", action="store_true", help="append the results to bench/RESULTS.md (clean tree only)")
    args = ap.parse_args()
    benchlib.refuse_dirty_write(args.write, "bench_workers.py")
    head = benchlib.commit()
    with tempfile.TemporaryDirectory(prefix="easgate-bench-workers-") as tmp:
        d = Path(tmp)
        generate_pki(d / "pki")
        cfg = bs.gateway_config(d, d / "pki", "http://127.0.0.1:9", "https://127.0.0.1:10", "workers")
        with ba.worktrees(d, set(args.also)):  # bench_all's: a `git worktree` per REF, removed at the end
            variants = [(git_short(ref), {"PYTHONPATH": str(ba.WORKTREES[ref] / "addons")}) for ref in args.also]
            variants.append((head, {}))
            runs: dict[str, list[dict]] = {name: [] for name, _ in variants}
            one_start(cfg, args.workers, {})  # warm the page cache
            for r in range(args.rounds):
                for name, env in variants:  # alternating
                    runs[name].append(x := one_start(cfg, args.workers, env))
                    print(f"  round {r + 1} {name}: serving after {x['wall']:.3f} s, CPU {x['cpu']:.2f} s, "
                          f"worker PSS {x['w_pss'] / 1024:.1f} MB", file=sys.stderr, flush=True)

    med = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for name, rs in runs.items()}
    mb = lambda v: f"{v / 1024:.1f} MB"  # noqa: E731
    names = [n for n, _ in variants]
    o = [f"## Starting and keeping {args.workers} workers (bench/bench_workers.py, {time.strftime('%Y-%m-%d')}, "
         f"commit {head})", "",
         f"Machine: {bs.machine()}.", "",
         f"`easgate run gateway.yaml --workers {args.workers}` (bench_scale.py's two-route config, unreachable "
         f"upstreams: nothing but the start-up), median of {args.rounds} alternating rounds. CPU: the supervisor and every process it "
         "started, until all workers serve. Memory one second after that, from /proc/PID/smaps_rollup.", "",
         "| | " + " | ".join(f"easgate at {n}" for n in names) + " |",
         "|---|" + "---:|" * len(names)]
    rows = [("start to all serving", lambda m: f"{m['wall']:.3f} s"),
            ("CPU until serving", lambda m: f"{m['cpu']:.2f} s"),
            ("worker RSS", lambda m: mb(m["w_rss"])),
            ("worker PSS", lambda m: mb(m["w_pss"])),
            ("supervisor PSS", lambda m: mb(m["sup_pss"])),
            (f"supervisor + {args.workers} workers, PSS", lambda m: mb(m["total_pss"]))]
    for label, fmt in rows:
        o.append(f"| {label} | " + " | ".join(fmt(med[n]) for n in names) + " |")
    text = "\n".join(o) + "\n"
    print(text)
    if args.write:
        benchlib.append(text, "bench_workers.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
