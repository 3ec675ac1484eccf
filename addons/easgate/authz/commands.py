"""Command-level policy: which EAS commands a device may send, and how often.

The device decision (lists, cache, connector, inventory, mode) says whether a device may reach
Exchange at all. `CommandRules` then narrows what an allowed device may do, on every request and
after the cache, so a cached allow never widens into a command a rule refuses. The rules live in
the policy file (top-level `commands` and `rate_limits`: they reload with it, and `easgate replay
--policy NEW.yaml` shows what a change would change) or, as first, in the gateway config's
`authorization`; each key in one place only (gateway/authorize.py refuses both):

    # the policy file (in the gateway config the same keys sit under `authorization:`)
    commands:
      groups: {contractors: [bob, "CONTOSO\\\\carol"]}
      rules:
        - name: read-only
          when: {device_states: [unknown, non-compliant], groups: [contractors]}  # any of them
          deny: [SendMail, SmartForward, SmartReply, attachments]
        - name: android-basic
          when: {device_types: [Android]}
          allow: [Provision, Settings, FolderSync, Sync, Ping, GetItemEstimate]
    rate_limits:
      - {name: per-device, requests: 120, per_s: 60}

The first rule whose `when` matches decides (`when` criteria of different kinds must all hold;
the values of one kind are alternatives). `allow` lists the only commands permitted; `deny` the
commands refused. `attachments` stands for GetAttachment and an ItemOperations Fetch of a
FileReference (an attachment): such an ItemOperations request is decided on its WBXML body, which
the gateway decodes once with a size bound and refuses when it cannot (gateway/authorize.py).

Device states come from the policy's inventory: `managed` (listed, compliant), `non-compliant`
(listed, not compliant), `unknown` (not listed); `unmanaged` is unknown or non-compliant.

Rate limits count the requests of one (user, DeviceId) in a sliding window of `per_s` seconds;
past `requests` the request is answered 503 with Retry-After ([MS-ASHTTP] 2.2.2.1.1), not
forwarded. `RateLimiter` counts in one process; the workers of a machine share tables
(`authz/ratetable.py`), the nodes of a cluster Redis (`gateway/ratelimits.py` picks).
"""

from __future__ import annotations

import fnmatch
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..core.decision import Decision, Source
from ..core.yamlfile import Node
from .identity import COMMAND_CODES, LEGACY_PLAIN_COMMANDS
from .users import user_matches

__all__ = ["ATTACHMENTS", "CommandRule", "CommandRules", "RateLimit", "RateLimiter", "STATES", "parse"]

ATTACHMENTS = "attachments"
STATES = ("managed", "non-compliant", "unknown", "unmanaged")
KNOWN_COMMANDS = {c.lower(): c for c in (*COMMAND_CODES.values(), *LEGACY_PLAIN_COMMANDS)}


@dataclass(frozen=True, slots=True)
class CommandRule:
    name: str
    device_states: frozenset[str] = frozenset()
    device_types: frozenset[str] = frozenset()  # lower-cased
    user_agents: tuple[str, ...] = ()  # lower-cased globs
    users: tuple[str, ...] = ()  # policy user entries (groups expanded)
    allow: frozenset[str] | None = None  # the only commands permitted
    deny: frozenset[str] = frozenset()
    attachments: bool = True  # False: attachment downloads refused

    def matches(self, user: str | None, device_type: str | None, agent: str | None, state: str) -> bool:
        if self.device_states and not (state in self.device_states or
                                       ("unmanaged" in self.device_states and state != "managed")):
            return False
        if self.device_types and (device_type or "").lower() not in self.device_types:
            return False
        if self.user_agents and not any(fnmatch.fnmatchcase((agent or "").lower(), g) for g in self.user_agents):
            return False
        if self.users and not (user and any(user_matches(e, user) for e in self.users)):
            return False
        return True

    def permits(self, command: str | None) -> bool:
        if command is None:
            return False
        if self.allow is not None and command not in self.allow:
            return False
        if command in self.deny:
            return False
        return not (command == "GetAttachment" and not self.attachments)

    @property
    def checks_attachments(self) -> bool:
        """An ItemOperations this rule permits must still be looked into (Fetch of an attachment)."""
        return not self.attachments and self.permits("ItemOperations")


@dataclass(frozen=True, slots=True)
class RateLimit:
    name: str
    requests: int
    per_s: float
    retry_after_s: int | None  # None: the seconds until the window lets one more through
    commands: frozenset[str] = frozenset()  # empty: every command


@dataclass(frozen=True, slots=True)
class CommandRules:
    rules: tuple[CommandRule, ...] = ()
    rate_limits: tuple[RateLimit, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.rules or self.rate_limits)

    def rule_for(self, user: str | None, device_type: str | None, agent: str | None, state: str) -> CommandRule | None:
        for r in self.rules:
            if r.matches(user, device_type, agent, state):
                return r
        return None

    def check(self, rule: CommandRule | None, command: str | None) -> Decision | None:
        """None when the rule (if any) permits the command; else the deny, naming the rule."""
        if rule is None or rule.permits(command):
            return None
        what = "attachment downloads (GetAttachment)" if command == "GetAttachment" else f"command {command}"
        return Decision(False, f"{what} not allowed by command rule {rule.name}", Source.COMMAND)


def device_state(listed: bool, compliant: bool) -> str:
    return "unknown" if not listed else ("managed" if compliant else "non-compliant")


