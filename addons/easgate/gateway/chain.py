"""The one place the gateway's addon chain is assembled.

The order is the order every request sees: connection cap and PROXY protocol, TLS, header
hygiene, content switching, the certificate header, upstream pools, then authorization and what
reads its outcome (mitmweb annotations, metrics, the flow bound).
"""

from __future__ import annotations

from . import mitmcompat
from .addon import Gateway
from .authorize import ActiveSyncGate
from .config import GatewayConfig, load_config
from .contentview import WebAnnotations
from .flowlimit import FlowLimit
from .metrics import Metrics


def make_addons() -> list:
    """The addon list for `-s addons/gateway.py` and `easgate run`."""
    mitmcompat.install()
    gw = Gateway()
    gw.add_stage(ActiveSyncGate(gw))
    gw.addons += [WebAnnotations(gw), Metrics(gw), FlowLimit()]  # after the decision
    return [gw]


def validate_config(path: str) -> GatewayConfig:
    """Load the config and build every addon's state from it, as a start would (certificates, keys,
    CA files, policies are all read); raises ConfigError. Nothing is started."""
    cfg = load_config(path)
    make_addons()[0].apply(cfg)
    return cfg
