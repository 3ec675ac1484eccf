"""The access policy: file format, user matching, precedence, errors, reloading."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from easgate.authz.engine import Engine, run_sync
from easgate.authz.identity import Identity as _Identity
from easgate.authz.policy import (
    Policy,
    PolicyError,
    PolicyStore,
    load_policy,
    parse_policy,
    split_user,
    user_matches,
)
from easgate.core.decision import Decision, Source


def ident(user="CONTOSO\\alice", device_id="ApplF17ABCDEF01", device_type="iPhone",
          user_agent="Apple-iPhone13C2/2104.168", error=None) -> _Identity:
    return _Identity(
        user=user, user_source="query", device_id=device_id, device_id_binary=False,
        device_type=device_type, command="Sync", protocol_version="16.1", policy_key=None,
        user_agent=user_agent, client_ip="192.0.2.10",
        url="https://mail.contoso.com/Microsoft-Server-ActiveSync", query_form="plain",
        locale=None, error=error,
    )


def decide(p: Policy, i, lookup=None) -> Decision:
    """What production runs: the one authorization engine (authz.engine), here without a cache."""
    return run_sync(Engine(lambda: p, lookup).decide(i))


def policy(text: str = "", **kw) -> Policy:
    import yaml

    return parse_policy(yaml.safe_load(textwrap.dedent(text)) or {}, source=None,
                        base_dir=Path("."), **kw)


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- precedence table

TABLE_POLICY = r"""
mode: block
allow:
  devices: [ApplALLOWED0001, ApplBOTH0000001]
  users: ["CONTOSO\\svc-sync", vip]
  device_types: [WindowsMail]
  user_agents: ["Apple-iPad*"]
deny:
  devices: [ApplSTOLEN00001, ApplBOTH0000001]
  users: [mallory, "CONTOSO\\vip"]
  device_types: [Palm]
  user_agents: ["*BlackBerry*"]
inventory:
  - {device_id: ApplMANAGED0001, owner: alice, compliant: true}
  - {device_id: ApplJAILBROKEN1, owner: alice, compliant: false}
  - {device_id: ApplSHARED00001, compliant: true}
  - {device_id: ApplBOBS0000001, owner: "bob@contoso.com", compliant: true}
  - {device_id: ApplSTOLEN00001, owner: alice, compliant: true}
  - {device_id: ApplALLOWED0001, owner: bob, compliant: false}
