#!/usr/bin/env python3
"""Record tests/captures/: realistic device sessions through a real easgate gateway.

    .venv/bin/python scripts/make_captures.py [--out tests/captures]

What it does, so anyone can regenerate the captures:

1. a throw-away PKI (easgate.tools.pki) in a temporary directory; its device CA and root CA
   certificates are copied to OUT/ca/ (the captured device certificates were issued by them, and
   OUT/gateway.yaml trusts them, so replays verify them as the recording gateway did);
2. a stand-in Exchange (HTTPS, answers ActiveSync commands with WBXML like Exchange does) and
   the stand-in MDM server (easgate.tools.standins);
3. for every session below, a real gateway process, `easgate run OUT/gateway.yaml
   --workers 1 -- -w RAW` (mitmproxy's own Save addon writes each flow with the gateway's decision
   in flow.metadata), its pools pointed at the stand-ins; real HTTP clients drive the session
   through it (Python's http.client over one TLS connection per device, as mail clients keep it;
   curl for the browser); the gateway is stopped with SIGTERM so the file is complete;
4. `easgate capture --sanitize RAW OUT/NAME.mitm`: the passwords in Authorization become REDACTED,
   everything else is kept as recorded.

Two sessions are real software on both sides: `sogo-managed` and `sogo-unmanaged` are pyactivesync (an
EAS 16.1 client library, easgate.tools.realclient) talking through the gateway to SOGo's ActiveSync server
with Dovecot behind it (easgate.tools.realstack, started for them; root and the Debian packages that
scripts/ensure_test_tools.sh installs). Nothing in those requests or answers was written here; the
script only resolves mail.example.test to 127.0.0.1, as /etc/hosts would.

The other sessions stand for clients that cannot run here (iOS Mail, an Android client using the
base64 query form, Outlook for iOS and Android, Safari on the MDM pages): their request bodies are
WBXML built with easgate.tools.capture.wbxml from the requests these clients send
(Provision with DeviceInformation, FolderSync with SyncKey 0, Sync, Ping with HeartbeatInterval,
SendMail / SmartReply with MIME). Nothing is random except what a real run makes random (ports,
timestamps, flow ids, TLS keys), so a regenerated set replays to the same decisions.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import requests
import yaml
from pyactivesync import FolderType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "addons"))

from easgate.authz.identity import decode_binary_query, encode_binary_query
from easgate.core.yamlfile import read_yaml
from easgate.tools import standins
from easgate.tools.capture import E, wbxml
from easgate.tools.pki import generate_pki
from easgate.tools.realclient import EasClient
from easgate.tools.realstack import ATTACHMENT_NAME, SEED_SUBJECT, USERS, RealStack
from easgate.tools.standins import ExchangeStandIn, MdmStandIn

HOSTNAME = "mail.example.test"
PASSWORD = "Winter2024!"  # what the clients send; the saved captures say REDACTED
WBXML_TYPE = "application/vnd.ms-sync.wbxml"
AS = "/Microsoft-Server-ActiveSync"
LISTEN_RE = re.compile(r"[Rr]everse proxy to \S+ listening at \[?([0-9.:a-f*]*)\]?:(\d+)")

TEMP_POLICY_KEY = "1307199584"
POLICY_KEY = "3942919513"
ANDROID_ID = bytes.fromhex("3d8f2a6c00b14e7f9a52c4e18b7d0f61")  # binary: 0x00 and non-printable bytes


# ---------------------------------------------------------------------------------------------
# Exchange, as far as a gateway can tell


def _command_of(path: str) -> tuple[str | None, str | None]:
    """(command, DeviceType) of an ActiveSync request target, in either query form."""
    query = urlsplit(path).query
    if not query:
        return None, None
    if "=" in query.rstrip("=") or "&" in query:
        q = parse_qs(query)
        return (q.get("Cmd") or [None])[0], (q.get("DeviceType") or [None])[0]
    q = decode_binary_query(base64.b64decode(query))
    return q.command, q.device_type


class _BodyHandler(standins._Handler):
    """The stand-in's handler, keeping the request body for the answer (the stand-in keeps only its length)."""

    def _read_body(self) -> bytes:
        self.body = super()._read_body()
        return self.body


