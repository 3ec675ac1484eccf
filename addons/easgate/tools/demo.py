"""`easgate demo`: the whole setup on one machine, without XenMobile, NetScaler or Exchange.

Starts, on 127.0.0.1 only and with the throw-away PKI (DIR/certs):

* a stand-in Exchange (HTTPS, certificate from the internal CA) that answers ActiveSync
  OPTIONS/POST the way Exchange does,
* a stand-in MDM server (HTTP) that echoes the client-certificate header it received,
* easgate's connector over a small demo inventory (DIR/devices.db, from policies/demo-inventory.csv),
* the gateway in front of them (`easgate run DIR/gateway.yaml`, a subprocess: the real thing),

then prints what it started and two ready-to-paste curl commands: alice's managed iPhone (allowed)
and her unmanaged iPad (denied). `--scenario` sends those and a few more requests itself, prints
a table (device, expected, got) and exits 0 only when every row matches. Ctrl-C (or SIGTERM)
stops everything, gateway first, and checks that nothing is left listening.

`--real` puts real software behind the gateway instead of the stand-in Exchange: SOGo's ActiveSync
server with Dovecot, PostgreSQL, memcached and an nginx TLS front (easgate.tools.realstack; needs root and
the Debian packages scripts/ensure_test_tools.sh installs), and prints `python -m easgate.tools.realclient`
commands that sync alice's mailbox with pyactivesync, a real EAS client, through the gateway.

DIR (default ./demo-state) is demo state: the inventory and the connector's policy are rewritten
on every start, so a run always begins from the same devices.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..authz.audit import AuditLog
from ..authz.identity import encode_binary_query
from ..authz.policy import PolicyStore
from ..connector.service import ConnectorService, ConnectorThread
from ..connector.store import Inventory, InventoryError
from .pki import IDP_AUDIENCE, IDP_ISSUER, cert_b64_der, generate_pki, issue_token, load_cert
from .realstack import SEED_SUBJECT, USERS, RealStack, StackError
from .standins import ExchangeStandIn, MdmStandIn

HOSTNAME = "mail.example.test"
PASSWORD = "password"
IPHONE, IPAD = "ApplF17ABCDEF01", "ApplDMPQ99887766"
IPHONE_UA = "Apple-iPhone15C2/2101.100"
IPAD_UA = "Apple-iPad14C1/2101.100"
LISTEN_RE = re.compile(r"listening at (?:\S+ )?\[?([0-9.:a-f]*)\]?:(\d+)")
BINDING_DENY = "device binding: DeviceId is not the certificate's"
REPO_INVENTORY = Path(__file__).resolve().parents[3] / "policies" / "demo-inventory.csv"

#: The demo's devices, used when the package runs outside a checkout (same rows as policies/demo-inventory.csv).
FALLBACK_INVENTORY = """\
device_id,user,device_type,model,managed,compliant,blocked
ApplF17ABCDEF01,alice,iPhone,iPhone 15,true,true,false
ApplDMPQ99887766,alice,iPad,iPad Air,false,true,false
androidc1234567890,bob@contoso.com,Android,Pixel 8,true,true,false
ApplDEADBEEF0001,CONTOSO\\carol,iPhone,iPhone 12,true,false,false
ApplLOST00000001,dave,iPhone,iPhone 14,true,true,true
"""

DEMO_POLICY = """\
# The demo connector's policy (rewritten by every `easgate demo` start). Format: policies/activesync-policy.yaml.
# The devices themselves are in devices.db: easgate devices --db {db} list
mode: block
allow:
  users: ["CONTOSO\\\\svc-sync"]
deny:
  user_agents: ["*BlackBerry*"]
"""

LAUNCHER = """\
import ctypes, os, signal, sys
# Die with the demo even if it is killed without a chance to clean up (Linux: PR_SET_PDEATHSIG).
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execv(sys.executable, [sys.executable, "-m", "easgate.cli", *sys.argv[2:]])
"""


def easgate_command() -> str:
    """How this user runs easgate, for commands the demo prints: `.venv/bin/easgate` from a
    checkout (`make demo`), `easgate` when it is on PATH."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "easgate" and "/" not in sys.argv[0]:
        return "easgate"
    script = argv0 if argv0.name == "easgate" else Path(sys.executable).parent / "easgate"
    if not script.is_file():
        return "easgate"
    if shutil.which("easgate") == str(script.absolute()):
        return "easgate"
    rel = os.path.relpath(script.absolute())
    return rel if not rel.startswith("..") else str(script.absolute())