"""

ROWS = [
    # id, identity overrides, allow, source, reason fragment
    ("identity-error", dict(error="malformed base64 query"), False, "identity", "malformed base64 query"),
    ("identity-error-beats-allow", dict(device_id="ApplALLOWED0001", error="bad"), False, "identity", "bad"),
    ("no-user", dict(user=None), False, "identity", "no user"),
    ("empty-user", dict(user=""), False, "identity", "no user"),
    ("no-device", dict(device_id=None), False, "identity", "no DeviceId"),
    ("deny-device", dict(device_id="ApplSTOLEN00001"), False, "policy", "device ApplSTOLEN00001 on deny list"),
    ("deny-device-case", dict(device_id="applstolen00001"), False, "policy", "on deny list"),
    ("deny-user-bare", dict(user="CONTOSO\\mallory"), False, "policy", "user CONTOSO\\mallory on deny list"),
    ("deny-user-upn", dict(user="Mallory@contoso.com"), False, "policy", "on deny list"),
    ("deny-type", dict(device_type="palm"), False, "policy", "device type palm on deny list"),
    ("deny-agent", dict(user_agent="BlackBerry9700/5.0"), False, "policy", "matches deny pattern '*BlackBerry*'"),
    ("deny-beats-allow-device", dict(device_id="ApplBOTH0000001"), False, "policy", "on deny list"),
    ("deny-exact-beats-allow-bare", dict(user="contoso\\VIP"), False, "policy", "user contoso\\VIP on deny list"),
    ("deny-agent-beats-allow-agent", dict(user_agent="Apple-iPad-BlackBerry"), False, "policy", "deny pattern"),
    ("allow-device", dict(device_id="ApplALLOWED0001"), True, "policy", "device ApplALLOWED0001 on allow list"),
    ("allow-user-exact", dict(user="contoso\\SVC-SYNC", device_id="X1"), True, "policy", "on allow list"),
    ("allow-user-bare-other-domain", dict(user="FABRIKAM\\vip", device_id="X1"), True, "policy", "user FABRIKAM\\vip on allow list"),
    ("allow-user-bare-upn", dict(user="vip@fabrikam.com", device_id="X1"), True, "policy", "on allow list"),
    ("allow-type", dict(device_type="windowsmail", device_id="X1"), True, "policy", "device type windowsmail on allow list"),
    ("allow-agent", dict(user_agent="apple-ipad8C1/1", device_id="X1"), True, "policy", "matches allow pattern 'Apple-iPad*'"),
    ("allow-list-beats-inventory", dict(device_id="ApplALLOWED0001", user="CONTOSO\\carol"), True, "policy", "allow list"),
    ("deny-list-beats-inventory", dict(device_id="ApplSTOLEN00001"), False, "policy", "deny list"),
    ("inventory-allow", dict(device_id="ApplMANAGED0001"), True, "inventory", "managed and compliant"),
    ("inventory-allow-upn", dict(device_id="applmanaged0001", user="alice@contoso.com"), True, "inventory", "compliant"),
    ("inventory-no-owner", dict(device_id="ApplSHARED00001", user="CONTOSO\\zed"), True, "inventory", "compliant"),
    ("inventory-not-compliant", dict(device_id="ApplJAILBROKEN1"), False, "inventory", "device ApplJAILBROKEN1 not compliant"),
    ("inventory-other-owner", dict(device_id="ApplMANAGED0001", user="CONTOSO\\bob"), False, "inventory", "device ApplMANAGED0001 belongs to another user"),
    ("inventory-owner-exact-upn", dict(device_id="ApplBOBS0000001", user="BOB@contoso.com"), True, "inventory", "compliant"),
    ("inventory-owner-exact-other-form", dict(device_id="ApplBOBS0000001", user="CONTOSO\\bob"), False, "inventory", "belongs to another user"),
    ("not-managed", dict(device_id="ApplUNKNOWN0001"), False, "mode", "device ApplUNKNOWN0001 not managed"),
    ("allow-user-bare-no-match-prefix", dict(user="vipx", device_id="X1"), False, "mode", "not managed"),
]


@pytest.mark.parametrize("overrides,allow,source,fragment", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_precedence_table(overrides, allow, source, fragment):
    d = decide(policy(TABLE_POLICY), ident(**overrides))
    assert isinstance(d, Decision)
    assert (d.allow, d.source) == (allow, source), d
    assert fragment in d.reason, d


BLOCKED = {"ApplLOST00000001", "ApplBOTH0000001"}


async def blocking_backend(i):
    """A backend like the connector's SQLite inventory: an operator blocked some devices."""
    if i.device_id in BLOCKED:
        return Decision(False, f"device {i.device_id} blocked in the inventory", Source.BLOCK)
    return None


@pytest.mark.parametrize("overrides,allow,source,fragment", [
    # an operator's block beats every allow list (issue 12 item 8: today a gateway allow list beat it)
    (dict(device_id="ApplLOST00000001", user="CONTOSO\\svc-sync"), False, "block", "blocked in the inventory"),
    (dict(device_id="ApplLOST00000001", device_type="WindowsMail"), False, "block", "blocked"),
    (dict(device_id="ApplLOST00000001", user_agent="Apple-iPad8C1/1"), False, "block", "blocked"),
    # a deny list still comes first (it names the reason the operator wrote)
    (dict(device_id="ApplBOTH0000001"), False, "policy", "on deny list"),
    # without a block, allow lists beat the backend's other answers, and the backend beats the mode
    (dict(device_id="ApplALLOWED0001"), True, "policy", "on allow list"),
    (dict(device_id="ApplUNKNOWN0001"), False, "mode", "not managed"),
], ids=["block-beats-allow-user", "block-beats-allow-type", "block-beats-allow-agent", "deny-list-before-block",
        "allow-list", "mode"])
