"""Real ActiveSync software on both sides of the gateway.

Behind it: SOGo's ActiveSync server with Dovecot, PostgreSQL, memcached and an nginx TLS front
(easgate.tools.realstack, started once per session). In front of it: pyactivesync, an EAS 16.1 client
library nobody here wrote, talking HTTPS to a real gateway process, with and without a device
client certificate. Nothing in these tests encodes a WBXML body or an ActiveSync query itself.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from email.message import EmailMessage
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from mitmproxy import contentviews
from mitmproxy.test import taddons
from pyactivesync import FolderType

from easgate.gateway.contentview import describe
from easgate.tools.capture import read_flows
from easgate.tools.realclient import EasClient
from easgate.tools.realstack import ATTACHMENT, ATTACHMENT_NAME, MAX_PING_S, SEED_SUBJECT, USERS

import conftest
from conftest import launch, write_config

ALICE, BOB, CAROL = USERS
MANAGED = "REALEASIPHONE01"  # alice's managed device (in the policy inventory)
MANAGED_BOB = "REALEASBOBPHONE"
UNMANAGED = "REALEASUNMANAGED"  # carol's phone: not in the inventory

POLICY = {
    "mode": "block",
    "inventory": [{"device_id": MANAGED, "owner": "alice", "compliant": True},
                  {"device_id": MANAGED_BOB, "owner": "bob", "compliant": True}],
}


def gateway_config(pki: Path, stack, mdm, d: Path, tls: dict | None = None, **kw) -> dict:
    """conftest's gateway config with the Exchange pool pointing at the real stack's TLS front."""
    kw.setdefault("policy", POLICY)
    cfg = conftest.authz_config(pki, SimpleNamespace(url=stack.eas_url), mdm, d, **kw)
    if tls:
        cfg["tls"] = tls
    return cfg


class Gateway:
    """A real gateway process (mitmproxy's full master, so `-w` records every flow)."""

    def __init__(self, d: Path, cfg: dict) -> None:
        self.dir = d
        self.flows_file = d / "flows.mitm"
        path = write_config(d, cfg)
        self.proc = launch(path, "--full", workers=1, extra=["-w", str(self.flows_file)])
        self.port = self.proc.port

    def audit(self) -> list[dict]:
        p = self.dir / "audit.jsonl"
        return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []

    def stop(self) -> list:
        self.proc.stop()
        return read_flows(self.flows_file) if self.flows_file.exists() else []


@pytest.fixture
def gateway(tmp_path, pki, real_stack, mdm):
    started: list[Gateway] = []

    def start(**kw) -> Gateway:
        d = tmp_path / f"gw{len(started)}"
        d.mkdir()
        g = Gateway(d, gateway_config(pki, real_stack, mdm, d, **kw))
        started.append(g)
        return g

    yield start
    for g in started:
        g.stop()


def client(g: Gateway, pki: Path, user, device_id: str, cert: str | None = None) -> EasClient:
    return EasClient(f"localhost:{g.port}", user.login, user.password, device_id=device_id, ca=pki / "public-ca.pem",
                     cert=(pki / f"device-{cert}.pem", pki / f"device-{cert}.key") if cert else None)


def wait_until(what: str, check, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while True:
        if r := check():
            return r
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def inbox_of(c):
    return next(f for f in c.list_folders() if f.type == FolderType.INBOX)


def sync_all(c, folder_id: str, key: str = "0") -> tuple[str, list]:
    """Sync until the server has nothing more (SOGo answers the first Sync with SyncKey -1, no items)."""
    items = []
    for _ in range(10):
        r = c.sync_folder(folder_id, sync_key=key)
        items += r.added
        if r.sync_key == key and not r.added:
            return key, items
        key = r.sync_key
        if not r.more_available and items:
            return key, items
    return key, items


def denied(exc: pytest.ExceptionInfo) -> int:
    return exc.value.response.status_code


# ---------------------------------------------------------------------------------------------


def test_managed_device_provisions_syncs_fetches_and_sends(gateway, pki, real_stack):
    """The seed scenario for real: provision, folders, inbox, attachment, SendMail into bob's IMAP."""
    g = gateway()
    subject = f"report received {uuid.uuid4().hex[:8]}"
    with client(g, pki, ALICE, MANAGED, cert="iphone") as c:
        # SOGo has no device policy: Provision Status 1 with Policy Status 2 and no PolicyKey (see
        # EasClient.provision); the client goes on without one, as MS-ASPROV allows.
        assert c.provision() is None
        folders = c.list_folders()
        names = {f.name for f in folders}
        assert {"Sent", "Drafts", "Trash"} <= names
        inbox = next(f for f in folders if f.type == FolderType.INBOX)
        _, items = sync_all(c, inbox.id)
        seed = next(i for i in items if i.fields.get("Email.Subject") == SEED_SUBJECT)
        item = c.fetch_item(inbox.id, seed.server_id)
        att = next(a for a in item.attachments if a.display_name == ATTACHMENT_NAME)
        assert c.fetch_attachment(att.file_reference) == ATTACHMENT

        m = EmailMessage()
        m["From"], m["To"], m["Subject"] = ALICE.address, BOB.address, subject
        m.set_content("thanks, got it")
        c.send_mail(m)
    # the relay answers SOGo only after Dovecot stored it, so it is in bob's mailbox already
    assert subject in real_stack.subjects(BOB)
    cmds = [(a["command"], a["decision"], a["device_id"]) for a in g.audit()]
    assert cmds == [("Provision", "allow", MANAGED), ("FolderSync", "allow", MANAGED)] + \
        [("Sync", "allow", MANAGED)] * (len(cmds) - 5) + \
        [("ItemOperations", "allow", MANAGED)] * 2 + [("SendMail", "allow", MANAGED)]


def test_unmanaged_device_denied_at_first_request_and_gets_no_mail(gateway, pki, real_stack):
    g = gateway()
    subject = f"for carol only {uuid.uuid4().hex[:8]}"
    real_stack.deliver(_mail(BOB, CAROL, subject))
    with client(g, pki, CAROL, UNMANAGED) as c:
        with pytest.raises(requests.HTTPError) as e:
            c.provision()
        assert denied(e) == 403
        c._provisioned = True  # carry on as a client that ignores the refusal would
        with pytest.raises(requests.HTTPError) as e2:
            c.list_folders()
        assert denied(e2) == 403
    assert subject in real_stack.subjects(CAROL)  # the mail is there, on the server...
    assert not any(subject.encode() in x.value.response.content for x in (e, e2))  # ...and never left it
    log = g.audit()
    assert [(a["command"], a["decision"], a["source"]) for a in log] == [("Provision", "deny", "mode"),
                                                                            ("FolderSync", "deny", "cache")]
    assert log[0]["reason"] == f"device {UNMANAGED} not managed" and log[0]["user"] == "carol"
    # nothing from that device reached the server (nginx logs every request it proxies to SOGo)
    assert UNMANAGED not in (real_stack.base / "logs/nginx-access.log").read_text()


def test_ping_held_through_the_gateway_returns_when_mail_arrives(gateway, pki, real_stack):
    g = gateway()
    subject = f"pushed {uuid.uuid4().hex[:8]}"
    with client(g, pki, BOB, MANAGED_BOB, cert="iphone") as c:
        c.provision()
        inbox = inbox_of(c)
        key, _ = sync_all(c, inbox.id)
        delivered_at = None
        deadline = time.monotonic() + 4 * MAX_PING_S
        while time.monotonic() < deadline:
            pings_before = sum(a["command"] == "Ping" for a in g.audit())
            result: list = []
            t = threading.Thread(target=lambda: result.append((c.ping([inbox.id], heartbeat=MAX_PING_S),
                                                                 time.monotonic())))
            started = time.monotonic()
            t.start()
            # the gateway has decided this Ping (and forwards it) once its audit line is there
            wait_until("the Ping to pass the gateway",
                       lambda: sum(a["command"] == "Ping" for a in g.audit()) > pings_before or result)
            if delivered_at is None and not result:
                real_stack.deliver(_mail(ALICE, BOB, subject))
                delivered_at = time.monotonic()
            t.join(MAX_PING_S + 10)
            ping, returned_at = result[0]
            if ping.status == "2":
                assert inbox.id in ping.changed_folder_ids
                key, items = sync_all(c, inbox.id, key)
                if any(i.fields.get("Email.Subject") == subject for i in items):
                    assert started < delivered_at < returned_at  # held, then woken by the new mail
                    assert returned_at - delivered_at < MAX_PING_S  # not merely the heartbeat running out
                    break
        else:
            pytest.fail("the Ping never reported the new mail")
    assert {a["command"] for a in g.audit()} >= {"Ping", "Sync"}


def test_audit_and_content_view_show_what_the_client_sent(gateway, pki, real_stack):
    g = gateway()
    with client(g, pki, ALICE, MANAGED, cert="iphone") as c:
        c.provision()
        inbox_of(c)
    with client(g, pki, CAROL, UNMANAGED) as c, pytest.raises(requests.HTTPError):
        c.provision()
    audit = g.audit()
    flows = g.stop()
    assert [(a["user"], a["device_id"], a["device_type"], a["command"], a["decision"]) for a in audit] == [
        ("alice", MANAGED, "pyactivesync", "Provision", "allow"),
        ("alice", MANAGED, "pyactivesync", "FolderSync", "allow"),
        ("carol", UNMANAGED, "pyactivesync", "Provision", "deny")]
    assert all(a["agent"].startswith("python-requests/") for a in audit)  # what pyactivesync really sends
    views = [describe(f)["ActiveSync request"] | describe(f).get("gateway", {}) for f in flows]
    assert [(v["command"], v["device id"], v["query form"]) for v in views] == [
        ("Provision", MANAGED, "plain (MS-ASHTTP 2.2.1.1.1.2)"),
        ("FolderSync", MANAGED, "plain (MS-ASHTTP 2.2.1.1.1.2)"),
        ("Provision", UNMANAGED, "plain (MS-ASHTTP 2.2.1.1.1.2)")]
    assert [v["user"] for v in views] == ["alice (from Authorization: Basic)"] * 2 + ["carol (from Authorization: Basic)"]
    assert all(v["protocol version"] == "16.1" for v in views)
    assert views[0]["client certificate"].startswith("verified") and "none" in views[2]["client certificate"]
    assert views[0]["decision"].startswith("allow") and views[2]["decision"].startswith("deny")
    assert [f.response.status_code for f in flows] == [200, 200, 403]
    assert not any("malformed" in v for v in views)
    # what SOGo answered to Provision, in mitmproxy's own WBXML view: Policy Status 2, "there is no
    # policy for this client" (MS-ASPROV 2.2.2.54.1), and no PolicyKey
    with taddons.context():
        provision = contentviews.prettify_message(flows[0].response, flows[0])
    assert provision.view_name == "WBXML" and "<PolicyType>MS-EAS-Provisioning-WBXML</PolicyType>" in provision.text
    assert "<Status>2</Status>\n        </Policy>" in provision.text and "PolicyKey" not in provision.text


@pytest.mark.parametrize("mode", ["deny", "allow", "stale"])
def test_connector_outage_as_the_real_client_sees_it(gateway, pki, real_stack, connector, mode):
    connector.allowed = {MANAGED}
    g = gateway(policy=None, connector=connector, on_connector_error=mode, cache={"allow_ttl_s": 0})
    with client(g, pki, ALICE, MANAGED) as c:
        c.provision()  # the connector is up: Allow
        connector.stop()
        if mode == "deny":
            with pytest.raises(requests.HTTPError) as e:
                c.list_folders()
            assert denied(e) == 403
        else:
            assert inbox_of(c).type == FolderType.INBOX
    with client(g, pki, CAROL, UNMANAGED) as c:  # never decided before: only fail-open lets it through
        if mode == "allow":
            assert c.provision() is None
        else:
            with pytest.raises(requests.HTTPError) as e:
                c.provision()
            assert denied(e) == 403
    log = g.audit()
    assert [(a["device_id"], a["source"]) for a in log] == [(MANAGED, "connector"), (MANAGED, "fail-mode"),
                                                           (UNMANAGED, "fail-mode")]
    reused = {"deny": "denied by on_connector_error=deny", "allow": "allowed by on_connector_error=allow",
              "stale": "last known decision: connector: Allow"}[mode]
    assert reused in log[1]["reason"]
    if mode == "stale":
        assert "no decision younger" in log[2]["reason"]


def test_required_client_certificate_with_the_real_client(gateway, pki, real_stack):
    g = gateway(tls={"certificate": str(pki / "gateway-full.pem"),
                     "client_certs": {"mode": "required", "ca": [str(pki / "device-ca.pem"), str(pki / "root-ca.pem")]}})
    with client(g, pki, ALICE, MANAGED) as c, pytest.raises(requests.exceptions.ConnectionError):
        c.provision()
    with client(g, pki, ALICE, MANAGED, cert="iphone") as c:
        c.provision()
        assert inbox_of(c).type == FolderType.INBOX
    assert [a["command"] for a in g.audit()] == ["Provision", "FolderSync"]


def _mail(sender, to, subject: str) -> EmailMessage:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = sender.address, to.address, subject
    m.set_content("delivered over SMTP and LMTP")
    return m


def test_options_reaches_the_real_server_and_shows_what_it_offers(gateway, pki, real_stack):
    """OPTIONS (MS-ASHTTP 2.2.3) through the gateway to SOGo: it offers protocol versions up to 14.1 only
    (MS-ASHTTP 2.2.4.1.2.2), yet answers pyactivesync's 16.1 requests in the other tests; the gateway
    passes both on unchanged (it does not negotiate versions, the client and the server do)."""
    g = gateway()
    with client(g, pki, ALICE, MANAGED, cert="iphone") as c:
        r = c._transport.session.options(c._transport.base_url)
    assert r.status_code == 200
    assert r.headers["MS-ASProtocolVersions"].split(",") == ["2.5", "12.0", "12.1", "14.0", "14.1"]
    assert "FolderSync" in r.headers["MS-ASProtocolCommands"].split(",")
