"""What the gateway's parts share, as objects handed to each one that needs them.

`Gateway` builds its sub-addons with exactly the objects they read (this config holder, the
ledger, the audit trail, the TLS state, the content switch), never itself: no part reaches a
sibling through the parent (docs/architecture.md, "How the gateway's parts share state").
"""

from __future__ import annotations

from .config import GatewayConfig


class Current:
    """The config in force, for the parts that read it per request (a route's settings).

    `Gateway.apply` sets it once, after every part swapped in the state it built from the same
    config: it is the one point where a new config takes effect, and a config that fails to
    build in any part never reaches it (build all, then swap)."""

    def __init__(self) -> None:
        self.config: GatewayConfig | None = None