def test_operator_block_beats_every_allow_list(overrides, allow, source, fragment):
    d = decide(policy(TABLE_POLICY), ident(**overrides), blocking_backend)
    assert (d.allow, d.source, type(d.source)) == (allow, source, Source), d
    assert fragment in d.reason, d


def test_backend_errors_propagate_to_the_caller():
    # the engine never swallows a fault into a verdict; the gateway turns it into `internal error`
    async def broken(i):
        raise RuntimeError("inventory gone")

    with pytest.raises(RuntimeError, match="inventory gone"):
        decide(policy(TABLE_POLICY), ident(device_id="ApplALLOWED0001"), broken)


@pytest.mark.parametrize("overrides,fragment", [
    (dict(device_id="A BCD"), "is not 1-32 ASCII letters and digits"),
    (dict(device_id="A" * 33), "is not 1-32 ASCII letters and digits"),
    (dict(device_id="ApplALLOWED0001", user="CONTOSO\\svc sync"), "is not printable ASCII without spaces"),
    (dict(device_id="ApplALLOWED0001", device_type="Windows Mail"), "is not printable ASCII without spaces"),
])
def test_identities_outside_ms_ashttp_are_denied_before_any_list(overrides, fragment):
    d = decide(policy(TABLE_POLICY.replace("mode: block", "mode: permit")), ident(**overrides))
    assert (d.allow, d.source) == (False, "identity") and fragment in d.reason, d


def test_permit_mode():
    p = policy(TABLE_POLICY.replace("mode: block", "mode: permit"))
    d = decide(p, ident(device_id="ApplUNKNOWN0001"))
    assert d == Decision(True, "permit mode", "mode")
    # permit still honours deny lists and the inventory
    assert not decide(p, ident(device_id="ApplSTOLEN00001")).allow
    assert decide(p, ident(device_id="ApplJAILBROKEN1")).reason == "device ApplJAILBROKEN1 not compliant"
    assert decide(p, ident(device_id="ApplMANAGED0001", user="bob")).source == "inventory"


def test_block_is_default_mode():
    p = policy("allow: {users: [x]}")
    assert p.mode == "block"
    assert decide(p, ident()) == Decision(False, "device ApplF17ABCDEF01 not managed", "mode")


def test_layers_separately():
    p = policy(TABLE_POLICY)
    assert p.inventory_decision(ident(device_id="ApplUNKNOWN0001")) is None
    assert p.inventory_decision(ident(device_id="ApplMANAGED0001")).allow
    assert p.mode_decision(ident(device_id=None)).reason == "device (none) not managed"


def test_decision_with_source_and_one_line():
    d = Decision(False, "device X\r\nFAKE LOG LINE not managed", "mode")
    assert "\n" not in d.reason and "\\r\\n" in d.reason
    c = d.with_source("cache")
    assert (c.allow, c.reason, c.source) == (False, d.reason, "cache")
    assert d.source == "mode"


def test_attacker_values_in_reasons_are_one_line():
    d = decide(policy("mode: block"), ident(device_id="Appl\nX" + "A" * 500))
    assert "\n" not in d.reason and len(d.reason) < 200


def test_empty_user_agent_and_type_do_not_match():
    p = policy('deny: {user_agents: ["*"], device_types: ["x"]}\nmode: permit')
    assert decide(p, ident(user_agent=None, device_type=None)).allow
    assert not decide(p, ident(user_agent="anything")).allow


# --------------------------------------------------------------------------- user matching


