"""Reading YAML config files and walking them with dotted key paths, so every message says where.

`read_yaml` is the one place easgate parses a YAML file; `Node` checks types, ranges and unknown
keys and raises `ConfigError` naming the file, the key and the fix.
"""

from __future__ import annotations

import builtins
import difflib
import ipaddress
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

# --------------------------------------------------------------------------------------------
# A small checker that walks the YAML with the dotted key path, so messages say where they are.


class Node:
    def __init__(self, file: Path, key: str, value: Any) -> None:
        self.file, self.key, self.value = file, key, value

    def err(self, problem: str, fix: str = "") -> ConfigError:
        return ConfigError(self.file, self.key, problem, fix)

    def child(self, name: str | int) -> Node:
        key = f"{self.key}[{name}]" if isinstance(name, int) else (f"{self.key}.{name}" if self.key else name)
        value = self.value[name] if isinstance(name, int) else self.value.get(name)
        return Node(self.file, key, value)

    def mapping(self, known: dict[str, str], required: tuple[str, ...] = ()) -> Node:
        if not isinstance(self.value, dict):
            raise self.err(f"must be a mapping, got {kind(self.value)}", f"known keys: {', '.join(known)}")
        for k in self.value:
            if k not in known:
                hint = _close(str(k), known)
                raise ConfigError(self.file, f"{self.key}.{k}" if self.key else str(k), "unknown key",
                                  f"did you mean '{hint}'?" if hint else f"known keys here: {', '.join(known)}")
        for k in required:
            if self.value.get(k) is None:
                raise ConfigError(self.file, f"{self.key}.{k}" if self.key else k, "missing",
                                  f"add it: {known[k]}")
        return self

    def has(self, name: str) -> bool:
        return isinstance(self.value, dict) and self.value.get(name) is not None

    def str(self, default: str | None = None, choices: tuple[str, ...] = ()) -> builtins.str | None:
        v = self.value
        if v is None:
            return default
        if not isinstance(v, str) or not v.strip():
            raise self.err(f"must be a non-empty string, got {kind(v)}")
        if choices and v not in choices:
            raise self.err(f"'{v}' is not one of {', '.join(choices)}", f"use one of {', '.join(choices)}")
        return v

    def int(self, default: int | None = None, lo: int | None = None, hi: int | None = None) -> int | None:
        v = self.value
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.err(f"must be a whole number, got {kind(v)}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise self.err(f"{v} is out of range", f"use a value from {lo} to {hi}")
        return v

    def num(self, default: float, lo: float = 0.0) -> float:
        v = self.value
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.err(f"must be a number, got {kind(v)}")
        if v < lo:
            raise self.err(f"{v} is below {lo}", f"use a value of at least {lo}")
        return float(v)

    def bool(self, default: builtins.bool) -> builtins.bool:
        v = self.value
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self.err(f"must be true or false, got {kind(v)}")
        return v

    def strlist(self, default: tuple[builtins.str, ...] = ()) -> tuple[builtins.str, ...]:
        v = self.value
        if v is None:
            return default
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            raise self.err(f"must be a list of strings, got {kind(v)}")
        return tuple(v)

    def path(self, base: Path, must_exist: builtins.bool = True) -> Path | None:
        s = self.str()
        if s is None:
            return None
        p = Path(s).expanduser()
        p = (p if p.is_absolute() else (base / p)).resolve()
        if must_exist:
            if not p.exists():
                raise self.err(f"file not found: {p}", "fix the path (relative paths are relative to the config file)")
            try:
                p.read_bytes()
            except OSError as e:
                raise self.err(f"cannot read {p}: {e.strerror}", "check the file's permissions")
        return p


def kind(v: Any) -> str:
    return {dict: "a mapping", list: "a list", str: f"'{v}'", bool: str(v).lower(), type(None): "nothing"}.get(
        type(v), repr(v)
    )


def _close(word: str, known: dict[str, str]) -> str | None:
    m = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return m[0] if m else None


def read_yaml(path: str | Path, what: str = "gateway.yaml") -> tuple[Path, Any]:
    """(resolved path, parsed YAML) of a config file; ConfigError for a missing, unreadable or
    malformed file, naming it (`what` says which file the user should pass)."""
    path = Path(path).expanduser().resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found", f"pass the path of your {what}")
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror}", "check the file's permissions")
    try:
        return path, yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(path, "", f"not valid YAML: {where}{getattr(e, 'problem', e)}", "fix the YAML syntax")


def parse_listen(root: Node, default_port: int) -> tuple[str, int]:
    """The `listen: {host, port}` section shared by the gateway's and the connector's configs."""
    listen = root.child("listen")
    if listen.value is None:
        return "127.0.0.1", default_port
    listen.mapping({"host": "an IP address", "port": "a TCP port, 0 picks a free one"})
    host = listen.child("host")
    value = host.str("127.0.0.1") or "127.0.0.1"
    if not is_listen_host(value):
        raise host.err(f"'{value}' is not an IP address",
                       "use an address of this machine, e.g. 127.0.0.1, 0.0.0.0 (all IPv4) or :: (all IPv6)")
    port = listen.child("port").int(default_port, 0, 65535)
    return value, default_port if port is None else port


def is_listen_host(host: str) -> bool:
    """An IP address literal, what a listener binds: a typo such as `127.0.0.l` would otherwise be
    looked up as a host name at bind time (core/net.parse_listen says the same for HOST:PORT)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
