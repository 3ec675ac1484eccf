"""`easgate import-netscaler` on large files: is it linear in time and memory?

    .venv/bin/python bench/bench_netscaler.py            # print the results (markdown)
    .venv/bin/python bench/bench_netscaler.py --write    # and append them to bench/RESULTS.md

Generates ns.conf files shaped like a multi-tenant appliance (the production fixture's objects:
service groups, cs actions, responder policies with an XNC callout, an ssl policy inserting
NSClientCert) plus N cs policies bound to the cs vserver: host names, path prefixes, headers, some
negated (those become mitmproxy filters), spread over 50 lb vservers, half of the cs policies
through cs actions. Two lines per cs policy: 25,000 cs policies make a 50,000-line file.

Each size is imported by `easgate import-netscaler FILE -o OUT` in its own process; wall time and
the child's peak RSS (wait4) are reported, best of 3 runs. The target (issue 15): 50,000 lines with
25,000 cs policies under 10 s and 300 MB.

Not a test: nothing here asserts; it reports.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib  # noqa: E402  (bench/ is the script's directory: first on sys.path)

ROOT = Path(__file__).resolve().parent.parent
SIZES = (2_000, 25_000)
ROUNDS = 3
LBS = 50

HEAD = """\
#NS13.1 Build 49.15
set responder param -undefAction DROP
add server srv_xnc 10.30.3.41
add service svc_xnc srv_xnc HTTP 9080
add lb vserver lb_vs_xnc HTTP 0.0.0.0 0
bind lb vserver lb_vs_xnc svc_xnc
add cs vserver cs_vs_mail SSL 203.0.113.10 443 -cltTimeout 360
add ssl certKey ck_mail -cert mail.crt -key mail.key
add ssl certKey ck_ca -cert ca.cer
bind ssl vserver cs_vs_mail -certkeyName ck_mail
bind ssl vserver cs_vs_mail -certkeyName ck_ca -CA -ocspCheck Optional
set ssl vserver cs_vs_mail -clientAuth ENABLED -clientCert Optional
add ssl action ssl_act -clientCert ENABLED -certHeader NSClientCert
add ssl policy ssl_pol -rule "CLIENT.SSL.CLIENT_CERT.EXISTS && HTTP.REQ.URL.PATH.TO_LOWER.STARTSWITH(\\"/microsoft-server-activesync\\").NOT" -action ssl_act
bind ssl vserver cs_vs_mail -policyName ssl_pol -priority 100
add policy httpCallout co_xnc
set policy httpCallout co_xnc -vServer lb_vs_xnc -returnType BOOL -urlStemExpr "\\"/services/ActiveSync/Authorize\\"" -parameters user(HTTP.REQ.HEADER("authorization").AFTER_STR("Basic ").B64DECODE.BEFORE_STR(":").HTTP_URL_SAFE) agent(HTTP.REQ.HEADER("user-agent").HTTP_URL_SAFE) ip(CLIENT.IP.SRC) url(("https://"+HTTP.REQ.HOSTNAME+HTTP.REQ.URL).B64ENCODE) resultType("json") DeviceId(HTTP.REQ.URL.QUERY.VALUE("DeviceId")) -resultExpr "HTTP.RES.BODY(100).CONTAINS(\\"Allow\\")" -cacheForSecs 60
add responder policy rsp_xnc "HTTP.REQ.URL.PATH.TO_LOWER.STARTSWITH(\\"/microsoft-server-activesync\\") && SYS.HTTP_CALLOUT(co_xnc).NOT" DROP
"""


def rule(i: int) -> str:
    host = f'HTTP.REQ.HOSTNAME.EQ(\\"t{i}.example.com\\")'
    kind = i % 5
    if kind == 0:
        return f'{host} && HTTP.REQ.URL.PATH.TO_LOWER.STARTSWITH(\\"/microsoft-server-activesync\\")'
    if kind == 1:
        return f'{host} && HTTP.REQ.URL.PATH.SET_TEXT_MODE(IGNORECASE).STARTSWITH(\\"/autodiscover/\\")'
    if kind == 2:
        return f'{host} && HTTP.REQ.HEADER(\\"X-Tenant-{i}\\").EXISTS'
    if kind == 3:
        return f'{host} && HTTP.REQ.URL.STARTSWITH(\\"/zdm/t{i}/\\").NOT'
    return f'{host} || HTTP.REQ.HOSTNAME.EQ(\\"alt{i}.example.com\\")'


def generate(n: int) -> str:
    out = [HEAD]
    for k in range(LBS):
        out.append(f"add serviceGroup sg_{k} SSL\nbind serviceGroup sg_{k} srv_{k}a 443\n"
                   f"bind serviceGroup sg_{k} srv_{k}b 443 -state DISABLED\n"
                   f"add lb vserver lb_{k} SSL 0.0.0.0 0\nbind lb vserver lb_{k} sg_{k}\n"
                   f"bind lb vserver lb_{k} -policyName rsp_xnc -priority 100 -gotoPriorityExpression END -type REQUEST\n"
                   f"add cs action act_{k} -targetLBVserver lb_{k}\n")
    for i in range(n):
        lb = i % LBS
        if i % 2:
            out.append(f'add cs policy p{i} -rule "{rule(i)}" -action act_{lb}\n'
                       f"bind cs vserver cs_vs_mail -policyName p{i} -priority {i + 1}\n")
        else:
            out.append(f'add cs policy p{i} -rule "{rule(i)}"\n'
                       f"bind cs vserver cs_vs_mail -policyName p{i} -targetLBVserver lb_{lb} -priority {i + 1}\n")
    out.append("bind cs vserver cs_vs_mail -lbvserver lb_0\n")
    return "".join(out)


def run_once(conf: Path, out: Path) -> tuple[float, float, int, float]:
    """(wall seconds, peak RSS MB, exit status, CPU seconds) of one import in its own process."""
    argv = [sys.executable, "-m", "easgate.cli", "import-netscaler", str(conf), "-o", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    took = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return took, usage.ru_maxrss / 1024, proc.returncode, usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true", help="append the section to bench/RESULTS.md")
    args = ap.parse_args()
    benchlib.refuse_dirty_write(args.write, "bench_netscaler")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for n in SIZES:
            conf = Path(d) / f"ns-{n}.conf"
            conf.write_text(generate(n))
            lines = conf.read_text().count("\n")
            runs = [run_once(conf, Path(d) / f"out-{n}.yaml") for _ in range(ROUNDS)]
            best = min(runs)
            routes = (Path(d) / f"out-{n}.yaml").read_text().count("\n  - name: ")
            rows.append((n, lines, best[0], max(r[1] for r in runs), best[2], routes, min(r[3] for r in runs)))
            print(f"{n} cs policies, {lines} lines: {best[0]:.2f} s, {max(r[1] for r in runs):.0f} MB", file=sys.stderr)
    small, big = rows[0], rows[-1]
    text = [
        f"## NetScaler import: linear time and memory (bench/bench_netscaler.py, {time.strftime('%Y-%m-%d')})",
        "",
        f"Commit {benchlib.commit()}; {platform.python_implementation()} {platform.python_version()}, `nproc` {os.cpu_count()}. "
        "Generated ns.conf files (service groups, cs actions, a callout responder policy on every lb "
        "vserver, an NSClientCert ssl policy) with N cs policies of mixed rules; each imported by "
        f"`easgate import-netscaler FILE -o OUT` in its own process, best of {ROUNDS} (time), peak RSS of the child. "
        f"Load average when it ended: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (the machine is shared: "
        "the CPU time is the steadier number; both include Python's and mitmproxy's start, ~1 s).",
        "",
        "| cs policies | lines | wall time | CPU time | peak RSS | routes written | exit status |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, lines, took, rss, rc, routes, cpu in rows:
        text.append(f"| {n:,} | {lines:,} | {took:.2f} s | {cpu:.2f} s | {rss:.0f} MB | {routes:,} | {rc} |")
    ratio = big[6] / small[6]

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"
    text += ["", f"{big[0] / small[0]:.1f}x the cs policies took {ratio:.1f}x the CPU time (start-up included). "
             f"Target: 50,000 lines with 25,000 cs policies under 10 s and 300 MB: CPU time {big[6]:.2f} s "
             f"{verdict(big[6] < 10)}, wall time {big[2]:.2f} s {verdict(big[2] < 10)}, peak RSS {big[3]:.0f} MB "
             f"{verdict(big[3] < 300)}.", ""]
    section = "\n".join(text)
    print(section)
    if args.write:
        benchlib.append(section, "bench_netscaler")


if __name__ == "__main__":
    main()