class EasExchange(ExchangeStandIn):
    """Answers each ActiveSync command with the WBXML Exchange 2019 would send."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.RequestHandlerClass = _BodyHandler

    def answer(self, h, seen):
        status, headers, body = super().answer(h, seen)
        if h.command != "POST" or status != 200:
            return status, headers, body
        cmd, _ = _command_of(h.path)
        headers = {"Content-Type": WBXML_TYPE, "MS-Server-ActiveSync": "15.20", "X-Upstream": "exchange",
                   "Cache-Control": "private"}
        req_body = getattr(h, "body", b"")
        if cmd == "Provision":
            ack = b"\x49\x03" in req_body  # Provision:PolicyKey with an inline string: the acknowledgement
            policy = [E("Provision:PolicyType", "MS-EAS-Provisioning-WBXML"), E("Provision:Status", "1"),
                      E("Provision:PolicyKey", POLICY_KEY if ack else TEMP_POLICY_KEY)]
            if not ack:
                policy.append(E("Provision:Data", E(
                    "Provision:EASProvisionDoc", E("Provision:DevicePasswordEnabled", "1"),
                    E("Provision:AllowSimpleDevicePassword", "0"), E("Provision:MinDevicePasswordLength", "6"),
                    E("Provision:MaxInactivityTimeDeviceLock", "900"),
                    E("Provision:MaxDevicePasswordFailedAttempts", "10"),
                    E("Provision:RequireDeviceEncryption", "1"))))
            parts = [E("Provision:Status", "1")]
            if not ack:
                parts.insert(0, E("Settings:DeviceInformation", E("Settings:Status", "1")))
            return 200, headers, wbxml(E("Provision:Provision", *parts, E(
                "Provision:Policies", E("Provision:Policy", *policy))))
        if cmd == "FolderSync":
            folders = [("1", "0", "Calendar", "8"), ("2", "0", "Contacts", "9"), ("3", "0", "Deleted Items", "4"),
                       ("4", "0", "Drafts", "3"), ("5", "0", "Inbox", "2"), ("6", "0", "Outbox", "6"),
                       ("7", "0", "Sent Items", "5")]
            adds = [E("FolderHierarchy:Add", E("FolderHierarchy:ServerId", s), E("FolderHierarchy:ParentId", p),
                      E("FolderHierarchy:DisplayName", n), E("FolderHierarchy:Type", t)) for s, p, n, t in folders]
            return 200, headers, wbxml(E("FolderHierarchy:FolderSync", E("FolderHierarchy:Status", "1"),
                                         E("FolderHierarchy:SyncKey", "1"),
                                         E("FolderHierarchy:Changes", E("FolderHierarchy:Count", str(len(adds))),
                                           *adds)))
        if cmd == "Sync":
            first = b"\x4b\x03\x30\x00" in req_body  # AirSync:SyncKey "0"
            coll = [E("AirSync:SyncKey", "1" if first else "2"), E("AirSync:CollectionId", "5"),
                    E("AirSync:Status", "1")]
            if not first:
                coll.append(E("AirSync:Commands", E("AirSync:Add", E("AirSync:ServerId", "5:1"), E(
                    "AirSync:ApplicationData", E("Email:Subject", "Quarterly numbers"),
                    E("Email:From", "\"Carol\" <carol@contoso.com>"), E("Email:To", "alice@contoso.com"),
                    E("Email:DateReceived", "2024-03-18T09:12:44.000Z"), E("Email:Read", "0")))))
            return 200, headers, wbxml(E("AirSync:Sync", E("AirSync:Collections", E("AirSync:Collection", *coll))))
        if cmd == "Ping":
            return 200, headers, wbxml(E("Ping:Ping", E("Ping:Status", "1")))  # heartbeat expired, no changes
        if cmd in ("SendMail", "SmartReply", "SmartForward"):
            return 200, {"MS-Server-ActiveSync": "15.20", "X-Upstream": "exchange"}, b""  # success: no body
        return status, dict(headers), body


# ---------------------------------------------------------------------------------------------
# The gateway


class Gateway:
    def __init__(self, config: Path, raw: Path) -> None:
        # --full: mitmproxy's DumpMaster; easgate run's lean master writes no -w file yet (its Save addon,
        # loaded on demand, re-declares save_stream_file and loses the value)
        argv = [sys.executable, "-m", "easgate.cli", "run", str(config), "--listen", "127.0.0.1:0", "--workers", "1",
                "--full", "--", "-w", str(raw)]
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT / "addons"))
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self.port: int | None = None
        ready = threading.Event()

        def pump() -> None:
            for line in self.proc.stdout:
                self.lines.append(line.rstrip())
                m = LISTEN_RE.search(line)
                if m and self.port is None:
                    self.port = int(m[2])
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        ready.wait(30)
        if self.port is None:
            self.stop()
            raise SystemExit("the gateway did not start:\n" + "\n".join(self.lines))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------------------------
# Clients


class Device:
    """One ActiveSync client: one kept-alive TLS connection, its own headers, in its own order."""

    def __init__(self, port: int, pki: Path, *, user: str, agent: str, cert: str | None = None,
                 extra: list[tuple[str, str]] | None = None) -> None:
        self.port, self.pki, self.user, self.agent, self.cert = port, pki, user, agent, cert
        self.extra = extra or []
        self.conn: http.client.HTTPSConnection | None = None
        self.log: list[tuple[str, int]] = []

    def _connect(self) -> http.client.HTTPSConnection:
        ctx = ssl.create_default_context(cafile=str(self.pki / "public-ca.pem"))
        if self.cert:
            ctx.load_cert_chain(str(self.pki / f"{self.cert}.pem"), str(self.pki / f"{self.cert}.key"))
        c = http.client.HTTPSConnection(HOSTNAME, self.port, context=ctx, timeout=20)
        c.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", self.port), timeout=20),
                                 server_hostname=HOSTNAME)
        return c

    def auth(self) -> str:
        return "Basic " + base64.b64encode(f"{self.user}:{PASSWORD}".encode()).decode()

    def send(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes | None = None) -> int:
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = self._connect()
            c = self.conn
            try:
                c.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
                c.putheader("Host", HOSTNAME)
                for k, v in headers:
                    c.putheader(k, v)
                if body is not None:
                    c.putheader("Content-Length", str(len(body)))
                c.endheaders(body)
                r = c.getresponse()
                r.read()
                if r.getheader("Connection", "").lower() == "close" or r.status == 403:
                    c.close()
                    self.conn = None
                self.log.append((f"{method} {target[:70]}", r.status))
                return r.status
            except (ConnectionError, http.client.RemoteDisconnected, BrokenPipeError):
                c.close()
                self.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn:
            self.conn.close()


class IOSMail(Device):
    """iOS Mail (the plain query form, MS-ASProtocolVersion 16.1)."""

    def __init__(self, *a, device_id: str, device_type: str, query_user: str, **kw) -> None:
        super().__init__(*a, **kw)
        self.device_id, self.device_type, self.query_user = device_id, device_type, query_user
        self.policy_key = "0"

    def target(self, cmd: str) -> str:
        user = self.query_user.replace("@", "%40").replace("\\", "%5C")
        return f"{AS}?Cmd={cmd}&User={user}&DeviceId={self.device_id}&DeviceType={self.device_type}"

    def options(self) -> int:
        return self.send("OPTIONS", AS, [("Accept", "*/*"), ("Authorization", self.auth()),
                                         ("Accept-Language", "en-US,en;q=0.9"), ("User-Agent", self.agent),
                                         ("Accept-Encoding", "gzip, deflate"), ("Connection", "keep-alive")])

    def post(self, cmd: str, body: bytes) -> int:
        return self.send("POST", self.target(cmd), [
            ("Content-Type", WBXML_TYPE), ("Accept", "*/*"), ("Accept-Language", "en-US,en;q=0.9"),
            ("Authorization", self.auth()), ("X-MS-PolicyKey", self.policy_key), ("MS-ASProtocolVersion", "16.1"),
            ("User-Agent", self.agent), ("Accept-Encoding", "gzip, deflate"), ("Connection", "keep-alive"),
            *self.extra], body)


class AndroidEas(Device):
    """An Android Exchange client that uses the base64-encoded query (protocol 14.1), binary DeviceId."""

    def __init__(self, *a, device_id: bytes, **kw) -> None:
        super().__init__(*a, **kw)
        self.device_id = device_id
        self.policy_key: int | None = None

    def target(self, cmd: str, params=None) -> str:
        return AS + "?" + encode_binary_query(command=cmd, device_id=self.device_id, device_type="Android",
                                              version="14.1", locale=0x0409, policy_key=self.policy_key,
                                              params=params)

    def options(self) -> int:
        return self.send("OPTIONS", AS, [("Authorization", self.auth()), ("User-Agent", self.agent),
                                         ("Accept-Encoding", "gzip"), ("Connection", "Keep-Alive")])

    def post(self, cmd: str, body: bytes, params=None) -> int:
        return self.send("POST", self.target(cmd, params), [
            ("Authorization", self.auth()), ("Content-Type", WBXML_TYPE), ("User-Agent", self.agent),
            ("Accept-Encoding", "gzip"), ("Connection", "Keep-Alive")], body)


def curl(port: int, pki: Path, path: str, *, agent: str, cert: str | None = None) -> int:
    argv = ["curl", "-sS", "--max-time", "20", "--cacert", str(pki / "public-ca.pem"), "--http1.1",
            "--resolve", f"{HOSTNAME}:{port}:127.0.0.1", "-o", "/dev/null", "-w", "%{http_code}",
            "-H", f"Host: {HOSTNAME}", "-H", f"User-Agent: {agent}",
            "-H", "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
            "-H", "Accept-Language: en-US,en;q=0.9", "-H", "Accept-Encoding: gzip, deflate, br"]
    if cert:
        argv += ["--cert", str(pki / f"{cert}.pem"), "--key", str(pki / f"{cert}.key")]
    argv.append(f"https://{HOSTNAME}:{port}{path}")
    return int(subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout.strip())


# ---------------------------------------------------------------------------------------------
# Request bodies (WBXML), as the clients send them


def provision(model: str, friendly: str, os_name: str, agent: str, operator: str | None = None) -> bytes:
    info = [E("Settings:Model", model), E("Settings:FriendlyName", friendly), E("Settings:OS", os_name),
            E("Settings:OSLanguage", "English"), E("Settings:UserAgent", agent)]
    if operator:
        info.append(E("Settings:MobileOperator", operator))
    return wbxml(E("Provision:Provision", E("Settings:DeviceInformation", E("Settings:Set", *info)),
                   E("Provision:Policies", E("Provision:Policy",
                                             E("Provision:PolicyType", "MS-EAS-Provisioning-WBXML")))))


def provision_ack(key: str) -> bytes:
    return wbxml(E("Provision:Provision", E("Provision:Policies", E(
        "Provision:Policy", E("Provision:PolicyType", "MS-EAS-Provisioning-WBXML"), E("Provision:PolicyKey", key),
        E("Provision:Status", "1")))))


FOLDERSYNC_0 = wbxml(E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0")))


def sync(key: str, collection: str = "5", window: bool = False) -> bytes:
    coll = [E("AirSync:SyncKey", key), E("AirSync:CollectionId", collection)]
    if window:
        coll += [E("AirSync:DeletesAsMoves", "1"), E("AirSync:GetChanges"), E("AirSync:WindowSize", "25"),
                 E("AirSync:Options", E("AirSync:FilterType", "3"), E(
                     "AirSyncBase:BodyPreference", E("AirSyncBase:Type", "2"),
                     E("AirSyncBase:TruncationSize", "200000")))]
    return wbxml(E("AirSync:Sync", E("AirSync:Collections", E("AirSync:Collection", *coll))))


def ping(heartbeat: str, folders: list[tuple[str, str]]) -> bytes:
    return wbxml(E("Ping:Ping", E("Ping:HeartbeatInterval", heartbeat), E("Ping:Folders", *[
        E("Ping:Folder", E("Ping:Id", i), E("Ping:Class", c)) for i, c in folders])))


def mime(sender: str, to: str, subject: str, text: str) -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nDate: Mon, 18 Mar 2024 10:02:11 +0100\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n"
            f"\r\n{text}\r\n").encode()


def sendmail(client_id: str, message: bytes) -> bytes:
    return wbxml(E("ComposeMail:SendMail", E("ComposeMail:ClientId", client_id), E("ComposeMail:SaveInSentItems"),
                   E("ComposeMail:Mime", message)))


def smartreply(client_id: str, folder: str, item: str, message: bytes) -> bytes:
    return wbxml(E("ComposeMail:SmartReply", E("ComposeMail:ClientId", client_id), E("ComposeMail:SaveInSentItems"),
                   E("ComposeMail:Source", E("ComposeMail:FolderId", folder), E("ComposeMail:ItemId", item)),
                   E("ComposeMail:Mime", message)))


# ---------------------------------------------------------------------------------------------
# The sessions


IPHONE_UA = "Apple-iPhone15C2/2105.219"  # iPhone 14 Pro, iOS 17.4 (21E219)
IPAD_UA = "Apple-iPad13C1/2105.219"  # iPad Air (4th gen), iOS 17.4
ANDROID_UA = "Android/14-EAS-2.0"
OUTLOOK_UA = "Outlook-iOS-Android/1.0"
SAFARI_UA = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
             "Version/17.4 Mobile/15E148 Safari/604.1")


def iphone_managed(port: int, pki: Path) -> list:
    d = IOSMail(port, pki, user="alice@contoso.com", agent=IPHONE_UA, cert="device-iphone",
                device_id="ApplF17ABCDEF01", device_type="iPhone", query_user="alice@contoso.com")
    out = [d.options(), d.post("Provision", provision("iPhone15C2", "Alice's iPhone", "iOS 17.4 21E219", IPHONE_UA,
                                                      "Contoso Mobile"))]
    out.append(d.post("Provision", provision_ack(TEMP_POLICY_KEY)))
    d.policy_key = POLICY_KEY
    out += [d.post("FolderSync", FOLDERSYNC_0), d.post("Sync", sync("0")), d.post("Sync", sync("1", window=True)),
            d.post("Ping", ping("1680", [("5", "Email"), ("1", "Calendar"), ("2", "Contacts")])),
            d.post("SendMail", sendmail("SendMail-83751244561", mime("alice@contoso.com", "carol@contoso.com",
                                                                      "Re: Quarterly numbers",
                                                                      "Looks good, thanks!")))]
    d.close()
    return out


def ipad_unmanaged(port: int, pki: Path) -> list:
    d = IOSMail(port, pki, user="CONTOSO\\alice", agent=IPAD_UA, device_id="ApplDMPQ99887766", device_type="iPad",
                query_user="alice")
    out = [d.options(), d.post("Provision", provision("iPad13C1", "Alice's iPad", "iPadOS 17.4 21E219", IPAD_UA))]
    out.append(d.post("Provision", provision("iPad13C1", "Alice's iPad", "iPadOS 17.4 21E219", IPAD_UA)))  # retry
    out.append(d.post("FolderSync", FOLDERSYNC_0))
    d.close()
    return out


def android_base64(port: int, pki: Path) -> list:
    d = AndroidEas(port, pki, user="bob@contoso.com", agent=ANDROID_UA, device_id=ANDROID_ID)
    out = [d.options(), d.post("Provision", provision("SM-S918B", "Galaxy S23 Ultra", "Android 14", ANDROID_UA,
                                                      "Contoso Mobile"))]
    d.policy_key = int(TEMP_POLICY_KEY)
    out.append(d.post("Provision", provision_ack(TEMP_POLICY_KEY)))
    d.policy_key = int(POLICY_KEY)
    out += [d.post("FolderSync", FOLDERSYNC_0), d.post("Sync", sync("0")),
            d.post("Ping", ping("900", [("5", "Email")])),
            d.post("SmartReply", smartreply("SmartReply-1710756131", "5", "5:1",
                                            mime("bob@contoso.com", "carol@contoso.com", "Re: Quarterly numbers",
                                                 "See you at 3.")),
                   params={"CollectionId": "5", "ItemId": "5:1", "Options": 0x01})]
    d.close()
    return out


def outlook_mobile(port: int, pki: Path) -> list:
    d = IOSMail(port, pki, user="erin@contoso.com", agent=OUTLOOK_UA, device_id="9FA43C1D52B64E0A8D7713C52E0B6A4F",
                device_type="Outlook", query_user="erin@contoso.com")
    out = [d.options(), d.post("Provision", provision("Outlook for iOS and Android", "Outlook", "Outlook for iOS and "
                                                      "Android 4.2412.0", OUTLOOK_UA))]
    d.policy_key = POLICY_KEY
    out += [d.post("FolderSync", FOLDERSYNC_0), d.post("Sync", sync("0", collection="1")),
            d.post("Ping", ping("480", [("5", "Email"), ("1", "Calendar")]))]
    d.close()
    return out


def mdm_enrollment(port: int, pki: Path) -> list:
    return [curl(port, pki, "/zdm/enroll", agent=SAFARI_UA),
            curl(port, pki, "/favicon.ico", agent=SAFARI_UA),
            curl(port, pki, "/zdm/enroll", agent=SAFARI_UA, cert="device-iphone"),
            curl(port, pki, "/zdm/enroll/profile?platform=ios", agent=SAFARI_UA, cert="device-iphone")]


def _resolve_demo_host() -> None:
    """mail.example.test -> 127.0.0.1 in this process (pyactivesync connects to the name it is given)."""
    original = socket.getaddrinfo

    def getaddrinfo(host, *a, **kw):
        return original("127.0.0.1" if host == HOSTNAME else host, *a, **kw)

    socket.getaddrinfo = getaddrinfo


def _real_client(port: int, pki: Path, device_id: str, cert: str | None):
    alice = USERS[0]
    return EasClient(f"{HOSTNAME}:{port}", alice.login, alice.password, device_id=device_id, ca=pki / "public-ca.pem",
                     cert=(pki / f"{cert}.pem", pki / f"{cert}.key") if cert else None)


STACK: dict[str, RealStack] = {}  # the running real server, for the sogo-* sessions


def sogo_managed(port: int, pki: Path) -> list:
    """pyactivesync on alice's managed iPhone (its device certificate) against SOGo: Provision (SOGo has
    no policy: no PolicyKey), FolderSync, Sync x2, ItemOperations (the message, its attachment),
    SendMail to bob, and a Ping that a new mail wakes."""
    stack = STACK["stack"]
    alice, bob = USERS[0], USERS[1]
    with _real_client(port, pki, "ApplF17ABCDEF01", "device-iphone") as c:
        c.provision()
        inbox = next(f for f in c.list_folders() if f.type == FolderType.INBOX)
        key = c.sync_folder(inbox.id, sync_key="0").sync_key
        r = c.sync_folder(inbox.id, sync_key=key)
        seed = next(i for i in r.added if i.fields.get("Email.Subject") == SEED_SUBJECT)
        item = c.fetch_item(inbox.id, seed.server_id)
        att = next(a for a in item.attachments if a.display_name == ATTACHMENT_NAME)
        c.fetch_attachment(att.file_reference)
        m = EmailMessage()
        m["From"], m["To"], m["Subject"] = alice.address, bob.address, "Re: " + SEED_SUBJECT
        m.set_content("Thanks, got the report.")
        c.send_mail(m)
        news = EmailMessage()
        news["From"], news["To"], news["Subject"] = bob.address, alice.address, "Lunch?"
        news.set_content("12:30 at the usual place?")
        stack.deliver(news)
        p = c.ping([inbox.id], heartbeat=10)
    if p.status != "2":
        raise SystemExit(f"sogo-managed: the Ping answered Status {p.status}, not 2 (changes): the new mail was missed")
    return [200] * 8


def sogo_unmanaged(port: int, pki: Path) -> list:
    """pyactivesync on alice's unmanaged iPad (no certificate): Provision and FolderSync, both denied."""
    out = []
    with _real_client(port, pki, "ApplDMPQ99887766", None) as c:
        for call in (c.provision, c.list_folders):
            try:
                call()
            except requests.HTTPError as e:
                out.append(e.response.status_code)
                c._provisioned = True  # go on as a client that ignores the refusal
    return out


