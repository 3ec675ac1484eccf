"""Replay captured device traffic through the gateway's decision logic, and compare.

A capture is a mitmproxy flow file written by a gateway (``easgate run CONFIG -- -w FILE``): each
flow carries the decision the gateway made in ``flow.metadata`` (``easgate.route``,
``easgate.decision``, ``easgate.refused``...), which mitmproxy saves with the flow. Replaying it
asks the gateway again and compares, so a capture is a regression test for a config or a policy.

Offline (no upstream, no network; like XenMobile NetScaler Connector's "simulate ActiveSync
traffic")::

    easgate replay tests/captures/iphone-managed.mitm --config tests/captures/gateway.yaml

reads the flows with mitmproxy's FlowReader and runs each through a mitmproxy master holding only
the gateway's addons (``Master.load_flow``: the same hook sequence as ``mitmdump -n -r``). The
same thing works inside plain mitmproxy::

    mitmdump -n -r CAPTURE -s addons/replay.py --set server=false --set easgate_config=CONFIG --set easgate_replay=true

With ``easgate_replay`` on, `ReplayCheck` (put in front of the gateway's addons by this tool) takes every flow read
from a file (``flow.live`` is False) before the gateway sees it: it keeps the recorded outcome
aside (``flow.metadata[keys.RECORDED]``), clears the recorded response, error, comment, mark
and the gateway's metadata (the gateway does not decide flows that already have a response), and
removes the client-certificate header the recording gateway had inserted. After the gateway
decided, it compares and logs one line per flow and a summary (``--set
easgate_replay_report=FILE`` also writes one JSON line per flow).

Offline replay writes nothing and calls nobody unless asked: the config's audit log is not
opened (``--audit-log FILE`` / ``easgate_replay_audit`` writes the replayed decisions to FILE),
and the connector is not called (it would record the replayed devices as seen): where the
capture holds the connector's answer for a request, that answer is used again; where it holds
none, the replay says so and the fail mode decides. ``--connector`` /
``easgate_replay_connector`` calls the configured connector instead.

What is compared: the route and the decision (``allow``, ``deny``, ``pass`` for a route without
authorization, ``refused`` for a connection the gateway would not serve, ``no route``); with
``--strict`` also the reason and the source. Decisions come from the config's backends: a policy
file is read as the gateway reads it; a connector answers as recorded, or, with ``--connector``,
is called as the gateway would call it (start it first). The captures in tests/captures/ are
recorded with a policy file, tests/captures/policy.yaml, so they replay with nothing else
running. The decision cache
works as in the gateway, so a capture replayed in its recorded order hits the cache where the
recording did.

Client certificates are verified as of the time the capture was made (``--cert-time capture``,
the default: a capture stays a valid test after its certificates expired); ``--cert-time now``
verifies them at the current time. A connection the live gateway would have refused (no or
invalid certificate where one is required) is reported as ``refused``.

Against a live gateway (real TLS, real upstreams), with mitmproxy's client replay::

    easgate replay CAPTURE --target 127.0.0.1:8443 --cafile certs/public-ca.pem --client-certs certs/

sends every captured request, as the device sent it (the Host header and SNI it used, its
headers and body, without the certificate header the recording gateway added), to the gateway
at TARGET, presenting the client certificate the device presented: the certificate in
``--client-certs`` (a directory of ``NAME.pem`` + ``NAME.key``, e.g. an ``easgate pki``
directory) with the same subject and issuer as the captured one (the leaf only: the gateway must
trust the device's issuing CA, as a device-CA + root-CA setup does). It compares the response
status with the recorded one. Each request goes on its own connection, one at a time.

Exit status: 0 every flow as recorded, 1 at least one differs, 2 usage, file or config errors.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mitmproxy import ctx, exceptions, http

from ..authz import identity
from ..authz.audit import AuditLog
from ..authz.policy import PolicyError, PolicyStore
from ..core import keys
from ..core.decision import one_line
from ..core.errors import ConfigError
from ..core.net import parse_port, split_hostport
from ..gateway.authorize import ActiveSyncGate, command_key_conflict
from ..gateway.certheader import fold
from ..gateway.chain import make_addons, validate_config
from ..gateway.config import DEFAULT_CERT_HEADER, GatewayConfig
from ..gateway.xnc import Answer, ConnectorError
from . import capture

logger = logging.getLogger("easgate.replay")

CERT_TIMES = ("capture", "now")


# ---------------------------------------------------------------------------------------------
# Outcomes


@dataclass
class Outcome:
    """What the gateway did with one request."""

    route: str | None
    decision: str  # allow | deny | pass | refused | no route | ? (not recorded)
    reason: str = ""
    source: str = ""
    status: int | None = None
    cert: str = ""  # the client certificate verdict: none | verified | invalid ("" unknown)
    rule: str = ""  # the command rule or rate limit that applied ("" none)

    def key(self, strict: bool) -> tuple:
        # A refused connection is refused before routing: the live gateway records neither a route
        # nor a certificate verdict for it, the replay shows both. Refused is refused.
        base = (None, self.decision, "") if self.decision == "refused" else (self.route, self.decision, self.cert)
        return (*base, self.reason, self.source) if strict else base

    def as_dict(self) -> dict:
        return {"route": self.route, "decision": self.decision, "reason": self.reason, "source": self.source,
                "status": self.status, "cert": self.cert, "rule": self.rule}

    @classmethod
    def from_dict(cls, d: dict) -> Outcome:
        return cls(d.get("route"), d.get("decision", "?"), d.get("reason", ""), d.get("source", ""), d.get("status"),
                   d.get("cert", ""), d.get("rule") or "")

    def describe(self) -> str:
        if self.decision in ("allow", "deny") and self.source:
            return f"{self.decision} ({self.source})"
        return self.decision


def outcome_of(flow: http.HTTPFlow, refused: str | None = None) -> Outcome:
    """The gateway's outcome as recorded on the flow's metadata (or `refused`, computed offline)."""
    m = flow.metadata
    status = flow.response.status_code if flow.response is not None else None
    cc = m.get(keys.CLIENT_CERT) or {}
    cert = cc.get("status", "")
    why = refused or m.get(keys.REFUSED)
    if why:
        return Outcome(m.get(keys.ROUTE), "refused", str(why), "tls", status, cert)
    if keys.ROUTE not in m:
        return Outcome(None, "?", "no decision recorded (not captured through an easgate gateway?)", "", status, cert)
    route = m[keys.ROUTE]
    if route is None:
        return Outcome(None, "no route", "no route matched: 404 from the gateway", "", status, cert)
    d = m.get(keys.DECISION)
    if d is None:
        why = "route does not authorize"
        if cert == "verified":
            why += f"; client certificate {cc.get('subject')} verified"
        elif cert and cert != "none":
            why += f"; client certificate {cert}: {cc.get('reason')}"
        return Outcome(route, "pass", why, "", status, cert)
    return Outcome(route, "allow" if d.get("allow") else "deny", d.get("reason", ""), d.get("source", ""), status,
                   cert, m.get(keys.RULE) or "")


def identity_of(flow: http.HTTPFlow) -> dict:
    """user/device/command of a flow: the gateway's identity if it made one, else parsed here."""
    ident = flow.metadata.get(keys.IDENTITY)
    if ident:
        return ident
    req = flow.request
    peer = flow.client_conn.peername[0] if flow.client_conn and flow.client_conn.peername else ""
    i = identity.parse_request(req.method, "https", req.host_header or "", req.path, req.headers, peer)
    return {k: getattr(i, k) for k in i.__slots__}


