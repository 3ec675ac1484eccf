"""The access policy file and its evaluation (the XenMobile NetScaler Connector half).

Policy file format (YAML)
=========================

Every key is optional; unknown keys are errors, so a typo can never silently
disable a rule::

    mode: block                 # block: only allowed/managed devices pass (XNC "Block Mode", the default)
                                # permit: everything that is not denied passes (XNC "Permit Mode")
    allow:
      devices: [ApplF17ABCDEF01]          # DeviceId, exact, case-insensitive
      users: ["CONTOSO\\\\svc-sync"]        # see "User matching" below
      device_types: []                   # DeviceType, exact, case-insensitive (iPhone, iPad, Android, Outlook...)
      user_agents: []                    # User-Agent glob (fnmatch: * ? [abc]), case-insensitive, e.g. "Apple-iPhone*"
    deny:                       # same four lists
      devices: []
      users: []
      device_types: []
      user_agents: ["*BlackBerry*"]
    inventory:                  # the MDM's list of managed devices
      - {device_id: ApplF17ABCDEF01, owner: alice, compliant: true}
    inventory_file: null        # optional extra inventory, path relative to the policy file:
                                #   *.yaml / *.yml: a YAML list like `inventory` above
                                #   *.csv: rows  device_id[,owner[,compliant]]  (see below)
    commands:                   # command-level rules for allowed devices (authz/commands.py)
      rules: [{name: read-only, when: {device_states: [unmanaged]}, deny: [SendMail, attachments]}]
    rate_limits: [{name: per-device, requests: 120, per_s: 60}]

``commands`` and ``rate_limits`` may instead stay in the gateway config's ``authorization``
(where they were first); each may be given in one place only. In the policy file they reload with
it and ``easgate replay --policy NEW.yaml`` shows what a change to them would change.

Values:

* DeviceIds, users, owners and device types are strings. A value YAML would read
  as a number or boolean (``0123``, ``12345``, ``yes``) must be quoted.
* ``owner`` is optional: an inventory entry without one allows any user on that device.
* ``compliant`` is optional and defaults to ``true`` (being listed means being managed);
  MDM exports should always write it.
* Later inventory entries override earlier ones for the same DeviceId; ``inventory_file``
  is read after ``inventory``.
* Duplicate mapping keys (two ``deny:`` sections, ...) are errors.

CSV inventory: UTF-8 (an Excel BOM is fine), ``#`` comment lines and blank lines
are skipped. An optional header row names the columns (``device_id`` required,
``owner`` and ``compliant`` optional, any order, no other columns); without a
header the columns are ``device_id,owner,compliant`` and the last two may be
left out. ``compliant`` is ``true/false/yes/no/1/0`` (case-insensitive); an
empty cell means ``true``.

User matching
=============

Users are compared case-insensitively. ``user`` is what the client sent:
``CONTOSO\\alice``, ``alice@contoso.com`` or ``alice``.

* An entry *with* a domain part (``CONTOSO\\alice`` or ``alice@contoso.com``)
  matches only that exact user string (``contoso\\ALICE`` matches
  ``CONTOSO\\alice``; ``alice@contoso.com`` does not).
* An entry *without* one (``alice``) matches the bare account of any form:
  ``alice``, ``CONTOSO\\alice``, ``alice@contoso.com``, ``OTHER\\alice``.

The same rule applies to an inventory entry's ``owner``.

Precedence
==========

The policy supplies the lists, the inventory and the mode; the order in which they apply, with
an operator's block and a connector in between, is the one authorization engine's
(``easgate.authz.engine``, used by the gateway and the connector alike):

identity -> deny lists -> operator block -> allow lists -> inventory / connector -> mode.

Reasons: ``device X on deny list``, ``user X on allow list``, ``device type X on deny list``,
``user agent X matches deny pattern P`` (lists are checked devices, users, device types, user
agents); ``device X belongs to another user``, ``device X not compliant``, ``device X managed and
compliant`` (inventory, :meth:`Policy.inventory_decision`); ``device X not managed`` /
``permit mode`` (:meth:`Policy.mode_decision`).

Cost: all lookups are sets/dicts built once at load time, and the user-agent
globs are compiled into one regular expression, so a decision costs the same for
a 1,000,000-device inventory as for 10.

Errors
======

:func:`load_policy` raises :class:`PolicyError` naming the file, the key as a
dotted path (``allow.users[2]``, ``inventory[7].compliant``, ``line 12`` for
CSV) and how to fix it. :class:`PolicyStore` keeps the last good policy when a
changed file is broken.
"""