@pytest.mark.parametrize("entry,user,expected", [
    ("alice", "alice", True),
    ("alice", "ALICE", True),
    ("alice", "CONTOSO\\alice", True),
    ("alice", "fabrikam\\Alice", True),
    ("alice", "alice@contoso.com", True),
    ("Alice", "Alice@Fabrikam.COM", True),
    ("alice", "alicex", False),
    ("alice", "CONTOSO\\alicex", False),
    ("CONTOSO\\alice", "contoso\\ALICE", True),
    ("CONTOSO\\alice", "alice", False),
    ("CONTOSO\\alice", "FABRIKAM\\alice", False),
    ("CONTOSO\\alice", "alice@contoso.com", False),
    ("alice@contoso.com", "Alice@Contoso.Com", True),
    ("alice@contoso.com", "alice", False),
    ("alice@contoso.com", "alice@fabrikam.com", False),
    ("alice@contoso.com", "CONTOSO\\alice", False),
])
def test_user_matching(entry, user, expected):
    assert user_matches(entry, user) is expected
    # the policy lists use the same rule
    p = policy("mode: block")
    p = parse_policy({"allow": {"users": [entry]}}, source=None, base_dir=Path("."))
    assert decide(p, ident(user=user, device_id="X")).allow is expected
    # and so does the inventory owner
    p = parse_policy({"inventory": [{"device_id": "X", "owner": entry}]}, source=None, base_dir=Path("."))
    assert decide(p, ident(user=user, device_id="X")).allow is expected


def test_split_user():
    assert split_user(" CONTOSO\\Alice ") == ("contoso\\alice", "alice", True)
    assert split_user("Alice@Contoso.com") == ("alice@contoso.com", "alice", True)
    assert split_user("alice") == ("alice", "alice", False)


# --------------------------------------------------------------------------- files


def test_demo_policy_loads_in_block_mode():
    root = Path(__file__).resolve().parent.parent
    p = load_policy(root / "policies" / "activesync-policy.yaml")
    assert p.mode == "block"
    assert decide(p, ident(user="CONTOSO\\alice", device_id="ApplF17ABCDEF01")).allow
    assert decide(p, ident(user="CONTOSO\\svc-sync", device_id="whatever")).allow
    assert not decide(p, ident(device_id="ApplF17ABCDEF01", user_agent="BlackBerry9700")).allow
    assert decide(p, ident(device_id="Unknown1")).reason == "device Unknown1 not managed"


def test_inventory_file_csv_and_yaml(tmp_path):
    (tmp_path / "inv").mkdir()
    write(tmp_path / "inv" / "mdm.csv", """\
        # exported nightly
        device_id,owner,compliant
        ApplCSV00000001,alice,true

        ApplCSV00000002,,no
        "ApplCSV00000003",CONTOSO\\dave,
        """)
    p = load_policy(write(tmp_path / "p.yaml", """\
        inventory:
          - {device_id: ApplCSV00000002, compliant: true}   # the file overrides this
        inventory_file: inv/mdm.csv
        """))
    assert p.files == (tmp_path / "p.yaml", tmp_path / "inv" / "mdm.csv")
    assert decide(p, ident(device_id="applcsv00000001", user="alice@x")).allow
    assert decide(p, ident(device_id="ApplCSV00000002")).reason == "device ApplCSV00000002 not compliant"
    assert decide(p, ident(device_id="ApplCSV00000003", user="contoso\\DAVE")).allow  # empty cell = compliant
    assert not decide(p, ident(device_id="ApplCSV00000003", user="dave")).allow

    # headerless, columns may be left out, header columns in any order
    write(tmp_path / "b.csv", "ApplNH1\nApplNH2,erin\n")
    p = parse_policy({"inventory_file": "b.csv"}, source=None, base_dir=tmp_path)
    assert decide(p, ident(device_id="ApplNH1", user="anyone")).allow
    assert not decide(p, ident(device_id="ApplNH2", user="frank")).allow
    write(tmp_path / "c.csv", "compliant,device_id\nfalse,ApplC1\n")
    p = parse_policy({"inventory_file": "c.csv"}, source=None, base_dir=tmp_path)
    assert decide(p, ident(device_id="ApplC1")).reason == "device ApplC1 not compliant"

    write(tmp_path / "inv.yml", "- {device_id: ApplY1, owner: alice}\n- {device_id: ApplY2, compliant: false}\n")
    p = parse_policy({"inventory_file": str(tmp_path / "inv.yml")}, source=None, base_dir=Path("/nonexistent"))
    assert decide(p, ident(device_id="ApplY1")).allow
    assert not decide(p, ident(device_id="ApplY2")).allow