class DemoError(Exception):
    """The demo could not start; the message says what and how to fix it."""


def gateway_config(d: Path, certs: Path, port: int, exchange_url: str, mdm_url: str, connector_url: str) -> dict:
    """policies/gateway.yaml's shape, with the demo's ports and absolute paths."""
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "tls": {
            "certificate": str(certs / "gateway-full.pem"),
            "min_version": "TLS1_2",
            "client_certs": {"mode": "optional", "ca": [str(certs / "device-ca.pem"), str(certs / "root-ca.pem")],
                             "on_invalid": "reject"},
        },
        "pools": {
            "exchange": {"servers": [exchange_url], "ca": str(certs / "internal-ca.pem"), "sni": "exchange.internal",
                         "host_header": "client"},
            "mdm": {"servers": [mdm_url], "host_header": "client"},
        },
        "routes": [
            # Autodiscover goes to Exchange without an ActiveSync decision (Exchange authenticates it);
            # its answers, and 451 redirects, never name the internal host (docs/configuration.md).
            {"name": "autodiscover-xml", "priority": 50, "pool": "exchange", "rewrite_redirects": True,
             "match": {"path_prefix": "/autodiscover/autodiscover.xml", "ignore_case": True}},
            {"name": "autodiscover-json", "priority": 51, "pool": "exchange", "rewrite_redirects": True,
             "match": {"path_prefix": "/autodiscover/autodiscover.json", "ignore_case": True}},
            {"name": "activesync", "priority": 100, "match": {"path_prefix": "/Microsoft-Server-ActiveSync"},
             "pool": "exchange", "authorize": "activesync", "rewrite_redirects": True},
            {"name": "mdm", "priority": 110, "match": "any", "pool": "mdm", "client_cert_header": "NSClientCert"},
        ],
        "authorization": {
            "applies_to": {"path_prefix": "/Microsoft-Server-ActiveSync", "methods": ["POST"],
                           "pass_methods": ["OPTIONS"]},
            "connector": {"url": f"{connector_url}/services/ActiveSync/Authorize", "timeout_ms": 2000},
            # short TTLs so inventory changes show at once: denials are re-asked every time,
            # allowed devices at most 5 s after a block
            "cache": {"allow_ttl_s": 5, "deny_ttl_s": 0, "max_entries": 10000},
            "on_connector_error": "deny",
            "deny": {"status": 403},
            # Who: a verified Bearer token, else Basic; the device certificate's UPN must agree.
            "identity": {
                "user_from": ["bearer", "basic", "certificate"],
                "user_match": "account",
                "bearer": {"jwks": str(certs / "idp-jwks.json"), "issuer": IDP_ISSUER, "audience": IDP_AUDIENCE,
                           "algorithms": ["ES256"], "user_claim": ["upn"]},
            },
            # Which device: the DeviceId must be the one the device certificate names (SAN URI).
            "device_binding": {"device_id": {"from": "san_uri", "pattern": "urn:easgate:device:(.+)"},
                               "user": "san_upn", "user_match": "account"},
        },
        "audit_log": str(d / "logs" / "decisions.jsonl"),
    }


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Demo:
    def __init__(self, directory: Path, port: int = 8443, out=sys.stdout, real: bool = False) -> None:
        self.real = real
        self.stack: RealStack | None = None
        self.dir = Path(directory).expanduser().resolve()
        self.certs = self.dir / "certs"
        self.want_port = port
        self.out = out
        self.exchange: ExchangeStandIn | None = None
        self.mdm: MdmStandIn | None = None
        self.connector: ConnectorThread | None = None
        self.gateway: subprocess.Popen | None = None
        self.gateway_port: int | None = None
        self.gateway_log = self.dir / "logs" / "gateway.log"
        self._gw_lines: list[str] = []
        self._gw_ready = threading.Event()
        self.ports: dict[str, int] = {}

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    # -- start / stop ----------------------------------------------------------------------

    def start(self) -> None:
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        generate_pki(self.certs)
        db = self.dir / "devices.db"
        inv_file = REPO_INVENTORY
        if not inv_file.is_file():
            inv_file = self.dir / "demo-inventory.csv"
            inv_file.write_text(FALLBACK_INVENTORY)
        try:
            inv = Inventory(db)
            inv.import_file(inv_file, replace=True)
        except InventoryError as e:
            raise DemoError(f"cannot prepare the demo inventory {db}: {e}; delete {self.dir} and start again")
        policy_file = self.dir / "activesync-policy.yaml"
        policy_file.write_text(DEMO_POLICY.format(db=db))

        if self.real:
            try:
                self.stack = RealStack(self.certs / "exchange.pem", self.certs / "exchange.key").start()
            except StackError as e:
                raise DemoError(str(e))
            exchange_url = self.stack.eas_url
        else:
            self.exchange = ExchangeStandIn("exchange", tls=(self.certs / "exchange.pem", self.certs / "exchange.key")).start()
            exchange_url = self.exchange.url
        self.mdm = MdmStandIn("mdm").start()
        service = ConnectorService(inv, PolicyStore(policy_file), AuditLog(self.dir / "logs" / "connector-decisions.jsonl"))
        self.connector = ConnectorThread(service, "127.0.0.1", 0).start()
        self.ports = {"exchange": self.stack.ports["https"] if self.stack else self.exchange.port, "mdm": self.mdm.port,
                      "connector": self.connector.port}

        port = self.want_port
        if port and not _port_free(port):
            self.say(f"port {port} is busy on 127.0.0.1; the gateway takes a free port instead (or pass --port)")
            port = 0
        cfg_path = self.dir / "gateway.yaml"
        cfg = gateway_config(self.dir, self.certs, port, exchange_url, self.mdm.url, self.connector.url)
        cfg_path.write_text("# written by `easgate demo`; the same shape as policies/gateway.yaml\n"
                            + yaml.safe_dump(cfg, sort_keys=False))
        self._start_gateway(cfg_path)
        self.ports["gateway"] = self.gateway_port

    def _start_gateway(self, cfg_path: Path) -> None:
        # One process: a laptop trial needs no worker per core, starts in a second instead of three
        # process starts, and its log is one stream (production: docs/scaling.md)
        args = ["run", str(cfg_path), "--workers", "1"]
        if sys.platform.startswith("linux"):
            argv = [sys.executable, "-c", LAUNCHER, str(os.getpid()), *args]
        else:
            argv = [sys.executable, "-m", "easgate.cli", *args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # its own session: a terminal's Ctrl-C reaches only the demo, which stops the gateway in order
        self.gateway = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, env=env, text=True, errors="replace",
                                        start_new_session=True)
        threading.Thread(target=self._pump, name="gateway-log", daemon=True).start()
        if not self._gw_ready.wait(30) or self.gateway_port is None:
            tail = "\n".join(self._gw_lines[-15:])
            raise DemoError(f"the gateway did not start (log: {self.gateway_log}):\n{tail}")

    def _pump(self) -> None:
        assert self.gateway and self.gateway.stdout
        with open(self.gateway_log, "a", encoding="utf-8") as log:
            for line in self.gateway.stdout:
                log.write(line)
                log.flush()
                self._gw_lines.append(line.rstrip("\n"))
                del self._gw_lines[:-200]
                m = LISTEN_RE.search(line)
                if m and self.gateway_port is None:
                    self.gateway_port = int(m[2])
                    self._gw_ready.set()
        self._gw_ready.set()

    def stop(self) -> list[str]:
        """Stop everything (gateway first); returns what still listens (should be nothing)."""
        if self.gateway is not None and self.gateway.poll() is None:
            self.gateway.send_signal(signal.SIGTERM)
            try:
                self.gateway.wait(10)
            except subprocess.TimeoutExpired:
                self.gateway.kill()
                self.gateway.wait()
        if self.connector is not None:
            self.connector.stop()
        for s in (self.exchange, self.mdm):
            if s is not None:
                s.stop()
        left = []
        if self.stack is not None:
            self.stack.stop()
            left = [f"real stack process {p}" for p in self.stack.leftovers()]
        return left + [f"{name} (127.0.0.1:{port})" for name, port in self.ports.items() if port and _listening(port)]

    # -- what to tell the user ----------------------------------------------------------------

    def sync_path(self, device_id: str, device_type: str, user: str = "alice") -> str:
        return f"/Microsoft-Server-ActiveSync?Cmd=Sync&User={user}&DeviceId={device_id}&DeviceType={device_type}"

    def curl(self, device_id: str, device_type: str, agent: str, cert: str | None) -> str:
        p = self.gateway_port
        argv = ["curl", "-sS", "--cacert", str(self.certs / "public-ca.pem"),
                "--resolve", f"{HOSTNAME}:{p}:127.0.0.1"]
        if cert:
            argv += ["--cert", str(self.certs / f"{cert}.pem"), "--key", str(self.certs / f"{cert}.key")]
        argv += ["-u", f"alice:{PASSWORD}", "-X", "POST", "-H", f"User-Agent: {agent}",
                 "-H", "MS-ASProtocolVersion: 16.1", "-D", "-", "-o", "/dev/null",
                 f"https://{HOSTNAME}:{p}{self.sync_path(device_id, device_type)}"]
        return shlex.join(argv)

    def curl_commands(self) -> dict[str, str]:
        return {"iphone": self.curl(IPHONE, "iPhone", IPHONE_UA, "device-iphone"),
                "ipad": self.curl(IPAD, "iPad", IPAD_UA, None)}

    def banner(self) -> None:
        rel = _rel(self.dir)
        self.say(f"easgate demo: everything on 127.0.0.1, state in {rel}/")
        self.say(f"  gateway    https://{HOSTNAME}:{self.gateway_port}   {easgate_command()} run {rel}/gateway.yaml "
                 f"(log {rel}/logs/gateway.log, decisions {rel}/logs/decisions.jsonl)")
        if self.stack:
            self.say(f"  exchange   {self.stack.eas_url}   SOGo ActiveSync behind nginx (HTTPS, internal CA); "
                     f"Dovecot IMAP 127.0.0.1:{self.stack.ports['imap']}, state in {self.stack.base}")
            self.say("             mailboxes: " + ", ".join(f"{u.login}/{u.password}" for u in USERS))
        else:
            self.say(f"  exchange   {self.exchange.url}   stand-in Exchange (HTTPS, internal CA)")
        self.say(f"  mdm        {self.mdm.url}   stand-in MDM (echoes the NSClientCert header)")
        self.say(f"  connector  {self.connector.url}/services/ActiveSync/Authorize   "
                 f"{self.connector.service.inventory.count()} devices in {rel}/devices.db "
                 f"(decisions {rel}/logs/connector-decisions.jsonl)")
        self.say(f"  PKI        {rel}/certs/ (throw-away; clients trust public-ca.pem)")

    def realclient(self, device_id: str, cert: str | None) -> str:
        """The pyactivesync command that syncs alice's inbox through the gateway as `device_id`."""
        alice = USERS[0]
        argv = [sys.executable, "-m", "easgate.tools.realclient", "--server", f"localhost:{self.gateway_port}",
                "--ca", str(self.certs / "public-ca.pem"), "--user", alice.login, "--password", alice.password,
                "--device-id", device_id]
        if cert:
            argv += ["--cert", str(self.certs / f"{cert}.pem"), "--key", str(self.certs / f"{cert}.key")]
        return shlex.join([*argv, "inbox"])

    def instructions(self) -> None:
        if self.stack:
            self.say()
            self.say("alice's managed iPhone syncs her inbox with pyactivesync, a real EAS client, "
                     "through the gateway (FolderSync, Sync):")
            self.say(self.realclient(IPHONE, "device-iphone"))
            self.say()
            self.say("her unmanaged iPad is denied at its first request (403 from the gateway):")
            self.say(self.realclient(IPAD, None))
            self.say()
            self.say("Ctrl-C stops everything.")
            return
        c = self.curl_commands()
        rel = _rel(self.dir)
        self.say()
        self.say("alice's managed iPhone, with its device certificate (allowed: 200 from Exchange):")
        self.say(c["iphone"])
        self.say()
        self.say("alice's unmanaged iPad (denied: 403 from the gateway):")
        self.say(c["ipad"])
        self.say()
        self.say("Change the inventory while it runs (the connector sees it at once; the gateway caches allows 5 s):")
        self.say(f"  {easgate_command()} devices --db {rel}/devices.db add {IPAD} --user alice --type iPad")
        self.say(f"  {easgate_command()} devices --db {rel}/devices.db block {IPHONE}")
        self.say(f"  curl -s '{self.connector.url}/services/ActiveSync/Simulate?user=alice&DeviceId={IPAD}'")
        self.say()
        self.say("Ctrl-C stops everything.")

    # -- the scenario ------------------------------------------------------------------------

    def _conn(self, cert: str | None) -> http.client.HTTPSConnection:
        ctx = ssl.create_default_context(cafile=str(self.certs / "public-ca.pem"))
        if cert:
            ctx.load_cert_chain(str(self.certs / f"{cert}.pem"), str(self.certs / f"{cert}.key"))
        c = http.client.HTTPSConnection(HOSTNAME, self.gateway_port, context=ctx, timeout=15)
        c.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", self.gateway_port), timeout=15),
                                 server_hostname=HOSTNAME)
        return c

    def send(self, method: str, path: str, *, user: str | None = "alice", agent: str = IPHONE_UA,
             cert: str | None = None, headers: dict | None = None,
             token: str | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
        c = self._conn(cert)
        try:
            h = {"User-Agent": agent, **(headers or {})}
            if token:
                h["Authorization"] = f"Bearer {token}"
            elif user:
                h["Authorization"] = "Basic " + base64.b64encode(f"{user}:{PASSWORD}".encode()).decode()
            if method == "POST":
                h.setdefault("MS-ASProtocolVersion", "16.1")
                h.setdefault("Content-Type", "application/vnd.ms-sync.wbxml")
            c.request(method, path, body=b"" if method == "POST" else None, headers=h)
            r = c.getresponse()
            return r.status, r.headers, r.read()
        finally:
            c.close()

    def real_scenario(self) -> list[Row]:
        def run(device_id: str, cert: str | None) -> Callable[[], str]:
            def go() -> str:
                p = subprocess.run(shlex.split(self.realclient(device_id, cert)), capture_output=True, text=True,
                                   timeout=120)
                if p.returncode == 0:
                    return "inbox synced" if SEED_SUBJECT in p.stdout else f"synced, no seed mail: {p.stdout[-80:]!r}"
                err = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"
                m = re.search(r"HTTP (\d+) to Cmd=(\w+)", err)
                return f"{m[1]} at {m[2]}" if m else err
            return go

        return [Row("iPhone ApplF17ABCDEF01 (alice, managed, cert), pyactivesync", "inbox synced",
                    run(IPHONE, "device-iphone")),
                Row("iPad ApplDMPQ99887766 (alice, not managed), pyactivesync", "403 at Provision", run(IPAD, None))]

    def last_reason(self) -> str:
        """The gateway's last decision reason (from its audit log), short enough for the table."""
        lines = (self.dir / "logs" / "decisions.jsonl").read_text().splitlines()
        reason = json.loads(lines[-1])["reason"] if lines else "no decision"
        if reason.startswith("device binding: DeviceId") and "does not match the certificate" in reason:
            return BINDING_DENY
        reason = reason.split(" (")[0]
        return reason if reason.startswith("device binding:") else reason.split(":")[0]

    def scenario(self) -> list[Row]:
        if self.stack:
            return self.real_scenario()
        iphone_cert = cert_b64_der(load_cert(self.certs / "device-iphone.pem"))
        inv = self.connector.service.inventory

        def activesync(device_id: str, dtype: str, user: str = "alice", cert: str | None = None,
                       agent: str = IPHONE_UA, token_for: str | None = None, why: bool = False) -> Callable[[], str]:
            def run() -> str:
                token = issue_token(self.certs, token_for) if token_for else None
                status, headers, body = self.send("POST", self.sync_path(device_id, dtype, user.split("@")[0]),
                                                  user=user, cert=cert, agent=agent, token=token)
                got = _outcome(status, headers, body)
                return f"{got}: {self.last_reason()}" if why and got == "403 denied" else got
            return run

        def base64_form() -> str:
            q = encode_binary_query(command="Sync", device_id=IPHONE, device_type="iPhone", version="16.1")
            status, headers, body = self.send("POST", f"/Microsoft-Server-ActiveSync?{q}", cert="device-iphone")
            return _outcome(status, headers, body)

        def options() -> str:
            status, headers, _ = self.send("OPTIONS", "/Microsoft-Server-ActiveSync")
            versions = headers.get("MS-ASProtocolVersions")
            if versions and "16.1" in versions.split(","):
                return f"{status} exchange, offers 16.1"  # Exchange's own capability headers
            return f"{status} {versions or 'without MS-ASProtocolVersions'}"

        def mdm(cert: str | None, forged: bool = False) -> Callable[[], str]:
            def run() -> str:
                extra = {"NSClientCert": iphone_cert} if forged else None
                status, headers, body = self.send("GET", "/zdm/enroll", user=None, cert=cert, headers=extra)
                if headers.get("X-Upstream") != "mdm":
                    return f"{status} not from the mdm"
                seen = json.loads(body).get("NSClientCert")
                what = "none" if not seen else ("iPhone cert" if seen == iphone_cert else "another value")
                return f"{status} mdm, NSClientCert: {what}"
            return run

        def autodiscover() -> str:
            status, headers, body = self.send("GET", "/autodiscover/autodiscover.json?Email=alice@example.test"
                                              "&Protocol=ActiveSync", user=None)
            url = json.loads(body).get("Url", "") if status == 200 else ""
            public = f"https://{HOSTNAME}:{self.gateway_port}/Microsoft-Server-ActiveSync"
            where = "public URL" if url == public else f"URL {url or body[:60]!r}"
            return f"{status} {headers.get('X-Upstream') or '-'}, {where}"

        def add_then_ask() -> str:
            inv.add("ApplNEW000000001", "erin", "iPhone", "iPhone 16")  # what `easgate devices add` does
            return activesync("ApplNEW000000001", "iPhone", "erin", cert="device-erin")()

        return [
            Row("iPhone ApplF17ABCDEF01 (alice, managed, cert)", "200 exchange",
                activesync(IPHONE, "iPhone", cert="device-iphone")),
            Row("iPad ApplDMPQ99887766 (alice, not managed)", "403 denied",
                activesync(IPAD, "iPad", agent=IPAD_UA, cert="device-ipad")),
            Row("iPhone, base64 query form", "200 exchange", base64_form),
            Row("Android (bob@contoso.com, managed)", "200 exchange",
                activesync("androidc1234567890", "Android", "bob@contoso.com", agent="Android-Mail/2024.01",
                           cert="device-android")),
            Row("iPhone ApplF17ABCDEF01 used by mallory", "403 denied",
                activesync(IPHONE, "iPhone", "mallory", cert="device-iphone")),
            Row("iPhone ApplDEADBEEF0001 (carol, noncompliant)", "403 denied",
                activesync("ApplDEADBEEF0001", "iPhone", "CONTOSO\\carol", cert="device-carol")),
            Row("iPhone ApplLOST00000001 (dave, blocked)", "403 denied",
                activesync("ApplLOST00000001", "iPhone", "dave", cert="device-dave")),
            Row("iPhone ApplNEW000000001 (erin, not yet in inventory)", "403 denied",
                activesync("ApplNEW000000001", "iPhone", "erin", cert="device-erin")),
            Row("  ... after `easgate devices add` (live)", "200 exchange", add_then_ask),
            Row("iPhone's DeviceId copied, with the iPad's certificate", f"403 denied: {BINDING_DENY}",
                activesync(IPHONE, "iPhone", cert="device-ipad", why=True)),
            Row("iPhone DeviceId without a certificate", "403 denied: device binding: no verified client certificate",
                activesync(IPHONE, "iPhone", why=True)),
            Row("Bearer token (alice) from her iPhone", "200 exchange",
                activesync(IPHONE, "iPhone", cert="device-iphone", token_for="alice@example.test")),
            Row("Bearer token for bob, alice's iPhone certificate", "403 denied: the user sources disagree",
                activesync(IPHONE, "iPhone", cert="device-iphone", token_for="bob@contoso.com", why=True)),
            Row("Autodiscover (JSON) names the public host", "200 exchange, public URL", autodiscover),
            Row("OPTIONS /Microsoft-Server-ActiveSync", "200 exchange, offers 16.1", options),
            Row("MDM request with the iPhone's device cert", "200 mdm, NSClientCert: iPhone cert", mdm("device-iphone")),
            Row("MDM request without a cert", "200 mdm, NSClientCert: none", mdm(None)),
            Row("MDM request, forged NSClientCert header", "200 mdm, NSClientCert: none", mdm(None, forged=True)),
        ]


@dataclass
class Row:
    what: str
    expected: str
    run: Callable[[], str]
    got: str = ""

    @property
    def ok(self) -> bool:
        return self.got == self.expected


def _outcome(status: int, headers: http.client.HTTPMessage, body: bytes) -> str:
    if status == 200 and headers.get("X-Upstream") == "exchange":
        return "200 exchange"
    if status == 403 and b"denied by easgate" in body:
        return "403 denied"
    return f"{status} {headers.get('X-Upstream') or body[:60]!r}"


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def run_scenario(demo: Demo) -> bool:
    rows = demo.scenario()
    for r in rows:
        try:
            r.got = r.run()
        except Exception as e:  # a failed request is a failed row, not a crash
            r.got = f"error: {type(e).__name__}: {e}"
    w1 = max(len(r.what) for r in rows)
    w2 = max(len(r.expected) for r in rows)
    demo.say()
    demo.say(f"{'device / request':<{w1}} | {'expected':<{w2}} | {'got':<{w2}} | ok")
    demo.say(f"{'-' * w1}-+-{'-' * w2}-+-{'-' * w2}-+---")
    for r in rows:
        demo.say(f"{r.what:<{w1}} | {r.expected:<{w2}} | {r.got:<{w2}} | {'yes' if r.ok else 'NO'}")
    bad = sum(not r.ok for r in rows)
    demo.say()
    demo.say(f"scenario: {len(rows) - bad} of {len(rows)} rows as expected" + ("" if not bad else f", {bad} NOT"))
    return not bad


def cmd_demo(args) -> int:
    demo = Demo(Path(args.dir), args.port, real=args.real)
    stopping = False

    def on_signal(signum, frame) -> None:
        # Installed explicitly: a shell that starts us in the background makes SIGINT ignored.
        if not stopping:
            raise KeyboardInterrupt

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        try:
            demo.start()
        except DemoError as e:
            print(f"easgate demo: {e}", file=sys.stderr)
            return 1
        demo.banner()
        if args.scenario:
            code = 0 if run_scenario(demo) else 1
        else:
            demo.instructions()
            while demo.gateway.poll() is None:
                time.sleep(0.5)
            tail = "\n".join(demo._gw_lines[-10:])
            print(f"easgate demo: the gateway exited with code {demo.gateway.returncode} "
                  f"(log {demo.gateway_log}):\n{tail}", file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        pass
    finally:
        stopping = True
        left = demo.stop()
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if left:
            print(f"easgate demo: still listening after stop: {', '.join(left)}", file=sys.stderr)
            code = code or 1
        else:
            demo.say("easgate demo: stopped; nothing left listening")
    return code


def add_commands(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("demo", help="run gateway, connector, stand-in Exchange and MDM on 127.0.0.1",
                       description=__doc__.split("\n\n")[0])
    s.add_argument("--dir", default="demo-state", help="where certificates, inventory, configs and logs go "
                   "(default ./demo-state)")
    s.add_argument("--port", type=int, default=8443, help="the gateway's port (default 8443; 0 = any free port; "
                   "a busy port falls back to a free one)")
    s.add_argument("--scenario", action="store_true", help="send the demo requests, print a table, exit 0 only "
                   "if every row is as expected")
    s.add_argument("--real", action="store_true", help="real software behind the gateway: SOGo's ActiveSync "
                   "server with Dovecot and PostgreSQL instead of the stand-in Exchange (root; Debian packages), and "
                   "pyactivesync commands to sync a mailbox through the gateway")
    s.set_defaults(fn=cmd_demo)