from __future__ import annotations

import csv
import difflib
import fnmatch
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from ..core.decision import Decision, Source, one_line
from ..core.errors import ConfigError
from ..core.yamlfile import Node, YamlError, parse_yaml_text, yaml_fix
from .commands import CommandRules
from .commands import parse as parse_command_rules
from .users import split_user, user_matches

__all__ = [
    "IdentityLike",
    "InventoryEntry",
    "Policy",
    "PolicyError",
    "PolicyStore",
    "Rules",
    "load_policy",
    "parse_policy",
    "split_user",
    "user_matches",
]

MODES = ("block", "permit")
TOP_KEYS = ("mode", "allow", "deny", "inventory", "inventory_file", "commands", "rate_limits")
COMMAND_KEYS = ("commands", "rate_limits")  # the command-level part (authz/commands.py)
LIST_KEYS = ("devices", "users", "device_types", "user_agents")
INVENTORY_KEYS = ("device_id", "owner", "compliant")
_TRUE = frozenset({"true", "yes", "y", "1", "on"})
_FALSE = frozenset({"false", "no", "n", "0", "off"})


class IdentityLike(Protocol):
    """The attributes of ``easgate.activesync.Identity`` that the policy reads."""

    user: str | None
    device_id: str | None
    device_type: str | None
    user_agent: str | None
    error: str | None


class PolicyError(ValueError):
    """A policy or inventory file is unusable. The message names file, key and fix."""

    def __init__(self, message: str, *, file: str | Path | None = None, key: str | None = None):
        super().__init__(message)
        self.file = str(file) if file is not None else None
        self.key = key


def _show(value: str, limit: int = 80) -> str:
    """A client-supplied value made safe and short for a reason line."""
    return one_line(value, limit)


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True, slots=True)
class Rules:
    """One of the ``allow`` / ``deny`` sections, as O(1) lookup structures."""

    devices: frozenset[str] = frozenset()  # lower-cased DeviceIds
    users_exact: frozenset[str] = frozenset()  # lower-cased entries with a domain part
    users_bare: frozenset[str] = frozenset()  # lower-cased entries without one
    device_types: frozenset[str] = frozenset()  # lower-cased
    user_agent_globs: tuple[str, ...] = ()  # as written
    user_agent_re: re.Pattern[str] | None = None  # all globs, one named group each

    @classmethod
    def build(cls, devices=(), users=(), device_types=(), user_agents=()) -> Rules:
        exact: set[str] = set()
        bare: set[str] = set()
        for u in users:
            full, b, dom = split_user(u)
            if dom:
                exact.add(full)
            else:
                bare.add(b)
        globs = tuple(user_agents)
        rx = None
        if globs:
            rx = re.compile(
                "|".join(f"(?P<g{i}>{fnmatch.translate(g)})" for i, g in enumerate(globs)),
                re.IGNORECASE,
            )
        return cls(
            devices=frozenset(d.strip().lower() for d in devices),
            users_exact=frozenset(exact),
            users_bare=frozenset(bare),
            device_types=frozenset(t.strip().lower() for t in device_types),
            user_agent_globs=globs,
            user_agent_re=rx,
        )

    def __len__(self) -> int:
        return (
            len(self.devices) + len(self.users_exact) + len(self.users_bare)
            + len(self.device_types) + len(self.user_agent_globs)
        )

    def match(self, ident: IdentityLike, which: str) -> str | None:
        """The reason line if ``ident`` matches one of these rules, else ``None``.

        ``which`` is ``"deny"`` or ``"allow"`` (only used in the reason).
        """
        dev = ident.device_id
        if dev and dev.strip().lower() in self.devices:
            return f"device {_show(dev)} on {which} list"
        user = ident.user
        if user and (self.users_exact or self.users_bare):
            full, bare, _ = split_user(user)
            if full in self.users_exact or bare in self.users_bare:
                return f"user {_show(user)} on {which} list"
        typ = ident.device_type
        if typ and typ.strip().lower() in self.device_types:
            return f"device type {_show(typ)} on {which} list"
        ua = ident.user_agent
        if ua and self.user_agent_re is not None:
            m = self.user_agent_re.match(ua)
            if m is not None:
                glob = self.user_agent_globs[int((m.lastgroup or "g0")[1:])]
                return f"user agent {_show(ua)} matches {which} pattern {glob!r}"
        return None