class RateLimiter:
    """Sliding-window request counts per (key, limit), in this process."""

    def __init__(self, limits: tuple[RateLimit, ...], clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 100_000) -> None:
        self.limits = limits
        self.clock = clock
        self.max_keys = max_keys
        self.seen: dict[tuple, deque[float]] = {}

    def hit(self, key: tuple, command: str | None) -> tuple[RateLimit, int] | None:
        """Count one request; the limit it exceeds and the seconds until it may retry, or None."""
        now = self.clock()
        for lim in self.limits:
            if lim.commands and command not in lim.commands:
                continue
            k = (lim.name, *key)
            q = self.seen.get(k)
            if q is None:
                if len(self.seen) >= self.max_keys:  # bound the memory: forget the oldest keys
                    for old in list(self.seen)[: self.max_keys // 10 or 1]:
                        del self.seen[old]
                q = self.seen[k] = deque()
            while q and q[0] <= now - lim.per_s:
                q.popleft()
            if len(q) >= lim.requests:
                wait = max(1, math.ceil(q[0] + lim.per_s - now))
                return lim, lim.retry_after_s or wait
            q.append(now)
        return None


# ---------------------------------------------------------------------------------------------
# Parsing (`commands` and `rate_limits`, in the policy file or the gateway config's authorization)


def _commands(n: Node, allow_attachments: bool = True) -> tuple[frozenset[str], bool]:
    out: set[str] = set()
    attachments = True
    for i, c in enumerate(n.strlist()):
        if c.lower() == ATTACHMENTS and allow_attachments:
            attachments = False
            continue
        known = KNOWN_COMMANDS.get(c.lower())
        if known is None:
            raise n.child(i).err(f"'{c}' is not an ActiveSync command",
                                 "use a command name such as SendMail, Sync, ItemOperations, or 'attachments'")
        out.add(known)
    return frozenset(out), attachments


def parse(commands: Node, rate_limits: Node) -> CommandRules:
    rules: list[CommandRule] = []
    groups: dict[str, tuple[str, ...]] = {}
    if commands.value is not None:
        commands.mapping({"groups": "{name: [users]}", "rules": "a list of {name, when, allow | deny}"})
        g = commands.child("groups")
        if g.value is not None:
            if not isinstance(g.value, dict):
                raise g.err("must be a mapping of group name to a list of users", "e.g. {contractors: [bob]}")
            groups = {str(k): g.child(k).strlist() for k in g.value}
        rs = commands.child("rules")
        if not isinstance(rs.value, list):
            raise rs.err("must be a list of rules", "e.g. [{name: read-only, when: {...}, deny: [SendMail]}]")
        names: set[str] = set()
        for i in range(len(rs.value)):
            r = rs.child(i)
            r.mapping({"name": "a unique name (in the audit log)", "when": "{device_states, device_types, "
                       "user_agents, users, groups}", "allow": "commands", "deny": "commands"}, required=("name",))
            name = r.child("name").str() or ""
            if name in names:
                raise r.child("name").err(f"rule '{name}' is defined twice", "give every rule its own name")
            names.add(name)
            if r.has("allow") == r.has("deny"):
                raise r.err("needs exactly one of allow or deny", "allow: [the only commands permitted] or "
                            "deny: [the commands refused]")
            w = r.child("when")
            states: tuple[str, ...] = ()
            types: tuple[str, ...] = ()
            agents: tuple[str, ...] = ()
            users: list[str] = []
            if w.value is not None:
                w.mapping({"device_states": "|".join(STATES), "device_types": "list", "user_agents": "globs",
                           "users": "list", "groups": "group names"})
                states = w.child("device_states").strlist()
                for j, s in enumerate(states):
                    if s not in STATES:
                        raise w.child("device_states").child(j).err(f"'{s}' is not a device state",
                                                                    f"use one of {', '.join(STATES)}")
                types = w.child("device_types").strlist()
                agents = w.child("user_agents").strlist()
                users = list(w.child("users").strlist())
                for j, gname in enumerate(w.child("groups").strlist()):
                    if gname not in groups:
                        raise w.child("groups").child(j).err(f"no group named '{gname}'",
                                                             "define it under commands.groups")
                    users += groups[gname]
                if w.has("groups") and not users:
                    raise w.child("groups").err("names only empty groups", "add users to the group")
            allow = deny = None
            attachments = True
            if r.has("allow"):
                allow, _ = _commands(r.child("allow"), allow_attachments=False)
            else:
                deny, attachments = _commands(r.child("deny"))
            rules.append(CommandRule(name=name, device_states=frozenset(states),
                                     device_types=frozenset(t.lower() for t in types),
                                     user_agents=tuple(a.lower() for a in agents), users=tuple(users),
                                     allow=allow, deny=deny or frozenset(), attachments=attachments))
    limits: list[RateLimit] = []
    if rate_limits.value is not None:
        if not isinstance(rate_limits.value, list):
            raise rate_limits.err("must be a list", "e.g. [{name: per-device, requests: 120, per_s: 60}]")
        for i in range(len(rate_limits.value)):
            r = rate_limits.child(i)
            r.mapping({"name": "a name (in the audit log)", "requests": "requests per window",
                       "per_s": "window in seconds", "retry_after_s": "Retry-After (default: until the window has room)",
                       "commands": "only these commands (default: all)"}, required=("name", "requests", "per_s"))
            lname = r.child("name").str() or ""
            if any(lim.name == lname for lim in limits):
                raise r.child("name").err(f"rate limit '{lname}' is defined twice", "give every limit its own name")
            per_s = r.child("per_s").num(60.0)
            if per_s <= 0:
                raise r.child("per_s").err("must be above 0", "e.g. 60")
            limits.append(RateLimit(name=r.child("name").str() or "", requests=r.child("requests").int(None, 1) or 1,
                                    per_s=per_s,
                                    retry_after_s=r.child("retry_after_s").int(None, 1, 86400),
                                    commands=_commands(r.child("commands"), allow_attachments=False)[0]))
    return CommandRules(tuple(rules), tuple(limits))

