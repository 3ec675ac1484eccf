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
from .contentview import WebAnnotations
from .finalcheck import FinalCheck
from .flowlimit import FlowLimit
from .metrics import Metrics


def make_addons() -> list:
    """[the gateway, its final check]: add both to the master, in this order, as top-level addons."""
    mitmcompat.install()
    gw = Gateway()
    gw.add_stage(ActiveSyncGate(gw))
    gw.add_stage(RedirectRewrite(gw))  # responses: internal hosts out of redirects and Autodiscover
    gw.addons += [WebAnnotations(gw), Metrics(gw), FlowLimit()]  # after the decision
    return [gw, FinalCheck(gw)]


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
