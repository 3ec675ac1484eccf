"""The SQLite device inventory: import (CSV, YAML) with per-line errors, the CLI, the decision rows."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import pytest

from easgate import cli
from easgate.connector.store import (
    Device,
    ImportFileError,
    Inventory,
    InventoryError,
    device_decision,
)

from conftest import easgate_argv

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def inv(tmp_path) -> Inventory:
    i = Inventory(tmp_path / "devices.db")
    yield i
    i.close()


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def devices(db: Path) -> dict[str, tuple]:
    with sqlite3.connect(db) as c:
        return {r[0]: r[1:] for r in c.execute("SELECT device_id, user, device_type, model, managed, compliant, "
                                               "blocked FROM devices")}


# ------------------------------------------------------------------------------------------------
# The database


def test_new_database_is_wal_with_the_documented_table(inv):
    c = sqlite3.connect(inv.path)
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    cols = [r[1] for r in c.execute("PRAGMA table_info(devices)")]
    assert cols == ["device_id", "user", "device_type", "model", "managed", "compliant", "blocked", "last_seen",
                    "updated"]


def test_lookup_is_a_primary_key_search_whatever_the_size(inv):
    """The reason 100,000 devices cost the same as 10 (bench/bench_inventory.py measures it)."""
    plan = " ".join(str(r) for r in inv.conn.execute(
        "EXPLAIN QUERY PLAN SELECT * FROM devices WHERE device_id = ?", ("x",)).fetchall())
    assert "USING PRIMARY KEY" in plan and "SCAN" not in plan


def test_device_ids_are_case_insensitive(inv):
    inv.add("ApplF17ABCDEF01", "alice", "iPhone")
    assert inv.get("applf17abcdef01").device_id == "ApplF17ABCDEF01"
    assert inv.add("APPLF17ABCDEF01", "bob") is False  # same device, replaced
    assert inv.count() == 1 and inv.get("ApplF17ABCDEF01").user == "bob"


def test_changes_by_another_connection_are_seen_at_once(inv, tmp_path):
    assert inv.get("dev1") is None and inv.count() == 0
    other = Inventory(tmp_path / "devices.db")  # what `easgate devices` in another process does
    other.add("dev1", "alice")
    assert inv.get("dev1").user == "alice" and inv.count() == 1
    other.set_blocked("dev1", True)
    assert inv.get("dev1").blocked is True
    other.remove("dev1")
    assert inv.get("dev1") is None and inv.count() == 0
    other.close()


def test_last_seen_is_written_in_batches_and_kept_while_the_db_is_locked(inv, tmp_path):
    inv.add("dev1", "alice")
    inv.touch("dev1")
    inv.touch("unknown")  # not in the inventory: nothing to update
    assert inv.get("dev1").last_seen is None  # not yet written
    locker = sqlite3.connect(tmp_path / "devices.db", isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # an import holding the write lock
    assert inv.flush_seen(timeout_s=0.05) == 0
    assert inv.get("dev1").last_seen is None  # readers are not blocked by the writer
    locker.execute("ROLLBACK")
    assert inv.flush_seen() == 1
    assert inv.get("dev1").last_seen.endswith("Z")


def test_not_an_inventory_is_refused_with_the_fix(tmp_path):
    junk = write(tmp_path, "junk.db", "this is not sqlite" * 100)
    with pytest.raises(InventoryError, match=r"junk\.db: not a usable SQLite database.*another --db path"):
        Inventory(junk)
    with pytest.raises(InventoryError, match=r"missing\.db: inventory database not found; create it with"):
        Inventory(tmp_path / "missing.db", create=False)


# ------------------------------------------------------------------------------------------------
# The decision an inventory row gives


def row(**kw) -> Device:
    base = dict(device_id="D1", user="alice", device_type="iPhone", model="", managed=True, compliant=True,
                blocked=False, last_seen=None, updated="")
    return Device(**{**base, **kw})


@pytest.mark.parametrize("r, user, expected", [
    (None, "alice", None),
    (row(), "alice", (True, "device D1 managed and compliant")),
    (row(), "CONTOSO\\Alice", (True, "device D1 managed and compliant")),  # bare owner: any domain
    (row(), "alice@contoso.com", (True, "device D1 managed and compliant")),
    (row(user="CONTOSO\\alice"), "alice@contoso.com", (False, "device D1 belongs to another user")),
    (row(user="CONTOSO\\alice"), "contoso\\ALICE", (True, "device D1 managed and compliant")),
    (row(), "bob", (False, "device D1 belongs to another user")),
    (row(compliant=False), "alice", (False, "device D1 not compliant")),
    (row(managed=False), "alice", None),  # known but unmanaged: the policy mode decides
    # an operator's block has its own source: the engine lets it beat every allow list
    (row(blocked=True), "alice", (False, "device D1 blocked in the inventory", "block")),
    (row(blocked=True, managed=False), "alice", (False, "device D1 blocked in the inventory", "block")),
])
def test_device_decision(r, user, expected):
    d = device_decision(r, "D1", user)
    if expected is None:
        assert d is None
    else:
        want = expected if len(expected) == 3 else (*expected, "inventory")
        assert (d.allow, d.reason, d.source) == want


# ------------------------------------------------------------------------------------------------
# Import


MDM_CSV = """\ufeff# exported from the MDM
Device ID,User Name,Platform,Model,Managed,Compliant