@dataclass
class Result:
    index: int
    flow_id: str
    method: str
    path: str
    user: str | None
    device: str | None
    command: str | None
    replayed: Outcome
    recorded: Outcome
    strict: bool = False
    capture: str = ""

    @property
    def compared(self) -> bool:
        return self.recorded.decision != "?"

    @property
    def differs(self) -> bool:
        return self.compared and self.replayed.key(self.strict) != self.recorded.key(self.strict)

    def as_dict(self) -> dict:
        return {"capture": self.capture, "index": self.index, "flow": self.flow_id, "method": self.method,
                "path": self.path, "user": self.user, "device": self.device, "command": self.command,
                "replayed": self.replayed.as_dict(), "recorded": self.recorded.as_dict(),
                "differs": self.differs}


# ---------------------------------------------------------------------------------------------
# The addon


class RecordedConnector:
    """Stands in for the connector in an offline replay: answers what the capture says the
    connector answered for the flow being replayed, and calls nobody (a real call would record
    the replayed device as seen in the connector's inventory)."""

    calls = 0
    connections_opened = 0

    def __init__(self) -> None:
        self.recorded: dict | None = None  # the recorded outcome of the flow being decided

    async def authorize(self, user, agent, ip, url, device_id, extra: dict[str, str] | None = None) -> Answer:
        r = self.recorded or {}
        if r.get("source") == "connector" and r.get("decision") in ("allow", "deny"):
            return Answer(r["decision"] == "allow", r.get("reason") or "connector (recorded)")
        raise ConnectorError("the connector is not called in an offline replay and the capture holds no "
                             "connector answer for this request (--connector calls it)")

    def close(self) -> None:
        pass