class InventoryEntry(NamedTuple):
    owner: str | None  # lower-cased; full form if owner_has_domain else the bare account
    owner_has_domain: bool
    compliant: bool

    def owned_by(self, user: str | None) -> bool:
        if self.owner is None:
            return True
        if not user:
            return False
        full, bare, _ = split_user(user)
        return (full if self.owner_has_domain else bare) == self.owner


def _inventory_entry(owner: str | None, compliant: bool) -> InventoryEntry:
    if owner is None:
        return InventoryEntry(None, False, compliant)
    full, bare, dom = split_user(owner)
    return InventoryEntry(full if dom else bare, dom, compliant)


# --------------------------------------------------------------------------- policy


@dataclass(slots=True)
class Policy:
    mode: str = "block"
    source_path: Path | None = None
    allow: Rules = field(default_factory=Rules)
    deny: Rules = field(default_factory=Rules)
    inventory: dict[str, InventoryEntry] = field(default_factory=dict)  # lower DeviceId ->
    inventory_file: Path | None = None
    files: tuple[Path, ...] = ()  # every file read (policy + inventory_file), for change detection
    command_rules: CommandRules = field(default_factory=CommandRules)  # `commands` and `rate_limits`
    command_keys: frozenset[str] = frozenset()  # which of COMMAND_KEYS the file gives (even empty)

    # -- evaluation -----------------------------------------------------------------

    def inventory_decision(self, ident: IdentityLike) -> Decision | None:
        """Rows 5-7: the device is in the inventory. ``None`` if it is not listed."""
        dev = ident.device_id
        if not dev:
            return None
        entry = self.inventory.get(dev.strip().lower())
        if entry is None:
            return None
        if not entry.owned_by(ident.user):
            return Decision(False, f"device {_show(dev)} belongs to another user", Source.INVENTORY)
        if not entry.compliant:
            return Decision(False, f"device {_show(dev)} not compliant", Source.INVENTORY)
        return Decision(True, f"device {_show(dev)} managed and compliant", Source.INVENTORY)

    def mode_decision(self, ident: IdentityLike) -> Decision:
        """Rows 8-9: nothing matched."""
        if self.mode == "permit":
            return Decision(True, "permit mode", Source.MODE)
        dev = ident.device_id
        return Decision(False, f"device {_show(dev) if dev else '(none)'} not managed", Source.MODE)

    def describe(self) -> str:
        """One line for logs."""
        where = str(self.source_path) if self.source_path else "<inline>"
        return (
            f"policy {where}: mode={self.mode}, {len(self.allow)} allow rules, "
            f"{len(self.deny)} deny rules, {len(self.inventory)} inventory devices"
        )


# --------------------------------------------------------------------------- parsing


