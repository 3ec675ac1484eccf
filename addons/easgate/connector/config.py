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
    inventory: Path
    policy: Path | None
    decision_log: Path | None


CONFIG_KEYS = {
    "listen": "{host: 127.0.0.1, port: 9080}",
    "inventory": "the SQLite device inventory, e.g. ../state/devices.db (created if missing)",
    "policy": "a policy file like policies/activesync-policy.yaml (mode and allow/deny lists)",
    "decision_log": "a JSON-lines file, one line per decision",
}


def load_connector_config(path: str | Path) -> ConnectorConfig:
    """Read and validate a connector config; raises ConfigError naming file, key and fix."""
    path, data = read_yaml(path, "connector.yaml (see policies/connector.yaml)")
    root = Node(path, "", data if data is not None else {})
    root.mapping(CONFIG_KEYS, required=("inventory",))
    host, port = parse_listen(root, 9080)
    base = path.parent
    inv = root.child("inventory").path(base, must_exist=False)
    if inv.exists() and not inv.is_file():
        raise root.child("inventory").err(f"{inv} is not a file", "name the SQLite file, e.g. ../state/devices.db")
    return ConnectorConfig(path=path, host=host, port=port, inventory=inv,
                           policy=root.child("policy").path(base),
                           decision_log=root.child("decision_log").path(base, must_exist=False))