class ReplayCheck:
    """Re-decides flows read from a file (easgate_replay) and compares with the recorded decision.

    It must run before the gateway's own addons (`replay_addons` puts it first; the production chain never carries it).
    """

    def __init__(self, gw) -> None:
        self.gw = gw
        self.results: list[Result] = []
        self._at: datetime.datetime | None = None
        self._wrapped = None
        self._report = None
        self.connector = RecordedConnector()

    def load(self, loader) -> None:
        loader.add_option("easgate_replay", bool, False,
                          "Decide again every flow read from a file (mitmdump -n -r CAPTURE) and compare with the "
                          "decision recorded in it: recorded responses are set aside first.")
        loader.add_option("easgate_replay_cert_time", str, "capture",
                          "Replay: verify client certificates as of the capture (capture) or now (now).")
        loader.add_option("easgate_replay_strict", bool, False,
                          "Replay: a different reason or source also counts as a difference.")
        loader.add_option("easgate_replay_report", str, "",
                          "Replay: also write one JSON line per replayed flow to this file.")
        loader.add_option("easgate_replay_audit", str, "",
                          "Replay: write the replayed decisions to this audit log (by default none is written; "
                          "the config's audit_log is never opened).")
        loader.add_option("easgate_replay_connector", bool, False,
                          "Replay: call the config's connector (by default its recorded answers are used and "
                          "it is not contacted).")

    def configure(self, updated) -> None:
        if "easgate_replay_cert_time" in updated and ctx.options.easgate_replay_cert_time not in CERT_TIMES:
            raise exceptions.OptionsError(
                f"easgate_replay_cert_time: '{ctx.options.easgate_replay_cert_time}' is not one of capture, now")
        if "easgate_replay_report" in updated:
            if self._report:
                self._report.close()
                self._report = None
            if ctx.options.easgate_replay_report:
                try:
                    self._report = open(ctx.options.easgate_replay_report, "w", encoding="utf-8", buffering=1)
                except OSError as e:
                    raise exceptions.OptionsError(f"easgate_replay_report: cannot write "
                                                  f"{ctx.options.easgate_replay_report}: {e.strerror}")
        self._install_clock()
        gate = self._gate()
        if gate is not None:
            if {"easgate_config", "easgate_replay_audit"} & set(updated):
                trail = self.gw.audit
                path = ctx.options.easgate_replay_audit
                try:
                    log = AuditLog(Path(path).resolve() if path else None)
                except ConfigError as e:
                    raise exceptions.OptionsError(f"easgate_replay_audit: {e.problem}") from None
                trail.log.close()
                trail.log = log
            if gate.connector is not None and not ctx.options.easgate_replay_connector \
                    and not isinstance(gate.connector, RecordedConnector):
                gate.connector.close()
                gate.connector = self.connector

    def _gate(self) -> ActiveSyncGate | None:
        return next((a for a in self.gw.addons if isinstance(a, ActiveSyncGate)), None)

    def _install_clock(self) -> None:
        """Let the gateway's certificate verifier see the capture's time while a flow is replayed."""
        verifier = getattr(self.gw.tls, "verifier", None)
        if not ctx.options.easgate_replay or verifier is None or verifier is self._wrapped:
            return
        original = verifier.verify_chain

        def verify_chain(chain, now=None, _original=original):
            return _original(chain, now or self._at)

        verifier.verify_chain = verify_chain
        self._wrapped = verifier

    def _on(self, flow) -> bool:
        return (bool(ctx.options.easgate_replay) and isinstance(flow, http.HTTPFlow) and not flow.live
                and not flow.is_replay)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._at = None
        if not self._on(flow) or keys.RECORDED in flow.metadata:
            return
        prepare(flow, self.gw)
        self.connector.recorded = flow.metadata[keys.RECORDED]
        gate = self._gate()
        if gate is not None:  # rate limits count in the capture's time, not the replay's (a burst)
            ts = flow.request.timestamp_start
            gate.limiter.clock = (lambda: ts) if ts else time.monotonic
        if ctx.options.easgate_replay_cert_time == "capture":
            ts = flow.client_conn.timestamp_start or flow.request.timestamp_start
            if ts:
                self._at = datetime.datetime.fromtimestamp(ts, datetime.UTC)

    def request(self, flow: http.HTTPFlow) -> None:
        if not self._on(flow) or keys.RECORDED not in flow.metadata or keys.REPLAYED in flow.metadata:
            return
        refused = None
        try:
            refused = self.gw.tls.refuse_reason(flow.client_conn)  # the verdict made at the capture's time
        except Exception as e:  # the live gateway would not have served it either
            refused = f"certificate check failed: {e}"
        self._at = None
        new = outcome_of(flow, refused)
        old = Outcome.from_dict(flow.metadata[keys.RECORDED])
        ident = identity_of(flow)
        r = Result(len(self.results) + 1, flow.id, flow.request.method, flow.request.path,
                   ident.get("user"), ident.get("device_id"), ident.get("command"), new, old,
                   strict=bool(ctx.options.easgate_replay_strict),
                   capture=(ctx.options.rfile or "") if "rfile" in ctx.options else "")
        self.results.append(r)
        flow.metadata[keys.REPLAYED] = {"differs": r.differs, "recorded": old.as_dict()}
        line = (f"easgate replay: #{r.index} {r.method} {r.user or '-'} {r.device or '-'} {r.command or '-'}: "
                f"route={new.route or '-'} {new.describe()}: {new.reason}")
        if r.differs:
            logger.warning(line + f" -- DIFFERS from the capture: route={old.route or '-'} {old.describe()}: "
                           f"{old.reason}")
        else:
            logger.info(line + (" (as recorded)" if r.compared else " (nothing recorded)"))
        if self._report:
            self._report.write(json.dumps(r.as_dict(), ensure_ascii=False) + "\n")

    def done(self) -> None:
        if self.results:
            n = sum(r.differs for r in self.results)
            (logger.warning if n else logger.info)(
                f"easgate replay: {len(self.results)} flows, {n} differ from the capture")
        if self._report:
            self._report.close()
            self._report = None