SESSIONS = {
    "iphone-managed": (iphone_managed, "iOS Mail on alice's managed iPhone (device certificate): OPTIONS, Provision "
                       "x2, FolderSync, Sync x2, Ping, SendMail"),
    "ipad-unmanaged": (ipad_unmanaged, "iOS Mail on alice's unmanaged iPad (no certificate): denied after OPTIONS"),
    "android-base64": (android_base64, "bob's Android client, base64 query form, binary DeviceId, protocol 14.1"),
    "outlook-mobile": (outlook_mobile, "Outlook for iOS and Android (allowed by the policy's agent allow list)"),
    "mdm-enrollment": (mdm_enrollment, "iPhone Safari on the MDM enrollment pages, without and with the device "
                       "certificate"),
    "sogo-managed": (sogo_managed, "pyactivesync on alice's managed iPhone against SOGo: Provision, FolderSync, "
                     "Sync x2, ItemOperations x2, SendMail, Ping"),
    "sogo-unmanaged": (sogo_unmanaged, "pyactivesync on alice's unmanaged iPad against SOGo: denied at Provision"),
}
REAL = ("sogo-managed", "sogo-unmanaged")  # sessions against the real server stack


# ---------------------------------------------------------------------------------------------


def recording_config(template: Path, out_dir: Path, pki: Path, exchange: str, mdm: str, audit: Path) -> dict:
    _, cfg = read_yaml(template)  # the gateway's own strict reader: a duplicate key is an error here too
    cfg["tls"]["certificate"] = str(pki / "gateway-full.pem")
    cfg["tls"]["client_certs"]["ca"] = [str(out_dir / "ca" / "device-ca.pem"), str(out_dir / "ca" / "root-ca.pem")]
    cfg["pools"]["exchange"].update(servers=[exchange], ca=str(pki / "internal-ca.pem"))
    cfg["pools"]["mdm"].update(servers=[mdm])
    cfg["authorization"]["policy"] = str((template.parent / cfg["authorization"]["policy"]).resolve())
    cfg["audit_log"] = str(audit)
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "tests" / "captures", help="default: tests/captures")
    p.add_argument("--only", action="append", choices=sorted(SESSIONS), help="record only these sessions")
    args = p.parse_args(argv)
    out: Path = args.out.resolve()
    template = out / "gateway.yaml"
    if not template.is_file():
        print(f"{template} is missing: it is the config the captures are recorded with", file=sys.stderr)
        return 2
    others = sorted(p.stem for p in out.glob("*.mitm") if args.only and p.stem not in args.only)
    if others:
        # every run makes a new PKI and replaces ca/: captures left as they are would no longer verify
        print(f"--only would replace {out / 'ca'} and leave {', '.join(others)} with certificates it no longer "
              "trusts; regenerate them all, or use --out with an empty directory", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="easgate-captures-") as tmp_s:
        tmp = Path(tmp_s)
        pki = tmp / "pki"
        generate_pki(pki)
        (out / "ca").mkdir(parents=True, exist_ok=True)
        for name in ("device-ca.pem", "root-ca.pem"):
            shutil.copyfile(pki / name, out / "ca" / name)
        exchange = EasExchange("exchange", tls=(pki / "exchange.pem", pki / "exchange.key")).start()
        mdm = MdmStandIn("mdm").start()
        inventory = {}
        if any(n in REAL for n in (args.only or SESSIONS)):
            STACK["stack"] = RealStack(pki / "exchange.pem", pki / "exchange.key").start()
            _resolve_demo_host()
        try:
            for name, (session, what) in SESSIONS.items():
                if args.only and name not in args.only:
                    continue
                upstream = STACK["stack"].eas_url if name in REAL else exchange.url
                cfg = recording_config(template, out, pki, upstream, mdm.url, tmp / f"{name}-audit.jsonl")
                cfg_path = tmp / f"{name}.yaml"
                cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
                raw = tmp / f"{name}.raw.mitm"
                gw = Gateway(cfg_path, raw)
                try:
                    statuses = session(gw.port, pki)
                finally:
                    gw.stop()
                if not raw.is_file():
                    print(f"the gateway wrote no {raw}:\n" + "\n".join(gw.lines), file=sys.stderr)
                    return 1
                dst = out / f"{name}.mitm"
                r = subprocess.run([sys.executable, "-m", "easgate.cli", "capture", "--sanitize", str(raw), str(dst)],
                                   cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT / "addons")),
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    print(r.stdout + r.stderr, file=sys.stderr)
                    return 1
                inventory[name] = {"what": what, "statuses": statuses}
                print(f"{dst.relative_to(ROOT) if dst.is_relative_to(ROOT) else dst}: {r.stdout.strip()}; "
                      f"statuses {statuses}")
        finally:
            exchange.stop()
            mdm.stop()
            if "stack" in STACK:
                STACK.pop("stack").stop()
    for name, info in inventory.items():
        print(f"  {name}: {len(info['statuses'])} flows: {info['what']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