def test_large_inventory():
    n = 100_000
    inv = [{"device_id": f"Appl{i:011d}", "owner": f"user{i}", "compliant": i % 10 != 0}
           for i in range(n)]
    p = parse_policy({"mode": "block", "inventory": inv}, source=None, base_dir=Path("."))
    assert len(p.inventory) == n
    for i in (1, 10, 4_321, 99_999, 50_000):
        d = decide(p, ident(device_id=f"APPL{i:011d}", user=f"CONTOSO\\User{i}"))
        assert d.source == "inventory"
        assert d.allow is (i % 10 != 0), d
    assert decide(p, ident(device_id="Appl00000000001", user="user2")).reason.endswith("belongs to another user")
    assert decide(p, ident(device_id=f"Appl{n:011d}", user="user1")).reason.endswith("not managed")


def test_large_csv_inventory(tmp_path):
    n = 100_000
    with open(tmp_path / "big.csv", "w") as f:
        f.write("device_id,owner,compliant\n")
        f.writelines(f"Andc{i:011d},user{i}@contoso.com,{'true' if i % 3 else 'false'}\n" for i in range(n))
    p = load_policy(write(tmp_path / "p.yaml", "inventory_file: big.csv\n"))
    assert len(p.inventory) == n
    assert decide(p, ident(device_id="andc00000000001", user="USER1@contoso.com")).allow
    assert decide(p, ident(device_id="andc00000000003", user="user3@contoso.com")).reason.endswith("not compliant")


# --------------------------------------------------------------------------- errors

BAD = [
    # id, policy text, file name expected in message ("p" = policy, or the inventory file), key, fragments
    ("unknown-top-key", "mode: block\nalow:\n  users: [x]\n", "p", "alow",
     ["unknown key 'alow'", "did you mean 'allow'", "known keys: mode, allow, deny, inventory, inventory_file"]),
    ("unknown-list-key", "deny:\n  user: [x]\n", "p", "deny.user", ["unknown key 'deny.user'", "did you mean 'users'"]),
    ("unknown-inventory-key", "inventory:\n  - {device_id: A, complaint: true}\n", "p", "inventory[0].complaint",
     ["unknown key 'inventory[0].complaint'", "did you mean 'compliant'"]),
    ("bad-mode", "mode: blocked\n", "p", "mode", ["block, permit", "'blocked'", "write 'mode: block'"]),
    ("bad-mode-type", "mode: 1\n", "p", "mode", ["must be one of"]),
    ("list-not-list", "allow:\n  users: alice\n", "p", "allow.users", ["expected a list", "['alice']"]),
    ("wrong-type-in-list", "allow:\n  users: [a, b, 12345]\n", "p", "allow.users[2]",
     ["must be a string, got int 12345", "quote it"]),
    ("empty-entry", "deny:\n  devices: [A, '']\n", "p", "deny.devices[1]", ["empty DeviceId"]),
    ("user-without-account", "allow:\n  users: ['CONTOSO\\']\n", "p", "allow.users[0]", ["no account name"]),
    ("section-not-mapping", "allow: [x]\n", "p", "allow", ["expected a mapping"]),
    ("top-not-mapping", "- a\n- b\n", "p", "(top level)", ["expected a mapping"]),
    ("compliant-not-bool", "inventory:\n  - {device_id: A, compliant: 'maybe'}\n", "p", "inventory[0].compliant",
     ["true or false", "'maybe'"]),
    ("device-id-number", "inventory:\n  - {device_id: 0123}\n", "p", "inventory[0].device_id", ["quote it"]),
    ("missing-device-id", "inventory:\n  - {owner: a}\n", "p", "inventory[0]", ["missing device_id"]),
    ("inventory-not-list", "inventory: {device_id: A}\n", "p", "inventory", ["expected a list of devices"]),
    ("duplicate-key", "deny:\n  users: [a]\ndeny:\n  devices: [b]\n", "p", "line 3", ["duplicate key 'deny'"]),
    ("yaml-syntax", "allow:\n  users: [a\n", "p", "line", ["YAML error"]),
    ("empty-file", "", "p", "", ["policy file is empty"]),
    ("missing-inventory-file", "inventory_file: nope.csv\n", "p", "inventory_file",
     ["nope.csv does not exist", "relative paths are resolved against the policy file's directory"]),
    ("inventory-file-type", "inventory_file: inv.txt\n", "p", "inventory_file", ["use a .csv, .yaml or .yml"]),
    ("bad-csv-row", "inventory_file: bad.csv\n", "bad.csv", "line 4", ["compliant 'maybe' is not a boolean"]),
    ("csv-too-many-columns", "inventory_file: wide.csv\n", "wide.csv", "line 2", ["4 columns, expected at most 3"]),
    ("csv-unknown-column", "inventory_file: hdr.csv\n", "hdr.csv", "line 1",
     ["unknown column 'complaint'", "did you mean 'compliant'"]),
    ("bad-yaml-inventory-entry", "inventory_file: inv.yaml\n", "inv.yaml", "[1].owner", ["owner must be a string"]),
]