def prepare(flow: http.HTTPFlow, gw=None) -> Outcome:
    """Set the recorded outcome aside and clear what the recording gateway left on the flow."""
    rec = outcome_of(flow)
    flow.metadata = {k: v for k, v in flow.metadata.items() if not k.startswith("easgate.")}
    flow.metadata[keys.RECORDED] = rec.as_dict()
    flow.response = None
    flow.error = None
    flow.comment = ""
    flow.marked = ""
    strip_inserted_cert_headers(flow, gw)
    return rec


def strip_inserted_cert_headers(flow: http.HTTPFlow, gw=None) -> None:
    """Remove the certificate header a gateway inserted: the client never sent one (the gateway
    removes client-sent ones before routing, so a capture holds only inserted ones)."""
    folded = set(getattr(getattr(gw, "strip", None), "folded", ()) or ()) | {fold(DEFAULT_CERT_HEADER)}
    h = flow.request.headers
    if any(fold(k.decode("latin-1")) in folded for k, _ in h.fields):
        h.fields = tuple((k, v) for k, v in h.fields if fold(k.decode("latin-1")) not in folded)


# ---------------------------------------------------------------------------------------------
# Offline: a mitmproxy master with the gateway's addons


def replay_addons() -> list:
    """The gateway's addons with `ReplayCheck` in front (it must see a flow read from a file
    before the gateway does); the production chain never carries it."""
    addons = make_addons()
    gw = addons[0]
    gw.overrides["audit_log"] = None  # a replay never writes the production audit log (see ReplayCheck)
    gw.addons.insert(0, ReplayCheck(gw))
    return addons