ApplF17ABCDEF01,alice,iPhone,"iPhone 15, 128 GB",yes,yes
ApplDMPQ99887766,alice,iPad,iPad Air,no,1
androidc1234567890,bob@contoso.com,Android,Pixel 8,TRUE,false
"""


def test_csv_export_with_header_aliases_bom_comments_and_quotes(inv, tmp_path):
    rep = inv.import_file(write(tmp_path, "export.csv", MDM_CSV))
    assert (rep.inserted, rep.updated, rep.skipped) == (3, 0, 0)
    assert devices(inv.path) == {
        "ApplF17ABCDEF01": ("alice", "iPhone", "iPhone 15, 128 GB", 1, 1, 0),
        "ApplDMPQ99887766": ("alice", "iPad", "iPad Air", 0, 1, 0),
        "androidc1234567890": ("bob@contoso.com", "Android", "Pixel 8", 1, 0, 0),
    }


BAD_CSV = """device_id,user,managed,compliant
good1,alice,true,true
bad id,alice,true,true
good2,,true,true
good3,bob,maybe,true
good4,bob,true,true,extra
good1,carol,true,true
good5,dave,1,0
"""


def test_csv_bad_rows_are_reported_by_line_and_nothing_is_imported(inv, tmp_path):
    f = write(tmp_path, "bad.csv", BAD_CSV)
    with pytest.raises(ImportFileError) as e:
        inv.import_file(f)
    assert [err.split(": ", 1)[0] for err in e.value.errors] == [f"{f}:{n}" for n in (3, 4, 5, 6, 7)]
    text = "\n".join(e.value.errors)
    assert "device_id 'bad id' contains spaces" in text
    assert f"{f}:4: empty user; write the owner as alice" in text
    assert f"{f}:5: managed 'maybe' is not true or false; write true or false" in text
    assert f"{f}:6: 5 cells but 4 columns" in text
    assert f"{f}:7: device good1 is already on line 2; keep one row per device" in text
    assert inv.count() == 0  # all or nothing


def test_csv_skip_bad_imports_the_good_rows(inv, tmp_path):
    rep = inv.import_file(write(tmp_path, "bad.csv", BAD_CSV), skip_bad=True)
    assert (rep.inserted, rep.skipped) == (2, 5)
    assert set(devices(inv.path)) == {"good1", "good5"}
    assert devices(inv.path)["good5"] == ("dave", "", "", 1, 0, 0)


@pytest.mark.parametrize("text, problem", [
    ("ApplF17ABCDEF01,alice\n", "unknown column 'ApplF17ABCDEF01'"),
    ("device_id,user,colour\nx,alice,red\n", "unknown column 'colour'; known: device_id, user"),
    ("device_id,user,complaint\nx,alice,true\n", "unknown column 'complaint' (did you mean 'compliant'?)"),
    ("device_id,model\nx,iPhone\n", "header has no user column"),
    ("device_id,user,owner\nx,alice,bob\n", "column 'owner' repeats user"),
    ("# only a comment\n", "no header row"),
    ("device_id,user\n", "no devices in the file"),
])
def test_csv_header_problems(inv, tmp_path, text, problem):
    f = write(tmp_path, "h.csv", text)
    with pytest.raises(ImportFileError) as e:
        inv.import_file(f)
    assert problem in str(e.value) and str(e.value).startswith(str(f))


def test_yaml_import_with_bad_rows_by_line(inv, tmp_path):
    f = write(tmp_path, "export.yaml", """\
