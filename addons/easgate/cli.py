"""The `easgate` command: run, web, check, pki (and more as the gateway grows).

`run` and `web` start mitmproxy's own dump/web master with the gateway addons added directly (not
as a `-s` script): an option error is then a startup error with a message and exit status 1, never
a proxy silently running without its gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mitmproxy import version as mitmproxy_version

from . import __version__
from .authz.ratetable import RUN_DIR_ENV, make_run_dir
from .authz.revocations import RevocationFile, entry_of, make_record, stamp_after
from .authz.revocations import append as append_revocation
from .authz.revocations import normalize as normalize_revocation
from .connector import commands as connector_commands
from .core.errors import ConfigError
from .gateway.addon import with_listen
from .gateway.chain import make_addons, validate_config
from .gateway.config import GatewayConfig, load_config
from .gateway.metrics import WORKER_DIR_ENV, is_loopback
from .gateway.metrics import parse_listen as parse_metrics_listen
from .gateway.sharedcache import publish_revocation, redact_url, stored_revocation
from .runtime import workers
from .runtime.aggregate import Aggregator, MetricsServer
from .runtime.lean import (
    Ready,
    full_factory,
    lean_factory,
    mitmdump_filter_extra,
    run_master,
)
from .tools import demo, netscaler, policyfile, replay, standins
from .tools.pki import generate_pki, revoke


def _validate(path: str) -> GatewayConfig:
    try:
        return validate_config(path)
    except ConfigError as e:
        print(f"easgate: config error: {e}", file=sys.stderr)
        raise SystemExit(2)


def cmd_check(args) -> int:
    cfg = _validate(args.config)
    print(f"{cfg.path}: OK")
    print(f"listen  https://{cfg.listen_host}:{cfg.listen_port}  (client certificates: {cfg.tls.client_certs.mode})")
    print(f"{'prio':>5}  {'route':<16} {'match':<44} {'pool':<12} guards")
    for r in cfg.routes:
        print(f"{r.priority:>5}  {r.name:<16} {describe_match(r.match):<44} {r.pool:<12} {describe_guards(r)}")
    if cfg.default_route:
        r = cfg.route(cfg.default_route)
        print(f"{'dflt':>5}  {r.name:<16} {'(no other route matched)':<44} {r.pool:<12} {describe_guards(r)}")
    else:
        print(f"{'dflt':>5}  {'-':<16} {'(no other route matched)':<44} {'404':<12}")
    for p in cfg.pools.values():
        print(f"pool {p.name}: {', '.join(s.url for s in p.servers)}  host_header={p.host_header}"
              + (f" ca={p.ca}" if p.ca else ""))
    for line in describe_authorization(cfg):
        print(line)
    return 0


def describe_authorization(cfg: GatewayConfig) -> list[str]:
    """The authorization section as `check` shows it: what decides, what happens when it fails."""
    a = cfg.authorization
    if a is None:
        return ["authorization: none (no route says authorize: activesync)"]
    t, c = a.applies_to, a.connector
    guarded = [r.name for r in cfg.routes if r.authorize]
    fail = "- (no connector)"
    if c:
        fail = a.on_connector_error + (f" (the last decision if at most {a.stale_max_age_s:g} s old, else deny)"
                                       if a.on_connector_error == "stale" else "")
    rows = [
        ("applies to", f"path^={t.path_prefix}  methods={'|'.join(t.methods)}  pass={'|'.join(t.pass_methods) or '-'}"
                       f"  commands={'|'.join(t.commands) or 'all'}  hosts={'|'.join(t.hosts) or 'any'}"),
        ("policy", str(a.policy or "-")),
        ("connector", f"{c.url}  (timeout {c.timeout_ms} ms, at most {c.max_concurrency} at once"
                      + ("" if c.verify else ", certificate NOT verified") + ")"
         if c else "- (the policy's inventory and mode decide)"),
        *([("connector changes", f"{c.changes}  (followed by every worker: blocks reach cached decisions and "
                                 "held requests at once)")] if c and c.changes else []),
        ("on connector error", fail),
        ("cache", f"allow {a.cache.allow_ttl_s:g} s, deny {a.cache.deny_ttl_s:g} s, at most {a.cache.max_entries} entries"),
        ("denied", "connection dropped" if a.deny.action == "drop" else f"HTTP {a.deny.status}"),
        ("audit log", str(cfg.audit_log or "- (decisions go to the debug log only)")),
    ]
    return [f"authorization (routes: {', '.join(guarded) or 'none'})"] + [f"  {k:<19} {v}" for k, v in rows]


def describe_match(m) -> str:
    if m is None:
        return "(default only)"
    if m.any:
        return "any"
    parts = []
    if m.path_prefix:
        parts.append(f"path^={m.path_prefix}" + (" (any case)" if m.ignore_case else ""))
    if m.hosts:
        parts.append("host=" + "|".join(m.hosts))
    if m.methods:
        parts.append("method=" + "|".join(m.methods))
    parts += [f"has {h}" for h in m.header_present]
    parts += [f"{h}={v}" for h, v in m.header_equals]
    if m.client_cert:
        parts.append(f"cert {m.client_cert}")
    if m.filter:
        parts.append(f"filter {m.filter}")
    return " & ".join(parts)


def describe_guards(r) -> str:
    g = []
    if r.authorize:
        g.append(f"authorize={r.authorize}")
    if r.client_cert_header:
        g.append(f"cert header {r.client_cert_header}")
    return ", ".join(g) or "-"


def _mitm_args(args) -> list[str]:
    out = ["--set", f"easgate_config={Path(args.config).resolve()}"]
    if args.listen:
        out += ["--set", f"easgate_listen={args.listen}"]
    return out + list(args.mitmproxy_args or [])


def _take_listen(listen: str | None, extra: list[str]) -> tuple[str | None, list[str]]:
    """`-- --set easgate_listen=X` is the same as `--listen X`: one value, passed on once (workers
    get `--listen` from the supervisor; mitmproxy refuses an option set twice)."""
    out, found = [], []
    i = 0
    while i < len(extra):
        a = extra[i]
        if a == "--set" and i + 1 < len(extra) and extra[i + 1].startswith("easgate_listen="):
            found.append(extra[i + 1].split("=", 1)[1])
            i += 2
            continue
        if a.startswith("--set=easgate_listen="):
            found.append(a.split("=", 2)[2])
            i += 1
            continue
        out.append(a)
        i += 1
    if not found:
        return listen, extra
    if listen is not None or len(found) > 1:
        raise ValueError("the listen address is given more than once (--listen, --set easgate_listen): give it once")
    return found[0], out


def cmd_run(args) -> int:
    cfg = _validate(args.config)
    n = args.workers if args.workers is not None else workers.default_workers()
    if args.workers is None and any(a.split("=", 1)[0] in _ONE_PROCESS_ARGS for a in args.mitmproxy_args or []):
        n = 1  # see _ONE_PROCESS_ARGS
    if n < 1:
        print("easgate: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.listen and args.worker_index is None:
        try:
            with_listen(cfg, args.listen)
        except ConfigError as e:
            print(f"easgate: {e}", file=sys.stderr)
            return 2
    if n > 1 and args.worker_index is None:
        # the workers' options, checked once here: a bad --set is one line, not one per worker
        factory = full_factory(make_addons) if args.full else lean_factory(make_addons)
        # in a child: the supervisor stays as it was after imports, the state its workers fork from
        rc = workers.fork(lambda: run_master(factory, _mitm_args(args), lean=not args.full,
                                             extra=mitmdump_filter_extra, check_only=True)).wait()
        if rc:
            return rc if rc > 0 else 1
        return _supervise(args, cfg, n)

    ready = None
    prefix = ""
    if args.worker_index is not None:
        fd, _ = workers.worker_setup()
        ready = Ready(fd, args.worker_index) if fd is not None else None
        prefix = f"[w{args.worker_index}]"
    workers.configure_listener(reuse_port=args.worker_index is not None)
    factory = full_factory(make_addons) if args.full else lean_factory(make_addons)
    return run_master(factory, _mitm_args(args), lean=not args.full, grace_s=args.grace,
                      reload_grace_s=args.reload_grace, log_prefix=prefix, ready=ready,
                      extra=mitmdump_filter_extra)


# listing options, reading or replaying flows, or writing them (N workers would each truncate and
# write the same -w file): one process
_ONE_PROCESS_ARGS = {"--options", "--commands", "--version", "-r", "--rfile", "-n", "--no-server", "-C",
                     "--client-replay", "-S", "--server-replay", "-w", "--wfile"}


def _supervise(args, cfg: GatewayConfig, n: int) -> int:
    host, port = cfg.listen_host, cfg.listen_port
    if args.listen:
        try:
            c = with_listen(cfg, args.listen)
        except ConfigError as e:
            print(f"easgate: {e}", file=sys.stderr)
            return 2
        host, port = c.listen_host, c.listen_port
    try:
        reserved = workers.reserve_port(host, port)
    except OSError as e:
        print(f"easgate: cannot listen on {host}:{port}: {e.strerror or e}", file=sys.stderr)
        return 1
    port = reserved.getsockname()[1]
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def worker_args(i: int) -> list[str]:
        """Worker i's command line after `easgate`: run in a forked child (main), or exec'd."""
        argv = ["run", str(Path(args.config).resolve()), "--listen", listen, "--workers", str(n),
                "--worker-index", str(i), "--grace", str(args.grace), "--reload-grace", str(args.reload_grace)]
        if args.full:
            argv.append("--full")
        return argv + ["--", *(args.mitmproxy_args or [])]

    def worker_argv(i: int) -> list[str]:
        return [sys.executable, "-m", "easgate.cli", *worker_args(i)]

    def check() -> str | None:
        """SIGHUP: can the new workers load the config? (None: yes; else the one-line reason)

        `easgate check` runs as a process of its own: after an upgrade it is the new code that
        judges the config, as it is the new code the new workers run."""
        try:
            p = subprocess.run([sys.executable, "-m", "easgate.cli", "check", str(Path(args.config).resolve())],
                               capture_output=True, text=True, timeout=workers.Supervisor.READY_TIMEOUT_S,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return f"easgate check {args.config} did not finish in {workers.Supervisor.READY_TIMEOUT_S:g}s"
        if p.returncode != 0:
            lines = [l for l in p.stderr.splitlines() if l.strip()] or [f"easgate check exited with {p.returncode}"]
            return lines[-1].removeprefix("easgate: config error: ")
        try:
            new = load_config(args.config)
        except ConfigError:
            return None
        if not args.listen and (new.listen_host, new.listen_port) != (cfg.listen_host, cfg.listen_port):
            workers.say(f"warning: listen changed to {new.listen_host}:{new.listen_port} in {new.path}; a reload "
                        f"keeps {listen} (restart to move the listener)")
        return None

    metrics = None
    # The run directory: what every worker of this supervisor shares (the rate-limit tables,
    # authz/ratetable.py); private (0700), in memory when /dev/shm has room, gone when we stop.
    run_dir = make_run_dir()
    env: dict[str, str] = {RUN_DIR_ENV: run_dir}
    if value := metrics_option(args.mitmproxy_args or []):
        try:
            metrics = _aggregated_metrics(value, close=(reserved.close,))
        except SystemExit:
            reserved.close()
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        env[WORKER_DIR_ENV] = str(metrics.aggregator.dir)
    try:
        return workers.Supervisor(n, worker_argv, args.grace, listen, reload_grace_s=args.reload_grace,
                                  check=check, env=env, worker_main=lambda i: main(worker_args(i)),
                                  close_in_worker=(reserved.close, *([metrics.forget] if metrics else [])),
                                  watch=metrics.watch if metrics else None).run()
    finally:
        reserved.close()
        shutil.rmtree(run_dir, ignore_errors=True)
        if metrics is not None:
            metrics.stop()
            shutil.rmtree(metrics.aggregator.dir, ignore_errors=True)


def _aggregated_metrics(value: str, close: tuple[Callable[[], None], ...]) -> MetricsServer:
    """The supervisor's easgate_metrics listener, adding up the workers' numbers (runtime/aggregate.py),
    served by a child process (`close`: what the supervisor holds that it must not)."""
    try:
        host, port = parse_metrics_listen(value)
    except ValueError as e:
        print(f"easgate: --set easgate_metrics: {e}", file=sys.stderr)
        raise SystemExit(2)
    directory = Path(tempfile.mkdtemp(prefix="easgate-metrics-"))  # 0700: the workers' sockets
    try:
        metrics = MetricsServer(host, port, Aggregator(directory)).start(close)
    except OSError as e:
        shutil.rmtree(directory, ignore_errors=True)
        print(f"easgate: cannot listen for metrics on {value}: {e.strerror or e}", file=sys.stderr)
        raise SystemExit(1)
    shown = f"[{metrics.address[0]}]" if ":" in metrics.address[0] else metrics.address[0]
    workers.say(f"metrics at http://{shown}:{metrics.address[1]}/metrics (all workers)")
    if not is_loopback(host):
        workers.say(f"warning: the metrics listener on {host}:{metrics.address[1]} is not on loopback and has "
                    "no authentication")
    return metrics


def metrics_option(mitmproxy_args: list[str]) -> str | None:
    """The value of `--set easgate_metrics=...` among mitmproxy's arguments (the last one wins)."""
    value = None
    for i, a in enumerate(mitmproxy_args):
        item = a.removeprefix("--set=") if a.startswith("--set=") else (
            mitmproxy_args[i + 1] if a == "--set" and i + 1 < len(mitmproxy_args) else None)
        if item is not None and item.startswith("easgate_metrics="):
            value = item.split("=", 1)[1]
    return value