def _gateway_addons():
    addons = replay_addons()
    gw = addons[0]
    return addons, gw, gw.addons[0]


async def run_offline(paths: list[Path], config: Path, *, cert_time: str = "capture", strict: bool = False,
                      verbosity: str = "warn", audit_log: Path | None = None,
                      call_connector: bool = False, policy: Path | None = None) -> list[Result]:
    """Replay each capture file through a fresh gateway (its own decision cache, as when it was
    recorded); returns one Result per HTTP flow. `policy`: decide with this policy file instead of
    the config's (what-if)."""
    results: list[Result] = []
    for p in paths:
        for r in await _offline_one(p, config, cert_time=cert_time, strict=strict, verbosity=verbosity,
                                    audit_log=audit_log, call_connector=call_connector, policy=policy):
            r.capture = str(p)
            results.append(r)
    return results


async def _offline_one(path: Path, config: Path, *, cert_time: str, strict: bool, verbosity: str,
                       audit_log: Path | None, call_connector: bool, policy: Path | None = None) -> list[Result]:
    from mitmproxy import io, master, options
    from mitmproxy.addons import termlog

    opts = options.Options()
    m = master.Master(opts)
    log = termlog.TermLog(sys.stderr)
    m.addons.add(log)
    addons, gw, rc = _gateway_addons()
    m.addons.add(*addons)
    try:
        # one update: the gateway loads its config on the first change it sees (OptionsError if bad)
        opts.update(easgate_config=str(Path(config).resolve()), termlog_verbosity=verbosity, easgate_replay=True,
                    easgate_replay_cert_time=cert_time, easgate_replay_strict=strict,
                    easgate_replay_audit=str(audit_log) if audit_log else "",
                    easgate_replay_connector=call_connector)
        if policy is not None:
            gate = next(a for a in gw.addons if isinstance(a, ActiveSyncGate))
            gate.policy = PolicyStore(policy)
        await m.running()
        try:
            with open(path, "rb") as f:
                for fl in io.FlowReader(f).stream():
                    if isinstance(fl, http.HTTPFlow):
                        await m.load_flow(fl)
        finally:
            await m.done()
    finally:
        log.uninstall()
    return rc.results


# ---------------------------------------------------------------------------------------------
# Live: mitmproxy's client replay against a running gateway


