"""The connector's YAML config (listen, inventory, policy, decision log)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.yamlfile import Node, parse_listen, read_yaml


@dataclass(frozen=True)
class ConnectorConfig:
    path: Path
    host: str
    port: int
    inventory: Path | str  # a SQLite file, or a postgresql:// URL (str)
    policy: Path | None
    decision_log: Path | None
    redis: str | None = None  # publish inventory changes as block events (connector/events.py)
    decision_log_on_error: str = "deny"  # an allow whose log line cannot be written: deny, or allow anyway


CONFIG_KEYS = {
    "listen": "{host: 127.0.0.1, port: 9080}",
    "inventory": "the SQLite device inventory, e.g. ../state/devices.db (created if missing), "
                 "or postgresql://user:pw@host/db to share it between connectors (easgate[cluster])",
    "policy": "a policy file like policies/activesync-policy.yaml (mode and allow/deny lists)",
    "decision_log": "a JSON-lines file, one line per decision",
    "decision_log_on_error": "deny (default: an allow whose line cannot be written is a Deny) or allow",
    "redis": "redis://host:6379/0: publish inventory changes to the gateways' shared cache "
             "(needs a postgresql:// inventory; easgate[cluster])",
}
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(value: object) -> bool:
    return isinstance(value, str) and value.strip().lower().startswith(POSTGRES_SCHEMES)


def load_connector_config(path: str | Path) -> ConnectorConfig:
    """Read and validate a connector config; raises ConfigError naming file, key and fix."""
    path, data = read_yaml(path, "connector.yaml (see policies/connector.yaml)")
    root = Node(path, "", data if data is not None else {})
    root.mapping(CONFIG_KEYS, required=("inventory",))
    host, port = parse_listen(root, 9080)
    base = path.parent
    node = root.child("inventory")
    inv: Path | str
    if is_postgres_url(node.value):
        inv = node.value.strip()
    else:
        inv = node.path(base, must_exist=False)
        if inv.exists() and not inv.is_file():
            raise node.err(f"{inv} is not a file", "name the SQLite file, e.g. ../state/devices.db, "
                           "or a postgresql://user:pw@host/db URL")
    rn = root.child("redis")
    redis_url = rn.str()
    if redis_url is not None:
        if not redis_url.lower().startswith(("redis://", "rediss://", "unix://")):
            raise rn.err(f"'{redis_url[:80]}' is not a Redis URL", "e.g. redis://10.0.0.5:6379/0")
        if not isinstance(inv, str):
            raise rn.err("block events come from a PostgreSQL inventory's change feed",
                         "use inventory: postgresql://... or remove redis")
    on_error = root.child("decision_log_on_error").str("deny", choices=("deny", "allow")) or "deny"
    return ConnectorConfig(path=path, host=host, port=port, inventory=inv,
                           policy=root.child("policy").path(base),
                           decision_log=root.child("decision_log").path(base, must_exist=False), redis=redis_url,
                           decision_log_on_error=on_error)