def cmd_web(args) -> int:
    _validate(args.config)
    # mitmweb's master (tornado and the web UI) is imported only for `easgate web`: every other
    # command, the NetScaler import of a large file above all, would carry its ~30 MB for nothing
    from mitmproxy.tools import cmdline
    from mitmproxy.tools import main as mitm_main
    from mitmproxy.tools.web.master import WebMaster

    class GatewayWebMaster(WebMaster):
        def __init__(self, options, *a, **kw) -> None:
            super().__init__(options, *a, **kw)
            self.addons.add(*make_addons())

    mitm_main.run(GatewayWebMaster, cmdline.mitmweb, _mitm_args(args))
    return 0


def cmd_revoke(args) -> int:
    """Into this machine's revocation file (its workers follow it) and, with a shared cache, into Redis
    at once: the cluster learns it even if no gateway runs here, and the operator sees whether it did.
    The gateways here push the same record too (Redis keeps one copy), so a Redis that is down now
    gets it when it is back."""
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"easgate: config error: {e}", file=sys.stderr)
        return 2
    auth = cfg.authorization
    path = auth.revocations if auth else None
    url = auth.cache.redis if auth else None
    if path is None and url is None:
        print(f"easgate revoke: {cfg.path}: authorization.revocations is not set; "
              "add e.g. 'revocations: revocations.jsonl' under authorization and restart the gateway", file=sys.stderr)
        return 2
    action = "restore" if args.restore else "revoke"
    user = None if args.user == "*" else args.user
    # stamped after the record for it in the file and in Redis, whatever clock stamped those: the
    # operator's latest word is the one in force
    known: list[dict | None] = []
    redis_problem = None
    draft = normalize_revocation(make_record(user, args.device_id, args.reason, action))
    if path is not None:
        local = RevocationFile(path)
        local.poll_records()
        known.append(local.table.of_device(draft["device_id"]).get(entry_of(draft)[1]))
    if url is not None:
        try:
            known.append(asyncio.run(stored_revocation(url, draft)))
        except Exception as e:  # noqa: BLE001 - any Redis trouble: said in one line, the file still holds it
            redis_problem = f"Redis {redact_url(url)} unreachable ({type(e).__name__}: {e})"
    now = stamp_after(time.time(), *known)
    if path is not None:
        try:
            rec = append_revocation(path, user, args.device_id, args.reason, action, now)
        except OSError as e:
            print(f"easgate revoke: cannot append to {path}: {e.strerror}", file=sys.stderr)
            return 2
    else:
        rec = make_record(user, args.device_id, args.reason, action, now)
    done = "restored" if args.restore else "revoked"
    where = [str(path)] if path is not None else []
    if url is not None and redis_problem is None:
        try:
            asyncio.run(publish_revocation(url, normalize_revocation(rec)))
            where.append(f"Redis {redact_url(url)}")
        except Exception as e:  # noqa: BLE001 - any Redis trouble: said in one line, the file still holds it
            redis_problem = f"Redis {redact_url(url)} unreachable ({type(e).__name__}: {e})"
    if not where:
        print(f"easgate revoke: nothing stored: {redis_problem}; try again when Redis answers, or set "
              "authorization.revocations", file=sys.stderr)
        return 2
    if args.restore:
        print(f"restored {args.user} on {args.device_id} in {' and '.join(where)}: new requests are decided as before")
    else:
        print(f"revoked {args.user} on {args.device_id} in {' and '.join(where)}: every "
              f"{'node' if url and not redis_problem else 'worker'} denies it and closes its held requests "
              f"within {'5 seconds' if url and not redis_problem else 'a second'}")
    if redis_problem:
        print(f"easgate revoke: {done} on this machine only for now: {redis_problem}; the gateways here pass "
              "it on when Redis answers", file=sys.stderr)
    return 0