class ClientCertPicker:
    """Presents, per replayed request, the certificate whose subject and issuer match the captured one."""

    def __init__(self, directory: Path | None) -> None:
        self.by_name: dict[tuple[str, str], tuple[object, object]] = {}
        self.missing: set[str] = set()
        if directory is not None:
            self._load(Path(directory))

    def _load(self, d: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        for pem in sorted(d.glob("*.pem")):
            key_file = pem.with_suffix(".key")
            if not key_file.is_file():
                continue
            try:
                certs = x509.load_pem_x509_certificates(pem.read_bytes())
                key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
            except (ValueError, TypeError):
                continue
            if not certs:
                continue
            leaf = certs[0]
            name = (leaf.subject.rfc4514_string(), leaf.issuer.rfc4514_string())
            self.by_name.setdefault(name, (leaf, key))

    def pick(self, client) -> tuple[object, object] | None:
        chain = getattr(client, "certificate_list", None) or []
        if not chain:
            return None
        leaf = chain[0].to_cryptography()
        name = (leaf.subject.rfc4514_string(), leaf.issuer.rfc4514_string())
        found = self.by_name.get(name)
        if found is None and name[0] not in self.missing:
            self.missing.add(name[0])
            logger.warning(f"easgate replay: no certificate for {name[0]} (issuer {name[1]}) in --client-certs; "
                           "replaying without one")
        return found

    def tls_start_server(self, tls_start) -> None:
        picked = self.pick(tls_start.context.client)
        if picked is None or tls_start.ssl_conn is None:
            return
        from OpenSSL import crypto

        cert, key = picked
        tls_start.ssl_conn.use_certificate(crypto.X509.from_cryptography(cert))
        tls_start.ssl_conn.use_privatekey(crypto.PKey.from_cryptography_key(key))


class LiveCollector:
    """Collects the response of every replayed request."""

    def __init__(self) -> None:
        self.statuses: dict[str, tuple[int | None, str]] = {}

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.is_replay == "request":
            self.statuses[flow.id] = (flow.response.status_code, "")

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.is_replay == "request":
            self.statuses[flow.id] = (None, flow.error.msg if flow.error else "error")


def prepare_live(flow: http.HTTPFlow, host: str, port: int) -> Outcome:
    """Point a captured request at the live gateway, as the device sent it."""
    rec = outcome_of(flow)
    flow.metadata[keys.RECORDED] = rec.as_dict()
    host_header = flow.request.host_header  # what the device sent (and the SNI it used)
    flow.request.scheme = "https"
    flow.request.host = host
    flow.request.port = port
    if host_header:
        flow.request.host_header = host_header
    strip_inserted_cert_headers(flow)
    return rec


async def run_live(paths: list[Path], target: tuple[str, int], *, cafile: str | None, client_certs: Path | None,
                   insecure: bool = False, verbosity: str = "warn", timeout_s: float = 60) -> list[Result]:
    from mitmproxy import io, options
    from mitmproxy.addons import termlog
    from mitmproxy.tools.dump import DumpMaster

    flows: list[http.HTTPFlow] = []
    source: dict[str, str] = {}
    for p in paths:
        with open(p, "rb") as f:
            for fl in io.FlowReader(f).stream():
                if isinstance(fl, http.HTTPFlow):
                    flows.append(fl)
                    source[fl.id] = str(p)
    recorded = {fl.id: (prepare_live(fl, *target), identity_of(fl), fl.request.method, fl.request.path)
                for fl in flows}
    with tempfile.TemporaryDirectory(prefix="easgate-replay-") as tmp:
        prepared = Path(tmp) / "replay.mitm"
        with open(prepared, "wb") as f:
            w = io.FlowWriter(f)
            for fl in flows:
                w.add(fl)
        opts = options.Options()
        m = DumpMaster(opts, with_termlog=False, with_dumper=False)
        collector = LiveCollector()
        m.addons.add(termlog.TermLog(sys.stderr), ClientCertPicker(client_certs), collector)
        opts.update(termlog_verbosity=verbosity, server=False, ssl_insecure=insecure,
                    ssl_verify_upstream_trusted_ca=cafile, http2=False,
                    connection_strategy="lazy")
        opts.update(client_replay=[str(prepared)])
        task = asyncio.ensure_future(m.run())
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout_s)
        except TimeoutError:
            logger.error(f"easgate replay: not finished after {timeout_s:g}s; stopping")
            m.shutdown()
            await task
    results = []
    for i, fl in enumerate(flows, 1):
        rec, ident, method, path = recorded[fl.id]
        status, err = collector.statuses.get(fl.id, (None, "not replayed"))
        got = Outcome(rec.route, rec.decision, err or "", "", status)
        r = Result(i, fl.id, method, path, ident.get("user"), ident.get("device_id"), ident.get("command"),
                   got, rec, capture=source[fl.id])
        results.append(r)
    return results


def live_differs(r: Result) -> bool:
    return r.replayed.status != r.recorded.status


# ---------------------------------------------------------------------------------------------
# Output


def _cell(v, width: int) -> str:
    s = "-" if v in (None, "") else one_line(v)  # a capture's values are a client's: no terminal escapes
    return s if len(s) <= width else s[: width - 1] + "…"