def _suggest(key: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


class _Ctx:
    """Where we are, for error messages."""

    def __init__(self, file: str | Path | None):
        self.file = str(file) if file is not None else "<policy>"

    def error(self, key: str, problem: str, fix: str) -> PolicyError:
        where = f"{self.file}: {key}" if key else self.file
        return PolicyError(f"{where}: {problem}; {fix}", file=self.file, key=key)

    def check_keys(self, data: Mapping, known: tuple[str, ...], prefix: str) -> None:
        for k in data:
            if k not in known:
                key = f"{prefix}{k}"
                raise PolicyError(
                    f"unknown key '{key}' in {self.file}{_suggest(str(k), known)}; "
                    f"known keys: {', '.join(known)}",
                    file=self.file,
                    key=key,
                )

    def string(self, value: Any, key: str, what: str) -> str:
        if isinstance(value, str):
            s = value.strip()
            if not s:
                raise self.error(key, f"empty {what}", "remove the entry or fill it in")
            return s
        if isinstance(value, (int, float, bool)):
            raise self.error(
                key,
                f"{what} must be a string, got {_type_name(value)} {value!r}",
                "quote it (YAML reads unquoted 0123, 12345 or yes as numbers/booleans)",
            )
        raise self.error(
            key, f"{what} must be a string, got {_type_name(value)}", "write a plain string"
        )

    def user(self, value: Any, key: str, what: str) -> str:
        s = self.string(value, key, what)
        _, bare, _ = split_user(s)
        if not bare:
            raise self.error(
                key, f"{what} {s!r} has no account name",
                r'write "DOMAIN\\account", "account@domain" or "account"',
            )
        return s

    def string_list(self, value: Any, key: str, what: str) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(
                key,
                f"expected a list of {what}s, got {_type_name(value)}",
                f"write a YAML list, e.g. [{value!r}]" if isinstance(value, str) else "write a YAML list",
            )
        conv = self.user if what == "user" else self.string
        return [conv(v, f"{key}[{i}]", what) for i, v in enumerate(value)]


def _parse_rules(ctx: _Ctx, data: Any, section: str) -> Rules:
    if data is None:
        return Rules()
    if not isinstance(data, Mapping):
        raise ctx.error(
            section,
            f"expected a mapping with keys {', '.join(LIST_KEYS)}, got {_type_name(data)}",
            f"write '{section}:' followed by indented 'devices: [...]' etc.",
        )
    ctx.check_keys(data, LIST_KEYS, f"{section}.")
    what = {"devices": "DeviceId", "users": "user", "device_types": "device type",
            "user_agents": "user-agent glob"}
    lists = {k: ctx.string_list(data.get(k), f"{section}.{k}", what[k]) for k in LIST_KEYS}
    return Rules.build(**lists)


def _parse_inventory_list(ctx: _Ctx, data: Any, prefix: str, into: dict[str, InventoryEntry]) -> None:
    if data is None:
        return
    if not isinstance(data, list):
        raise ctx.error(
            prefix or "(top level)",
            f"expected a list of devices, got {_type_name(data)}",
            "write one '- {device_id: ..., owner: ..., compliant: true}' per device",
        )
    for i, item in enumerate(data):
        key = f"{prefix}[{i}]"
        if not isinstance(item, Mapping):
            raise ctx.error(
                key, f"expected a mapping, got {_type_name(item)}",
                "write {device_id: ..., owner: ..., compliant: true}",
            )
        ctx.check_keys(item, INVENTORY_KEYS, f"{key}.")
        if "device_id" not in item:
            raise ctx.error(key, "missing device_id", "add 'device_id: <DeviceId>'")
        dev = ctx.string(item["device_id"], f"{key}.device_id", "DeviceId")
        owner = item.get("owner")
        if owner is not None:
            owner = ctx.user(owner, f"{key}.owner", "owner")
        compliant = item.get("compliant", True)
        if not isinstance(compliant, bool):
            raise ctx.error(
                f"{key}.compliant",
                f"compliant must be true or false, got {_type_name(compliant)} {compliant!r}",
                "write compliant: true or compliant: false (unquoted)",
            )
        into[dev.lower()] = _inventory_entry(owner, compliant)


def _parse_bool_cell(text: str) -> bool | None:
    t = text.strip().lower()
    if t == "":
        return True
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    return None


def _load_inventory_csv(path: Path, into: dict[str, InventoryEntry]) -> None:
    ctx = _Ctx(path)
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except OSError as e:
        raise ctx.error("", f"cannot read inventory: {e.strerror or e}", "check the path and permissions") from e
    with f:
        columns: tuple[str, ...] | None = None
        # Owners repeat (a user's phone and tablet): one checked, shared entry per (owner, state)
        # saves a million-row export most of its parsing and memory.
        entries: dict[tuple[str | None, bool | None], InventoryEntry] = {}
        reader = csv.reader(f)
        try:
            for row in reader:
                line = reader.line_num
                if not row or all(not c.strip() for c in row) or row[0].lstrip().startswith("#"):
                    continue
                cells = [c.strip() for c in row]
                if columns is None:
                    if "device_id" in (c.lower() for c in cells):
                        names = tuple(c.lower() for c in cells)
                        for n in names:
                            if n not in INVENTORY_KEYS:
                                raise PolicyError(
                                    f"unknown column '{n}' in {path} line {line}"
                                    f"{_suggest(n, INVENTORY_KEYS)}; known columns: "
                                    f"{', '.join(INVENTORY_KEYS)}",
                                    file=path, key=f"line {line}",
                                )
                        if len(set(names)) != len(names):
                            raise ctx.error(f"line {line}", "duplicate column in header",
                                            "name each column once")
                        columns = names
                        continue
                    columns = INVENTORY_KEYS
                if len(cells) > len(columns):
                    raise ctx.error(
                        f"line {line}",
                        f"{len(cells)} columns, expected at most {len(columns)} ({','.join(columns)})",
                        "remove the extra cells or quote values that contain commas",
                    )
                rec = dict(zip(columns, cells))
                dev = rec.get("device_id", "")
                if not dev:
                    raise ctx.error(f"line {line}", "empty device_id", "fill it in or delete the row")
                owner = rec.get("owner") or None
                compliant = _parse_bool_cell(rec.get("compliant", ""))
                entry = entries.get((owner, compliant))
                if entry is None:  # the first row of this owner and state: check it once
                    if owner is not None and not split_user(owner)[1]:
                        raise ctx.error(f"line {line}", f"owner {owner!r} has no account name",
                                        r'write DOMAIN\account, account@domain or account')
                    if compliant is None:
                        raise ctx.error(
                            f"line {line}",
                            f"compliant {one_line(rec['compliant'], 40)!r} is not a boolean",
                            "write true or false (yes/no/1/0 also work)",
                        )
                    entry = entries[(owner, compliant)] = _inventory_entry(owner, compliant)
                into[dev.lower()] = entry
        except csv.Error as e:
            raise ctx.error(f"line {reader.line_num}", f"malformed CSV: {e}", "fix the quoting") from e
        except UnicodeDecodeError as e:
            raise ctx.error("", f"not UTF-8 text: {e.reason}", "save the file as UTF-8") from e


def _read_yaml(path: Path, ctx: _Ctx) -> Any:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as e:
        raise ctx.error("", "file not found", "check the path") from e
    except OSError as e:
        raise ctx.error("", f"cannot read: {e.strerror or e}", "check the path and permissions") from e
    except UnicodeDecodeError as e:
        raise ctx.error("", f"not UTF-8 text: {e.reason}", "save the file as UTF-8") from e
    try:
        return parse_yaml_text(text)
    except YamlError as e:
        if e.key is not None:  # a duplicate key: the problem names it and both lines
            raise ctx.error(f"line {e.line}", e.problem, yaml_fix(e)) from None
        raise ctx.error(f"line {e.line}" if e.line else "", f"YAML error: {e.problem}", yaml_fix(e)) from None


def _load_inventory_file(path: Path, ctx: _Ctx, into: dict[str, InventoryEntry]) -> None:
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".yaml", ".yml"):
        raise ctx.error(
            "inventory_file", f"unsupported inventory file type {path.name!r}",
            "use a .csv, .yaml or .yml file",
        )
    if not path.is_file():
        raise ctx.error(
            "inventory_file", f"{path} does not exist" if not path.exists() else f"{path} is not a file",
            "create it, fix the path (relative paths are resolved against the policy file's "
            "directory) or set inventory_file: null",
        )
    if suffix == ".csv":
        _load_inventory_csv(path, into)
    else:
        fctx = _Ctx(path)
        data = _read_yaml(path, fctx)
        _parse_inventory_list(fctx, data, "", into)