def cmd_pki(args) -> int:
    if args.revoke:
        for name in args.revoke:
            try:
                crl = revoke(Path(args.dir), name)
            except ValueError as e:
                print(f"easgate: {e}", file=sys.stderr)
                return 2
            print(f"revoked {name}: {Path(args.dir).resolve() / 'index.txt'} and {crl} updated "
                  "(restart an `openssl ocsp -index` responder so it reads the index again)")
        return 0
    files = generate_pki(Path(args.dir), hostnames=tuple(args.hostname or ()) or ("mail.example.test", "localhost", "127.0.0.1"),
                         force=args.force, ocsp_url=args.ocsp_url)
    print(f"demo PKI in {Path(args.dir).resolve()}: {len(files)} files (see README.txt there)")
    return 0


def version_line() -> str:
    """What `easgate --version` prints: the versions that decide how the gateway behaves."""
    return (f"easgate {__version__} (mitmproxy {mitmproxy_version.VERSION}, "
            f"Python {platform.python_version()})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="easgate", description="easgate: a secure mail gateway for Exchange ActiveSync, on mitmproxy. "
        "Start with `easgate pki certs`, `easgate check CONFIG` and `easgate run CONFIG` (README.md, docs/).")
    p.add_argument("--version", action="version", version=version_line(),
                   help="print easgate's version (and mitmproxy's and Python's) and exit")
    sub = p.add_subparsers(dest="cmd", required=True)

    for name, fn, helptext in (("run", cmd_run, "run the gateway (lean mitmproxy master, N worker processes)"),
                               ("web", cmd_web, "run the gateway with mitmweb's UI")):
        s = sub.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + ".")
        s.add_argument("config", help="gateway YAML, e.g. policies/gateway.yaml")
        s.add_argument("--listen", metavar="HOST:PORT",
                       help="listen here instead of the config's listen (port 0 picks a free one)")
        s.epilog = (f"Further {'mitmdump' if name == 'run' else 'mitmweb'} arguments go after --, e.g. "
                    f"easgate {name} policies/gateway.yaml -- --set easgate_metrics=127.0.0.1:9090. "
                    "See docs/configuration.md.")
        if name == "run":
            s.add_argument("--workers", type=int, metavar="N",
                           help="worker processes sharing the port (SO_REUSEPORT); default: one per CPU core. "
                                "1 runs the gateway in this process, without a supervisor")
            s.add_argument("--full", action="store_true",
                           help="run mitmproxy's full DumpMaster (all ~36 mitmdump addons) instead of the lean master")
            s.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                           help="on SIGTERM/Ctrl-C, how long requests in flight may take to finish (default 10); "
                                "SIGHUP reloads the config without stopping (docs/operations.md)")
            s.add_argument("--reload-grace", type=float, default=3600.0, metavar="SECONDS",
                           help="on SIGHUP (reload), how long the replaced workers may take to finish their "
                                "requests in flight, held Pings included (default 3600: the longest Ping)")
            s.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
        s.set_defaults(fn=fn)

    s = sub.add_parser("check", help="validate a config and print its resolved routes",
                       description="Validate a gateway config as a start would (every certificate, key, CA file and "
                                   "policy is read) and print the listener, the routes in priority order, the pools "
                                   "and the authorization (policy, connector, fail mode, cache, audit log). Writes "
                                   "nothing. Exit status 0 when valid, 2 with one line naming file, key and fix.")
    s.add_argument("config", help="gateway YAML, e.g. policies/gateway.yaml")
    s.set_defaults(fn=cmd_check)

    s = sub.add_parser("revoke", help="deny a user's device now, on every worker, and close its held requests")
    s.add_argument("config", help="the gateway YAML (its authorization.revocations file is appended to)")
    s.add_argument("user", help=r"alice, CONTOSO\alice, alice@contoso.com, or * for every user of the device")
    s.add_argument("device_id", help="the ActiveSync DeviceId (any case)")
    s.add_argument("--reason", default="revoked by an operator", help="recorded in the audit log")
    s.add_argument("--restore", action="store_true", help="lift the revocation instead")
    s.set_defaults(fn=cmd_revoke)

    s = sub.add_parser("pki", help="create a throw-away demo PKI",
                       description="Create a throw-away PKI for trying easgate: a public CA and the gateway's "
                                   "certificate, an internal CA and the stand-in Exchange's, the MDM's device CA "
                                   "and root CA with device certificates (valid, expired, not yet valid, rogue), "
                                   "and a CRL. DIR/README.txt lists the files. Not for production: bring your own "
                                   "certificates there.")
    s.add_argument("dir", help="directory to create it in, e.g. certs (policies/gateway.yaml expects ./certs)")
    s.add_argument("--hostname", action="append", metavar="NAME",
                   help="a name for the gateway certificate (repeatable; default mail.example.test, localhost, "
                        "127.0.0.1)")
    s.add_argument("--force", action="store_true", help="make a new PKI even if DIR already holds one")
    s.add_argument("--ocsp-url", metavar="URL", help="OCSP responder URL for the device certificates' AIA, e.g. http://127.0.0.1:8888/")
    s.add_argument("--revoke", action="append", metavar="NAME",
                   help="revoke a device certificate (e.g. device-ipad) in index.txt and device-ca.crl (repeatable)")
    s.set_defaults(fn=cmd_pki)

    # Further command groups live next to their code; each module offers add_commands(sub).
    for mod in COMMAND_MODULES:
        mod.add_commands(sub)
    _describe(p)
    return p


def _describe(parser: argparse.ArgumentParser) -> None:
    """A command without a description shows its one-line help on top of its --help."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in action._choices_actions}
            for name, sp in action.choices.items():
                if not sp.description and helps.get(name):
                    sp.description = helps[name][0].upper() + helps[name][1:] + "."
                _describe(sp)


# modules with an add_commands(subparsers) function: demo, connector and devices, import-netscaler,
# replay and capture, standins, policy check/install
COMMAND_MODULES = (demo, standins, connector_commands, netscaler, replay, policyfile)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:  # everything after -- goes to mitmproxy untouched
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = build_parser().parse_args(argv)
    args.mitmproxy_args = extra
    if args.cmd in ("run", "web"):
        try:
            args.listen, args.mitmproxy_args = _take_listen(args.listen, extra)
        except ValueError as e:
            print(f"easgate: {e}", file=sys.stderr)
            return 2
    return args.fn(args) or 0


if __name__ == "__main__":
    sys.exit(main())