def format_table(results: list[Result], *, live: bool = False) -> str:
    cols = [("flow", 12), ("user", 20), ("device", 33), ("command", 11), ("route", 11), ("cert", 8),
            ("decision", 18)]
    head = "  ".join(f"{n:<{w}}" for n, w in cols) + ("  status: recorded -> live" if live else "  reason")
    lines: list[str] = []
    capture = None
    for r in results:
        if r.capture != capture:
            capture = r.capture
            if lines:
                lines.append("")
            lines += [f"{capture}:", head]
        flow = f"{r.index:>3} {r.method}"
        shown = r.recorded if live else r.replayed
        row = [flow, r.user, r.device, r.command, shown.route, shown.cert, shown.describe()]
        text = "  ".join(f"{_cell(v, w):<{w}}" for v, (_, w) in zip(row, cols))
        if live:
            differs = live_differs(r)
            tail = f"{r.recorded.status or '-'} -> {r.replayed.status or r.replayed.reason or '-'}"
        else:
            differs = r.differs
            tail = r.replayed.reason
        lines.append(("!" if differs else " ") + text[1:] + "  " + tail)
        if differs and not live:
            lines.append(f"{'':>14}recorded: route={r.recorded.route or '-'} cert={r.recorded.cert or '-'} "
                         f"{r.recorded.describe()}: {r.recorded.reason}")
    return "\n".join(lines)


def summary(results: list[Result], *, live: bool = False) -> tuple[str, int]:
    if live:
        n = sum(live_differs(r) for r in results)
        return f"{len(results)} flows replayed: {len(results) - n} with the recorded status, {n} differ", n
    n = sum(r.differs for r in results)
    unrecorded = sum(not r.compared for r in results)
    extra = f", {unrecorded} without a recorded decision" if unrecorded else ""
    return f"{len(results)} flows: {len(results) - n - unrecorded} as recorded, {n} differ{extra}", n


@dataclass
class Change:
    """One request whose decision a new policy changes."""

    capture: str
    index: int
    user: str | None
    device: str | None
    command: str | None
    before: Outcome
    after: Outcome

    @property
    def rule(self) -> str:
        """The command rule or rate limit behind the new decision, else the one behind the old."""
        return self.after.rule or self.before.rule

    def as_dict(self) -> dict:
        return {"capture": self.capture, "index": self.index, "user": self.user, "device": self.device,
                "command": self.command, "rule": self.rule or None, "before": self.before.as_dict(),
                "after": self.after.as_dict()}

    def line(self) -> str:
        rule = self.after.rule or "-"
        if self.before.rule and self.before.rule != self.after.rule:
            rule += f" (was {self.before.rule})"
        return (f"{self.capture} #{self.index}  user={self.user or '-'} device={self.device or '-'} "
                f"command={self.command or '-'}: {self.before.describe()} -> {self.after.describe()}  "
                f"rule: {rule}  reason: {self.after.reason or '-'} (was: {self.before.reason or '-'})")


def what_if(before: list[Result], after: list[Result]) -> list[Change]:
    """The requests whose route or decision differs between two replays of the same captures."""
    changes = []
    for b, a in zip(before, after, strict=True):
        if (b.replayed.route, b.replayed.decision) != (a.replayed.route, a.replayed.decision):
            changes.append(Change(a.capture, a.index, a.user, a.device, a.command, b.replayed, a.replayed))
    return changes


def _what_if(args, paths: list[Path], verbosity: str, cfg: GatewayConfig) -> int:
    new = Path(args.policy)
    try:
        conflict = command_key_conflict(PolicyStore(new).policy, cfg.authorization)
        if conflict is not None:
            raise conflict
    except PolicyError as e:
        print(f"easgate replay: --policy {new}: {e}", file=sys.stderr)
        return 2
    before = asyncio.run(run_offline(paths, Path(args.config), cert_time=args.cert_time, verbosity=verbosity))
    after = asyncio.run(run_offline(paths, Path(args.config), cert_time=args.cert_time, verbosity=verbosity,
                                    policy=new))
    changes = what_if(before, after)
    for c in changes:
        print(json.dumps(c.as_dict(), ensure_ascii=False) if args.json else c.line())
    print(f"{len(after)} requests replayed with {new} instead of the config's policy: "
          f"{len(changes)} decisions would change", file=sys.stderr if args.json else sys.stdout)
    return 1 if changes else 0