devices:
  - {device_id: ApplF17ABCDEF01, user: alice, device_type: iPhone, managed: true, compliant: true}
  - device_id: androidc1234567890
    user: bob@contoso.com
    compliant: false
  - {device_id: 12345, user: bob}
  - {device_id: x2, user: bob, compliant: maybe}
  - {device_id: x3, user: bob, colour: red}
  - {device_id: x4, user: bob, user: carol}
  - just a string
  - {device_id: x5, user: erin, last_seen: 2025-01-31T08:00:00Z}
""")
    with pytest.raises(ImportFileError) as e:
        inv.import_file(f)
    errs = e.value.errors
    assert [err.split(": ", 1)[0] for err in errs] == [f"{f}:{n}" for n in (6, 7, 8, 9, 10)]
    assert "device_id must be text, got int; quote it" in errs[0]
    assert "compliant 'maybe' is not true or false" in errs[1]
    assert "unknown key 'colour'" in errs[2]
    assert "key 'user' repeats user; write each key once" in errs[3]
    assert "a device must be a mapping" in errs[4]
    assert inv.count() == 0
    rep = inv.import_file(f, skip_bad=True)
    assert (rep.inserted, rep.skipped) == (3, 5)
    assert devices(inv.path)["androidc1234567890"] == ("bob@contoso.com", "", "", 1, 0, 0)
    assert inv.get("x5").last_seen == "2025-01-31T08:00:00Z"


def test_yaml_plain_list_and_syntax_error(inv, tmp_path):
    rep = inv.import_file(write(tmp_path, "l.yml", "- {device_id: a1, user: alice}\n- {device_id: a2, user: bob}\n"))
    assert rep.inserted == 2
    f = write(tmp_path, "broken.yaml", "- {device_id: a1, user: alice\n- x\n")
    with pytest.raises(ImportFileError, match=rf"{f}:\d+: not valid YAML"):
        inv.import_file(f)
    with pytest.raises(ImportFileError, match=r"unsupported file type '\.json'"):
        inv.import_file(write(tmp_path, "x.json", "[]"))


def test_reimport_keeps_operator_blocks_and_replace_removes_unlisted(inv, tmp_path):
    inv.import_file(write(tmp_path, "a.csv", "device_id,user\nd1,alice\nd2,bob\n"))
    inv.set_blocked("d1", True)
    rep = inv.import_file(write(tmp_path, "b.csv", "device_id,user,compliant\nd1,alice,false\nd3,carol,\n"))
    assert (rep.inserted, rep.updated, rep.removed) == (1, 1, 0)
    got = devices(inv.path)
    assert got["d1"] == ("alice", "", "", 1, 0, 1)  # compliant updated, the block kept
    assert got["d3"] == ("carol", "", "", 1, 1, 0)  # empty cell: the default
    rep = inv.import_file(write(tmp_path, "c.csv", "device_id,user,blocked\nd1,alice,no\n"), replace=True)
    assert (rep.inserted, rep.updated, rep.removed) == (0, 1, 2)
    assert devices(inv.path) == {"d1": ("alice", "", "", 1, 0, 0)}


def test_replace_refuses_bad_rows_even_with_skip_bad(inv, tmp_path):
    inv.add("keep", "alice")
    with pytest.raises(ImportFileError, match="--replace with bad rows would remove those devices"):
        inv.import_file(write(tmp_path, "r.csv", "device_id,user\nkeep,\nother,bob\n"), skip_bad=True, replace=True)
    assert inv.get("keep") is not None


# ------------------------------------------------------------------------------------------------
# easgate devices ...


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["devices", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_add_block_unblock_remove_list(tmp_path, capsys):
    db = str(tmp_path / "d.db")
    assert run(capsys, "--db", db, "add", "ApplF17ABCDEF01", "--user", "alice", "--type", "iPhone",
               "--model", "iPhone 15")[0] == 0
    assert run(capsys, "add", "X2", "--db", db, "--user", "CONTOSO\\bob", "--unmanaged", "--noncompliant")[0] == 0
    code, out, _ = run(capsys, "--db", db, "block", "applf17abcdef01")
    assert code == 0 and "blocked applf17abcdef01" in out
    code, out, _ = run(capsys, "--db", db, "list", "--json")
    listed = {d["device_id"]: d for d in json.loads(out)}
    assert listed["ApplF17ABCDEF01"] | {"updated": None} == {
        "device_id": "ApplF17ABCDEF01", "user": "alice", "device_type": "iPhone", "model": "iPhone 15",
        "managed": True, "compliant": True, "blocked": True, "last_seen": None, "updated": None}
    assert (listed["X2"]["managed"], listed["X2"]["compliant"]) == (False, False)
    code, out, _ = run(capsys, "--db", db, "list", "--user", "bob")
    assert code == 0 and "X2" in out and "ApplF17" not in out and "(1 devices)" in out
    assert run(capsys, "--db", db, "unblock", "ApplF17ABCDEF01")[0] == 0
    assert Inventory(db).get("ApplF17ABCDEF01").blocked is False
    assert run(capsys, "--db", db, "remove", "X2")[0] == 0
    code, _, err = run(capsys, "--db", db, "remove", "X2")
    assert code == 1 and "no device 'X2'" in err and "easgate devices list" in err
    code, _, err = run(capsys, "--db", db, "block", "nope")
    assert code == 1 and "add it first with `easgate devices add ID --user U`" in err


def test_cli_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EASGATE_DEVICES_DB", raising=False)
    code, _, err = run(capsys, "list")
    assert code == 2 and "pass --db PATH" in err
    code, _, err = run(capsys, "--db", str(tmp_path / "none.db"), "list")
    assert code == 2 and "inventory database not found" in err and not (tmp_path / "none.db").exists()
    code, _, err = run(capsys, "--db", str(tmp_path / "d.db"), "add", "bad id", "--user", "alice")
    assert code == 2 and "contains spaces" in err
    code, _, err = run(capsys, "--db", str(tmp_path / "d.db"), "add", "ok", "--user", "CONTOSO\\")
    assert code == 2 and "has no account name" in err


def test_cli_finds_the_database_through_the_connector_config(tmp_path, capsys):
    cfg = write(tmp_path, "connector.yaml", "inventory: state/devices.db\n")
    assert run(capsys, "-c", str(cfg), "add", "d1", "--user", "alice")[0] == 0
    assert Inventory(tmp_path / "state" / "devices.db").get("d1").user == "alice"
    code, out, _ = run(capsys, "list", "--config", str(cfg))
    assert code == 0 and "d1" in out
    bad = write(tmp_path, "bad.yaml", "inventory: x.db\nlisten: {prot: 1}\n")
    code, _, err = run(capsys, "-c", str(bad), "list")
    assert code == 2 and f"{bad}: listen.prot: unknown key" in err
    code, _, err = run(capsys, "-c", str(cfg), "--db", "x.db", "list")
    assert code == 2 and "either --db or --config" in err


def test_cli_import_reports_lines_and_exit_codes(tmp_path, capsys):
    db = str(tmp_path / "d.db")
    f = write(tmp_path, "bad.csv", BAD_CSV)
    code, _, err = run(capsys, "--db", db, "import", str(f))
    assert code == 1
    assert f"{f}:5: managed 'maybe' is not true or false" in err
    assert "nothing imported" in err and "--skip-bad" in err
    code, out, err = run(capsys, "--db", db, "import", str(f), "--skip-bad")
    assert code == 0 and "2 added, 0 updated, 5 bad rows skipped; 2 devices" in out
    assert f"skipped {f}:3: device_id 'bad id'" in err


def test_demo_inventory_file_imports_cleanly(tmp_path):
    """policies/demo-inventory.csv is what the demo loads: as an installed command, end to end."""
    db = tmp_path / "d.db"
    r = subprocess.run(easgate_argv("devices", "--db", str(db), "import", str(ROOT / "policies" / "demo-inventory.csv")),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    got = devices(db)
    assert got["ApplF17ABCDEF01"][:1] + got["ApplF17ABCDEF01"][3:] == ("alice", 1, 1, 0)
    assert got["ApplDMPQ99887766"][3] == 0  # the iPad is not managed
    from easgate.tools.demo import FALLBACK_INVENTORY
    rows = [ln for ln in (ROOT / "policies" / "demo-inventory.csv").read_text().splitlines() if not ln.startswith("#")]
    assert rows == FALLBACK_INVENTORY.splitlines()
