"""The NetScaler objects the importer reasons about, its findings, and its options."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .commands import Cmd


@dataclass(slots=True)
class Member:
    """One server of a pool: a service, or one member of a service group."""

    name: str  # service name, or "GROUP SERVER:PORT"
    host: str
    proto: str
    port: str
    cmd: Cmd  # the line that defines it
    disabled: str | None = None  # why it is out of rotation


@dataclass(slots=True)
class LbVserver:
    name: str
    proto: str
    ip: str | None
    port: str | None
    cmd: Cmd
    services: list[tuple[str, Cmd]] = field(default_factory=list)  # bound services and service groups
    responders: list[tuple[str, Cmd]] = field(default_factory=list)  # bound responder policies

    @property
    def addressable(self) -> bool:
        """Clients can reach it directly. NetScaler's non-addressable vserver has no IP and port, or
        `0.0.0.0 0`; with a real port, 0.0.0.0 is every address (which is what `--set
        PUBLIC-IP=0.0.0.0` means), not none."""
        return bool(self.ip) and self.ip != "0" and self.port not in (None, "0")


@dataclass(slots=True)
class Report:
    line: int
    message: str


@dataclass
class Guard:
    """A responder policy `<condition> && SYS.HTTP_CALLOUT(c)...NOT` with a blocking action: the
    requests on which NetScaler asks callout c and blocks unless it allows."""

    policy: str
    cmd: Cmd
    bind: Cmd
    condition: object  # the expression without the callout test, or None when unreadable
    callout: str | None
    fail_closed: bool  # the undefined result (callout down, garbage) blocks
    undef_from: str  # where the undefAction comes from
    drop: bool  # DROP/RESET (True) or a response (False)
    problem: str | None = None


@dataclass
class Options:
    sets: dict[str, str] = field(default_factory=dict)  # placeholder name -> value
    certs: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # certkey/crl -> (pem, key)
    certs_dir: Path | None = None
    services: dict[str, str] = field(default_factory=dict)  # service name -> host:port
    pool_ca: dict[str, str] = field(default_factory=dict)
    pool_sni: dict[str, str] = field(default_factory=dict)
    vserver: str | None = None  # the cs vserver to translate


class UsageError(ValueError):
    """An option that names something the file does not have: exit status 2."""