def _target(value: str) -> tuple[str, int]:
    try:
        host, port = split_hostport(value)
        if port is None:
            raise ValueError(f"'{value}' is not HOST:PORT")
        return host or "127.0.0.1", parse_port(port, value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_replay(args) -> int:
    paths = [Path(p) for p in args.capture]
    for p in paths:
        if not p.is_file():
            print(f"easgate replay: {p}: no such file", file=sys.stderr)
            return 2
    verbosity = "info" if args.verbose else "warn"
    live = args.target is not None
    if live and args.policy:
        print("easgate replay: --policy replays offline (with --config), not against --target", file=sys.stderr)
        return 2
    try:
        if live:
            results = asyncio.run(run_live(paths, args.target, cafile=args.cafile, client_certs=args.client_certs,
                                           insecure=args.insecure, verbosity=verbosity))
        else:
            if not args.config:
                print("easgate replay: --config CONFIG is required (or --target HOST:PORT for a live gateway)",
                      file=sys.stderr)
                return 2
            try:
                cfg = validate_config(args.config)
            except ConfigError as e:
                print(f"easgate: config error: {e}", file=sys.stderr)
                return 2
            if args.policy:  # the per-flow "differs from the capture" lines are not the question here
                return _what_if(args, paths, verbosity if args.verbose else "error", cfg)
            results = asyncio.run(run_offline(paths, Path(args.config), cert_time=args.cert_time,
                                              strict=args.strict, verbosity=verbosity, audit_log=args.audit_log,
                                              call_connector=args.connector))
    except exceptions.OptionsError as e:
        print(f"easgate replay: config error: {e}", file=sys.stderr)
        return 2
    except (OSError, exceptions.FlowReadException) as e:
        print(f"easgate replay: {e}", file=sys.stderr)
        return 2
    if args.json:
        for r in results:
            print(json.dumps(r.as_dict(), ensure_ascii=False))
    else:
        print(format_table(results, live=live))
    text, differ = summary(results, live=live)
    print(text, file=sys.stderr if args.json else sys.stdout)
    return 1 if differ else 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("replay", help="replay captured device traffic through the gateway's decisions and compare",
                       description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="Exit status: 0 every flow as recorded, 1 some flow differs, 2 errors. "
                              "See docs/operations.md.")
    s.add_argument("capture", nargs="+", help="mitmproxy flow file(s) written by a gateway (-w)")
    s.add_argument("--config", help="gateway YAML whose decision logic to replay against (offline)")
    s.add_argument("--cert-time", choices=CERT_TIMES, default="capture",
                   help="verify client certificates as of the capture (default) or now")
    s.add_argument("--strict", action="store_true", help="a different reason or source also counts as a difference")
    s.add_argument("--audit-log", type=Path, metavar="FILE",
                   help="offline: write the replayed decisions to this audit log (default: none; the config's "
                        "audit_log is never written)")
    s.add_argument("--connector", action="store_true",
                   help="offline: call the config's connector (default: reuse its answers recorded in the capture; "
                        "a call records the device as seen)")
    s.add_argument("--policy", metavar="NEW.yaml",
                   help="what-if: replay with the config's policy and with this one instead (its lists, inventory, "
                        "command rules and rate limits); list every decision that would change (device, command, "
                        "before, after, rule); exit 1 if any")
    s.add_argument("--json", action="store_true", help="one JSON object per flow instead of the table")
    s.add_argument("-v", "--verbose", action="store_true", help="show the gateway's log")
    s.add_argument("--target", type=_target, metavar="HOST:PORT",
                   help="replay against this live gateway (mitmproxy client replay) instead of offline")
    s.add_argument("--cafile", help="--target: CA file that verifies the gateway's certificate")
    s.add_argument("--insecure", action="store_true", help="--target: do not verify the gateway's certificate")
    s.add_argument("--client-certs", type=Path, metavar="DIR",
                   help="--target: directory of NAME.pem + NAME.key client certificates (e.g. an easgate pki "
                        "directory); the one matching the captured certificate is presented")
    s.set_defaults(fn=cmd_replay)
    capture.add_commands(sub)
