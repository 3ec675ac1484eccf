"""Reading YAML config files and walking them with dotted key paths, so every message says where.

`parse_yaml_text` (and `read_yaml`, `compose_yaml_text` on top of it) is the one way easgate parses
YAML — gateway and connector configs, policies, inventories, captures — and it refuses duplicate
keys; `Node` checks types, ranges and unknown
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


class YamlError(ValueError):
    """A YAML text easgate will not read: `line` (1-based, or None), the problem, the key if any."""

    def __init__(self, problem: str, line: int | None = None, key: str | None = None) -> None:
        super().__init__(f"line {line}: {problem}" if line else problem)
        self.problem, self.line, self.key = problem, line, key


_BASE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def check_duplicate_keys(node: yaml.Node | None) -> None:
    """Raise YamlError for the first mapping that names a key twice. PyYAML keeps the last value
    silently: a second `routes:` would drop the first one's `authorize`. Keys are compared as YAML
    reads them (`1` and `"1"` differ, `yes` and `true` do not)."""
    constructor = yaml.SafeLoader("")
    seen_nodes: set[int] = set()
    stack = [node] if node is not None else []
    while stack:
        n = stack.pop()
        if id(n) in seen_nodes:  # aliases share nodes (and may be recursive)
            continue
        seen_nodes.add(id(n))
        if isinstance(n, yaml.MappingNode):
            first: dict = {}
            for k, v in n.value:
                stack.append(v)
                if k.tag == "tag:yaml.org,2002:merge" or not isinstance(k, yaml.ScalarNode):
                    stack.append(k)
                    continue
                try:
                    key = (type(value := constructor.construct_object(k)), value)
                    hash(key)
                except (yaml.YAMLError, TypeError):
                    continue
                if key in first:
                    name = k.value if len(k.value) <= 60 else k.value[:57] + "..."
                    raise YamlError(f"duplicate key '{name}' (first at line {first[key] + 1})",
                                    k.start_mark.line + 1, name)
                first[key] = k.start_mark.line
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)


class StrictLoader(_BASE_LOADER):  # type: ignore[misc,valid-type]
    """yaml's safe loader that refuses duplicate mapping keys."""

    def construct_document(self, node):
        check_duplicate_keys(node)
        return super().construct_document(node)


def _yaml_error(e: yaml.YAMLError) -> YamlError:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    where = f"column {mark.column + 1}: " if mark is not None else ""
    return YamlError(f"{where}{context + ': ' if context else ''}{problem}",
                     mark.line + 1 if mark is not None else None)


def parse_yaml_text(text: str) -> Any:
    """The one way easgate parses YAML: safe types only, duplicate keys refused. Raises YamlError."""
    try:
        return yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as e:
        raise _yaml_error(e) from None


def compose_yaml_text(text: str, check: bool = True) -> yaml.Node | None:
    """The node tree (with line numbers) for readers that report per node; same checks as
    `parse_yaml_text` (with check=False the caller runs `check_duplicate_keys` itself, e.g. to
    report other errors too). Raises YamlError."""
    try:
        node = yaml.compose(text, Loader=StrictLoader)
    except yaml.YAMLError as e:
        raise _yaml_error(e) from None
    if check:
        check_duplicate_keys(node)
    return node


def yaml_fix(e: YamlError) -> str:
    return ("write each key once: merge the two sections" if e.problem.startswith("duplicate key")
            else "fix the YAML syntax: indentation, quotes, colons")


def read_yaml(path: str | Path, what: str = "gateway.yaml") -> tuple[Path, Any]:
    """(resolved path, parsed YAML) of a config file; ConfigError for a missing, unreadable or
    malformed file or a duplicate key, naming it (`what` says which file the user should pass)."""
    path = Path(path).expanduser().resolve()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found", f"pass the path of your {what}")
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror}", "check the file's permissions")
    except UnicodeDecodeError as e:
        raise ConfigError(path, "", f"not UTF-8 text: {e.reason}", "save the file as UTF-8")
    try:
        return path, parse_yaml_text(text)
    except YamlError as e:
        if e.key is not None:  # a duplicate key: the message names it and both lines
            raise ConfigError(path, f"line {e.line}", e.problem, yaml_fix(e)) from None
        raise ConfigError(path, f"line {e.line}" if e.line else "", f"not valid YAML: {e.problem}",
                          yaml_fix(e)) from None


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
