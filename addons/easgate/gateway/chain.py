"""The one place the gateway's addon chain is assembled.

The order is the order every request sees: connection cap and PROXY protocol, TLS, header
hygiene, content switching, the certificate header, upstream pools, then authorization and what
reads its outcome (mitmweb annotations, metrics, the flow bound).

`FinalCheck` is NOT one of the gateway's sub-addons: mitmproxy skips the rest of a top-level
addon's tree when one of its hooks raises, so the check that must run whatever an earlier hook did
or failed to do is a top-level addon of its own, after the gateway (`make_addons` returns it
second; `addons/gateway.py` registers it with the master).
"""

from __future__ import annotations

import dataclasses

from ..authz.audit import AuditLog
from ..core.errors import ConfigError
from . import mitmcompat
from .addon import Gateway
from .authorize import ActiveSyncGate
from .autodiscover import RedirectRewrite
from .config import GatewayConfig, load_config
from .connlog import ConnectionLog
from .contentview import WebAnnotations
from .finalcheck import FinalCheck
from .flowlimit import FlowLimit
from .metrics import Metrics


def make_addons() -> list:
    """[the gateway, its final check]: add both to the master, in this order, as top-level addons."""
    mitmcompat.install()
    gw = Gateway()
    # each stage gets the shared objects it reads, never the gateway (docs/architecture.md)
    gate = ActiveSyncGate(gw.current, gw.tls, gw.audit, gw.ledger, gw.switch)
    gw.add_stage(gate)
    gw.add_stage(RedirectRewrite(gw.current))  # responses: internal hosts out of redirects and Autodiscover
    metrics = Metrics(gw.current, gw.switch, gw.strict, gate, gw.audit)
    gw.addons.insert(0, metrics.first_stage)  # notes the flows that arrive live, before anything kills one
    gw.addons += [WebAnnotations(), metrics, FlowLimit(), ConnectionLog()]  # after the decision
    return [gw, FinalCheck(gw.current, gw.ledger, gate)]


def validate_config(path: str) -> GatewayConfig:
    """Load the config and build every addon's state from it, as a start would (certificates, keys,
    CA files, policies are all read); raises ConfigError. Nothing is started and nothing is written:
    the audit log is checked for writability, not opened (which would create it)."""
    cfg = load_config(path)
    try:
        AuditLog.check(cfg.audit_log)
    except ConfigError as e:
        raise ConfigError(cfg.path, e.key, e.problem, e.fix) from None
    make_addons()[0].apply(dataclasses.replace(cfg, audit_log=None))
    return cfg