@pytest.mark.parametrize("text,in_file,key,fragments", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_policy_files(tmp_path, text, in_file, key, fragments):
    write(tmp_path / "bad.csv", "device_id,owner,compliant\nA1,alice,true\n# comment\nA2,bob,maybe\n")
    write(tmp_path / "wide.csv", "A1,alice,true\nA2,bob,true,extra\n")
    write(tmp_path / "hdr.csv", "device_id,complaint\nA1,true\n")
    write(tmp_path / "inv.yaml", "- {device_id: A1}\n- {device_id: A2, owner: [x]}\n")
    path = write(tmp_path / "p.yaml", text)
    with pytest.raises(PolicyError) as e:
        load_policy(path)
    msg = str(e.value)
    expected_file = path if in_file == "p" else tmp_path / in_file
    assert str(expected_file) in msg
    assert e.value.file == str(expected_file)
    assert key in msg and key in (e.value.key or "")
    for f in fragments:
        assert f in msg, msg
    assert "\n" not in msg


def test_unknown_key_message_format(tmp_path):
    path = write(tmp_path / "p.yaml", "alow: {}\n")
    with pytest.raises(PolicyError, match=r"^unknown key 'alow' in .*p\.yaml.*; known keys: "):
        load_policy(path)


# --------------------------------------------------------------------------- store


def _bump(path: Path, text: str) -> None:
    """Replace ``path`` atomically (a new file renamed over it), as an operator or MDM export should."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(textwrap.dedent(text), encoding="utf-8")
    os.replace(tmp, path)


def settled(store: PolicyStore):
    """A replaced file is applied at the next check."""
    return store.reload_if_changed()


def test_store_never_applies_a_file_changed_in_place(tmp_path):
    """A file rewritten in place may be half written however long it stays so: the automatic check
    reports it once and keeps the last good policy; replacing the file (or a forced reload) applies it."""
    path = write(tmp_path / "p.yaml", "mode: block\nallow: {users: [alice, bob]}\n")
    store = PolicyStore(path)
    good = store.policy
    with open(path, "w") as f:  # truncate, write half (still valid YAML), pause
        f.write("mode: block\nallow: {users: [alice]}\n")
        f.flush()
        for _ in range(3):
            changed, err = store.reload_if_changed()
            assert not changed and store.policy is good
            if _ == 0:
                assert "changed in place" in err and str(path) in err and "rename" in err
            else:
                assert err is None  # said once
    assert decide(store.policy, ident(user="bob")).allow
    assert store.reload() == (True, None)  # easgate.reload: the operator says it is complete
    assert not decide(store.policy, ident(user="bob")).allow
    _bump(path, "mode: permit\n")
    assert store.reload_if_changed() == (True, None) and store.policy.mode == "permit"


def test_a_file_changed_in_place_stays_unapplied_when_another_is_replaced(tmp_path):
    """The policy is being written in place when the MDM's export (its inventory_file) is renamed
    in: loading now would read the half-written policy, so nothing is applied until the policy
    file itself is replaced."""
    inv = write(tmp_path / "inv.csv", "ApplA1,alice,true\n")
    path = write(tmp_path / "p.yaml", "inventory_file: inv.csv\ndeny: {devices: [ApplSTOLEN]}\n")
    store = PolicyStore(path)
    good = store.policy
    with open(path, "w") as f:
        f.write("inventory_file: inv.csv\n")  # half: without the deny list
        f.flush()
        assert "changed in place" in store.reload_if_changed()[1]
        _bump(inv, "ApplA1,alice,true\nApplB2,bob,true\n")
        assert store.reload_if_changed() == (False, None) and store.policy is good
    _bump(path, "inventory_file: inv.csv\ndeny: {devices: [ApplSTOLEN]}\n")
    assert store.reload_if_changed() == (True, None)
    assert decide(store.policy, ident(device_id="ApplB2", user="bob")).allow


def test_store_reload_keeps_last_good(tmp_path):
    path = write(tmp_path / "p.yaml", "mode: block\nallow: {users: [alice]}\n")
    store = PolicyStore(path)
    gen = store.generation
    assert decide(store.policy, ident(user="alice")).allow
    assert store.reload_if_changed() == (False, None)

    _bump(path, "mode: block\nallow: {users: [bob]}\n")
    assert settled(store) == (True, None)
    assert store.generation == gen + 1
    assert not decide(store.policy, ident(user="alice")).allow
    assert decide(store.policy, ident(user="bob")).allow

    good = store.policy
    _bump(path, "mode: block\nalow: {users: [carol]}\n")
    changed, err = settled(store)
    assert changed is False and "unknown key 'alow'" in err and str(path) in err
    assert store.policy is good and store.last_error == err
    assert store.generation == gen + 1
    # reported once per broken version; the error stays visible
    assert store.reload_if_changed() == (False, None)
    assert store.last_error == err

    _bump(path, "")  # a half-written (empty) file never replaces a good policy
    changed, err = settled(store)
    assert not changed and "empty" in err and store.policy is good

    path.unlink()  # neither does a deleted one
    changed, err = settled(store)
    assert not changed and "not found" in err and store.policy is good

    write(path, "mode: permit\n")
    assert settled(store) == (True, None)
    assert store.policy.mode == "permit" and store.last_error is None


def test_store_watches_inventory_file(tmp_path):
    inv = write(tmp_path / "inv.csv", "ApplA1,alice,true\n")
    path = write(tmp_path / "p.yaml", "inventory_file: inv.csv\n")
    store = PolicyStore(path)
    assert store.policy.files == (path, inv)
    assert decide(store.policy, ident(device_id="ApplA1", user="alice")).allow

    _bump(inv, "ApplA1,alice,false\n")
    assert settled(store) == (True, None)
    assert decide(store.policy, ident(device_id="ApplA1", user="alice")).reason == "device ApplA1 not compliant"

    good = store.policy
    _bump(inv, "ApplA1,alice,perhaps\n")
    changed, err = settled(store)
    assert not changed and str(inv) in err and "line 1" in err
    assert store.policy is good


def test_store_force_reload_and_initial_failure(tmp_path):
    path = write(tmp_path / "p.yaml", "mode: block\n")
    store = PolicyStore(path)
    first = store.policy
    assert store.reload() == (True, None)
    assert store.policy is not first
    with pytest.raises(PolicyError):
        PolicyStore(write(tmp_path / "q.yaml", "mode: maybe\n"))
