"""The connector inventory on PostgreSQL: one inventory for several `easgate connector` processes.

Against a real PostgreSQL started by the session (tests/conftest.py, easgate.tools.clusterservers).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

from easgate import cli
from easgate.connector.config import load_connector_config
from easgate.connector.inventories import open_inventory
from easgate.connector.pgstore import PgInventory, redact
from easgate.connector.store import ImportFileError, Inventory, InventoryError
from easgate.core.errors import ConfigError
from easgate.tools.clusterservers import TestPostgres

from conftest import ConnectorProcess, wait_for

ROOT = Path(__file__).resolve().parent.parent
def env() -> dict:
    """The environment now (with the session's fork server), not at import."""
    return dict(os.environ, PYTHONUNBUFFERED="1")


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


@pytest.fixture(params=["sqlite", "postgresql"])
def any_inv(request, tmp_path):
    """The same behaviour from both stores: the SQLite default and PostgreSQL."""
    target = tmp_path / "d.db" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    inv = open_inventory(target)
    yield inv
    inv.close()


def rows(inv) -> dict[str, tuple]:
    return {d.device_id: (d.user, d.managed, d.compliant, d.blocked) for d in inv.all()}


# ------------------------------------------------------------------------------------------------
# The store: the SQLite store's behaviour, on PostgreSQL


def test_both_stores_add_block_and_match_device_ids_case_insensitively(any_inv):
    assert any_inv.add("ApplF17ABCDEF01", "alice") is True
    assert any_inv.add("applf17abcdef01", "CONTOSO\\alice") is False  # the same device
    assert any_inv.count() == 1
    assert any_inv.get("APPLF17ABCDEF01").user == "CONTOSO\\alice"
    assert any_inv.set_blocked("APPLf17abcdef01", True) and any_inv.get("applf17abcdef01").blocked
    assert any_inv.set_blocked("nope", True) is False
    any_inv.touch("applf17abcdef01")
    assert any_inv.flush_seen() == 1 and any_inv.get("ApplF17ABCDEF01").last_seen
    assert any_inv.remove("ApplF17ABCDEF01") and any_inv.get("ApplF17ABCDEF01") is None
    with pytest.raises(ValueError, match="contains spaces"):
        any_inv.add("bad id", "alice")


def test_both_stores_import_keeps_operator_blocks_and_replace_removes_unlisted(any_inv, tmp_path):
    any_inv.import_file(write(tmp_path, "a.csv", "device_id,user\nd1,alice\nd2,bob\n"))
    any_inv.set_blocked("d1", True)
    rep = any_inv.import_file(write(tmp_path, "b.csv", "device_id,user,compliant\nD1,alice,false\nd3,carol,\n"))
    assert (rep.inserted, rep.updated, rep.removed) == (1, 1, 0)
    got = rows(any_inv)
    assert got["D1"] == ("alice", True, False, True)  # compliant updated, the block kept
    assert got["d3"] == ("carol", True, True, False)  # empty cell: the default
    rep = any_inv.import_file(write(tmp_path, "c.csv", "device_id,user,blocked\nd1,alice,no\n"), replace=True)
    assert (rep.inserted, rep.updated, rep.removed) == (0, 1, 2)
    assert rows(any_inv) == {"d1": ("alice", True, False, False)}
    with pytest.raises(ImportFileError, match=r"bad\.csv:3: device_id 'x y'"):  # nothing written
        any_inv.import_file(write(tmp_path, "bad.csv", "device_id,user\nd9,alice\nx y,bob\n"))
    assert any_inv.get("d9") is None


def test_a_change_by_one_connector_is_seen_by_the_others_next_lookup_and_notified(pg_url):
    a, b = PgInventory(pg_url), PgInventory(pg_url)
    seen: list[str] = []
    b.watch(seen.append)
    try:
        a.add("dev1", "alice")
        assert b.get("dev1").blocked is False
        a.set_blocked("DEV1", True)
        assert b.get("dev1").blocked is True  # the very next lookup, no reload
        wait_for(lambda: seen == ["dev1", "dev1"], 5, "two notifications")
        a.touch("dev1")
        a.flush_seen()  # last_seen only: nothing a decision depends on, no notification
        a.remove("dev1")
        wait_for(lambda: len(seen) == 3, 5, "the removal's notification")
        assert seen == ["dev1", "dev1", "dev1"]
    finally:
        a.close()
        b.close()


def test_server_restart_is_an_unreadable_inventory_then_recovers_without_restart(postgres_server):
    """Its own PostgreSQL: lookups fail with InventoryError (the connector's 503) while it is down,
    and the same PgInventory works again once it is back; the LISTEN thread reports '*'."""
    pg = TestPostgres().start()
    try:
        url = pg.create_database("inv")
        inv = PgInventory(url)
        seen: list[str] = []
        inv.watch(seen.append, retry_s=0.1)
        inv.add("d1", "alice")
        wait_for(lambda: "d1" in seen, 5, "notification")
        pg.proc.send_signal(signal.SIGINT)
        pg.proc.wait(20)
        with pytest.raises(InventoryError, match=re.escape(redact(url))):
            inv.get("d1")
        pg._spawn()
        wait_for(pg.ready, 30, "postgres back")
        assert inv.get("d1").user == "alice"
        wait_for(lambda: "*" in seen, 10, "the listener's catch-up '*'")
        inv.close()
    finally:
        pg.stop()


def test_wrong_table_and_unreachable_server_are_one_line_errors(postgres_server):
    url = postgres_server.create_database("notinv")
    postgres_server.psql("CREATE TABLE devices (id int)", db="notinv")
    with pytest.raises(InventoryError, match=r"table devices has columns \['id'\].*not an easgate inventory"):
        PgInventory(url)
    bad = url.replace("postgresql://postgres@", "postgresql://postgres:secret@").replace(
        f":{postgres_server.port}/", ":1/")
    with pytest.raises(InventoryError) as e:
        PgInventory(bad)
    msg = str(e.value)
    assert "\n" not in msg and "secret" not in msg and "cannot connect to the PostgreSQL inventory" in msg
    with pytest.raises(InventoryError, match="no devices table in this database"):
        PgInventory(postgres_server.create_database("empty"), create=False)


# ------------------------------------------------------------------------------------------------
# Config and CLI


def test_connector_config_takes_a_postgresql_url(tmp_path):
    cfg = write(tmp_path, "connector.yaml", "inventory: postgresql://easgate:pw@db.internal:5432/easgate\n")
    assert load_connector_config(cfg).inventory == "postgresql://easgate:pw@db.internal:5432/easgate"
    cfg = write(tmp_path, "c2.yaml", "inventory: state/devices.db\n")
    assert load_connector_config(cfg).inventory == tmp_path / "state" / "devices.db"
    cfg = write(tmp_path, "c3.yaml", "inventory: postgresql://h/db\nredis: redis://10.0.0.5:6379/0\n")
    assert load_connector_config(cfg).redis == "redis://10.0.0.5:6379/0"
    for text, problem in (("inventory: d.db\nredis: redis://h:6379/0\n",
                           "redis: block events come from a PostgreSQL inventory's change feed"),
                          ("inventory: postgresql://h/db\nredis: http://h\n", "redis: 'http://h' is not a Redis URL")):
        with pytest.raises(ConfigError, match=re.escape(problem)):
            load_connector_config(write(tmp_path, "bad.yaml", text))


def test_easgate_devices_against_postgresql(pg_url, tmp_path, capsys):
    def run(*argv: str) -> tuple[int, str, str]:
        code = cli.main(["devices", *argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    f = write(tmp_path, "mdm.csv", "device_id,user,device_type\nApplF17ABCDEF01,alice,iPhone\nandroid42,bob,Android\n")
    code, out, _ = run("--db", pg_url, "import", str(f))
    assert code == 0 and "2 added, 0 updated; 2 devices in postgresql://" in out
    cfg = write(tmp_path, "connector.yaml", f"inventory: {pg_url}\n")
    assert run("-c", str(cfg), "block", "applf17abcdef01") == (0, "blocked applf17abcdef01\n", "")
    code, out, _ = run("--db", pg_url, "list", "--json")
    listed = {d["device_id"]: d for d in json.loads(out)}
    assert listed["ApplF17ABCDEF01"]["blocked"] is True and listed["android42"]["blocked"] is False
    code, _, err = run("--db", pg_url, "remove", "nope")
    assert code == 1 and "no device 'nope' in postgresql://" in err


def test_missing_cluster_extra_is_one_line_naming_the_pip_command(tmp_path):
    """The base install (no psycopg): SQLite works, a postgresql:// inventory says what to install."""
    code = ("import sys; sys.modules['psycopg'] = None; from easgate import cli; "
            "sys.exit(cli.main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "devices", "--db", "postgresql://u@127.0.0.1:1/x", "list"],
                       capture_output=True, text=True, env=env(), timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "easgate devices: a postgresql:// inventory needs the PostgreSQL driver; pip install 'easgate[cluster]'"]
    r = subprocess.run([sys.executable, "-c", code, "devices", "--db", str(tmp_path / "d.db"), "add", "d1", "--user",
                        "alice"], capture_output=True, text=True, env=env(), timeout=60)
    assert r.returncode == 0, r.stderr
    cfg = write(tmp_path, "connector.yaml", "listen: {host: 127.0.0.1, port: 0}\ninventory: postgresql://u@127.0.0.1:1/x\n")
    r = subprocess.run([sys.executable, "-c", code, "connector", str(cfg)], capture_output=True, text=True, env=env(),
                       timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"easgate connector: config error: {cfg}: inventory: a postgresql:// inventory needs the PostgreSQL driver; "
        "pip install 'easgate[cluster]'"]


# ------------------------------------------------------------------------------------------------
# Two `easgate connector` processes, one inventory


class Connector(ConnectorProcess):
    """A real `easgate connector` process (the shared launcher) that asks for decisions."""

    def __init__(self, cfg: Path) -> None:
        super().__init__(ConnectorProcess.argv(cfg), env=env())
        self.wait_ready(30)

    def authorize(self, user: str, device: str) -> tuple[int, dict]:
        url = f"https://mail.example.test/Microsoft-Server-ActiveSync?Cmd=Ping&User={user}&DeviceId={device}&DeviceType=iPhone"
        q = urllib.parse.urlencode({"user": user, "agent": "Apple-iPhone", "ip": "10.0.0.1",
                                    "url": base64.b64encode(url.encode()).decode(), "resultType": "json",
                                    "DeviceId": device})
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            c.request("GET", f"/services/ActiveSync/Authorize?{q}")
            r = c.getresponse()
            return r.status, json.loads(r.read())
        finally:
            c.close()


def test_two_connectors_serve_one_postgresql_inventory(pg_url, tmp_path, capsys):
    assert cli.main(["devices", "--db", pg_url, "add", "ApplF17ABCDEF01", "--user", "alice"]) == 0
    cfg = write(tmp_path, "connector.yaml", f"listen: {{host: 127.0.0.1, port: 0}}\ninventory: {pg_url}\n")
    a, b = Connector(cfg), Connector(cfg)
    try:
        assert "1 devices in postgresql://" in a.output
        for c in (a, b):
            status, body = c.authorize("alice", "ApplF17ABCDEF01")
            assert (status, body["result"], body["reason"]) == (200, "Allow", "device ApplF17ABCDEF01 managed and compliant")
        assert cli.main(["devices", "--db", pg_url, "block", "ApplF17ABCDEF01"]) == 0
        for c in (a, b):  # no reload, no wait: the next callout on either connector
            status, body = c.authorize("alice", "ApplF17ABCDEF01")
            assert (status, body["result"], body["reason"]) == (200, "Deny", "device ApplF17ABCDEF01 blocked in the inventory")
        assert cli.main(["devices", "--db", pg_url, "unblock", "ApplF17ABCDEF01"]) == 0
        assert b.authorize("alice", "ApplF17ABCDEF01")[1]["result"] == "Allow"
        assert a.stop() == 0 and b.stop() == 0
        inv = PgInventory(pg_url)
        assert inv.get("ApplF17ABCDEF01").last_seen is not None  # flushed on stop
        inv.close()
    finally:
        a.stop()
        b.stop()
    capsys.readouterr()


def test_sqlite_stays_the_default(tmp_path):
    inv = open_inventory(tmp_path / "d.db")
    assert isinstance(inv, Inventory)
    inv.close()