def parse_policy(data: Mapping[str, Any] | None, *, source: Path | None, base_dir: Path) -> Policy:
    """Build a :class:`Policy` from already-parsed YAML ``data``.

    ``source`` is only used in error messages and ``Policy.source_path``;
    ``inventory_file`` is resolved against ``base_dir``.
    """
    ctx = _Ctx(source)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ctx.error(
            "(top level)", f"expected a mapping, got {_type_name(data)}",
            "start the file with keys such as 'mode: block'",
        )
    ctx.check_keys(data, TOP_KEYS, "")

    mode = data.get("mode", "block")
    if not isinstance(mode, str) or mode.strip().lower() not in MODES:
        raise ctx.error(
            "mode", f"mode must be one of {', '.join(MODES)}, got {mode!r}",
            "write 'mode: block' (only allowed/managed devices pass) or 'mode: permit'",
        )
    mode = mode.strip().lower()

    allow = _parse_rules(ctx, data.get("allow"), "allow")
    deny = _parse_rules(ctx, data.get("deny"), "deny")

    inventory: dict[str, InventoryEntry] = {}
    _parse_inventory_list(ctx, data.get("inventory"), "inventory", inventory)

    files: list[Path] = [source] if source is not None else []
    inv_file = data.get("inventory_file")
    inv_path: Path | None = None
    if inv_file is not None:
        s = ctx.string(inv_file, "inventory_file", "inventory_file")
        inv_path = Path(os.path.expanduser(s))
        if not inv_path.is_absolute():
            inv_path = Path(base_dir) / inv_path
        inv_path = Path(os.path.abspath(inv_path))
        _load_inventory_file(inv_path, ctx, inventory)
        files.append(inv_path)

    command_keys = frozenset(k for k in COMMAND_KEYS if data.get(k) is not None)
    try:
        root = Node(Path(source) if source is not None else Path("<policy>"), "", dict(data))
        command_rules = parse_command_rules(root.child("commands"), root.child("rate_limits"))
    except ConfigError as e:
        raise PolicyError(str(e), file=source, key=e.key) from None

    return Policy(
        mode=mode,
        source_path=source,
        allow=allow,
        deny=deny,
        inventory=inventory,
        inventory_file=inv_path,
        files=tuple(files),
        command_rules=command_rules,
        command_keys=command_keys,
    )


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read and validate the policy file at ``path``. Raises :class:`PolicyError`."""
    p = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    ctx = _Ctx(p)
    data = _read_yaml(p, ctx)
    if data is None:
        # An empty file is far more often a half-written one than a wish to deny everyone.
        raise ctx.error("", "policy file is empty", "write at least 'mode: block' or 'mode: permit'")
    return parse_policy(data, source=p, base_dir=p.parent)


# --------------------------------------------------------------------------- store


def _stamp(files: tuple[Path, ...]) -> tuple:
    out: list[tuple] = []
    for f in files:
        try:
            st = os.stat(f)
            out.append((str(f), st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append((str(f), None))
    return tuple(out)


class PolicyStore:
    """Holds the current :class:`Policy` and reloads it when its files change.

    The constructor raises :class:`PolicyError` if the initial load fails (there is
    no last good policy to fall back to). Afterwards a broken file never replaces
    a good policy. ``generation`` increases on every successful (re)load; callers
    holding a decision cache should clear it when it changes.

    ``prepare`` (optional) turns a freshly loaded policy into the one kept (the gateway moves a
    large inventory to SQLite); ``retire`` is called with a policy that was replaced.
    :meth:`reload_async` loads with an awaitable loader instead (the gateway's runs in another
    process), so a reload never holds the event loop.
    """

    def __init__(self, path: str | os.PathLike[str], prepare=None, retire=None):
        self.path = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
        self._lock = threading.Lock()
        self._prepare = prepare
        self._retire = retire
        self.last_error: str | None = None
        self.generation = 0
        self._failed_stamp: tuple | None = None
        self._in_place_reported = False
        self._tainted: set[str] = set()  # files changed in place since the last load
        self.checks = 0
        self._policy: Policy | None = None
        self._stamp: tuple
        self._load()

    @property
    def policy(self) -> Policy:
        assert self._policy is not None  # loaded by the constructor, or it raised
        return self._policy

    def _watched(self, policy: Policy | None = None) -> tuple[Path, ...]:
        """The policy file first, then every other file the policy read."""
        policy = policy if policy is not None else self._policy
        extra = tuple(f for f in policy.files if f != self.path) if policy is not None else ()
        return (self.path, *extra)

    def _load(self) -> None:
        # Stamps are taken *before* reading, so a write racing with the read is
        # seen as a change by the next check instead of being missed.
        before = dict(zip(self._watched(), _stamp(self._watched())))
        policy = load_policy(self.path)
        if self._prepare is not None:
            policy = self._prepare(policy)
        self._install(policy, before)

    def _install(self, policy: Policy, before: dict) -> None:
        watched = self._watched(policy)
        self._stamp = tuple(before.get(f) or _stamp((f,))[0] for f in watched)
        self._seen = self._stamp
        self._tainted.clear()
        old, self._policy = self._policy, policy
        self._failed_stamp = None
        self.last_error = None
        self.generation += 1
        if old is not None and self._retire is not None:
            self._retire(old)

    def reload_if_changed(self) -> tuple[bool, str | None]:
        """Reload if a watched file was replaced (see :meth:`reload`).

        Returns ``(True, None)`` after a successful reload, ``(False, None)`` if
        nothing changed, and ``(False, error)`` when the changed files are broken
        (the previous policy stays in force). The error is reported once per
        broken version of the files; ``last_error`` keeps it until a good load.
        """
        return self.reload(force=False)

    def reload(self, force: bool = True) -> tuple[bool, str | None]:
        """Reload now (``force=True``: validate and swap whatever the files hold) or only if a
        watched file was *replaced* (a new inode: written elsewhere and renamed over it, which is
        atomic). A file changed in place is never applied by the automatic check, however long it
        stayed the same: a writer may have paused half way. That is reported once, as an error,
        and stays until the file is replaced or a forced reload (``easgate.reload``) applies it."""
        with self._lock:
            current, go, err = self._check(force)
            if not go:
                return False, err
            try:
                self._load()
            except PolicyError as e:
                return False, self._failed(current, e)
            return True, None

    async def reload_async(self, load, force: bool = False) -> tuple[bool, str | None]:
        """As :meth:`reload`, with ``await load(path)`` doing the reading (and what ``prepare``
        would do); only stat calls and the swap happen here."""
        current, go, err = self._check(force)
        if not go:
            return False, err
        before = dict(zip(self._watched(), current))
        try:
            policy = await load(self.path)
        except PolicyError as e:
            return False, self._failed(current, e)
        with self._lock:
            self._install(policy, before)
        return True, None

    def _failed(self, current: tuple, e: PolicyError) -> str:
        self._failed_stamp = current
        self.last_error = str(e)
        return self.last_error

    def _check(self, force: bool) -> tuple[tuple, bool, str | None]:
        """(stamps now, load?, error to report)."""
        self.checks += 1
        current = _stamp(self._watched())
        if force:
            self._tainted.clear()
            self._in_place_reported = False
            return current, True, None
        # Compared with what the previous check saw (not the last load): inode numbers are
        # reused, so a file renamed in now may carry the inode of one loaded long ago.
        seen, self._seen = self._seen, current
        before = {st[0]: st for st in seen}
        for st in current:
            b = before.get(st[0])
            if b is None or b == st:
                continue
            if len(st) == 4 and len(b) == 4 and st[3] == b[3]:
                self._tainted.add(st[0])  # same inode, new content: written in place
            else:
                self._tainted.discard(st[0])  # replaced (renamed over), created or removed
        if self._tainted:
            # A file written in place stays unusable until it is replaced or a forced reload says
            # it is complete, even when another watched file is replaced meanwhile.
            if self._in_place_reported:
                return current, False, None  # said once already
            self._in_place_reported = True
            name = sorted(self._tainted)[0]
            self._failed_stamp = current
            self.last_error = (
                f"{name} was changed in place, not replaced: not applied (a writer may not be "
                f"done); write the new version to another file and rename it over {name} "
                f"(easgate policy install does that after checking it), or run easgate.reload")
            return current, False, self.last_error
        self._in_place_reported = False
        if current == seen or current == self._stamp or current == self._failed_stamp:
            return current, False, None
        return current, True, None
