"""easgate as a mitmproxy script:

    mitmdump -s addons/gateway.py --set server=false --set easgate_config=policies/gateway.yaml
    mitmweb  -s addons/gateway.py --set server=false --set easgate_config=policies/gateway.yaml

mitmproxy silently unloads a script whose option gets a bad `--set` value, and would then run as a
plain proxy with its own CA. The guard below is registered with the master itself (not as part of
this script), so it survives such an unload and stops the proxy if the gateway never came up.
"""

import logging

from mitmproxy import ctx

from easgate.gateway.chain import make_addons

addons = make_addons()


class _EasgateGuard:
    """Stops mitmproxy if the easgate gateway is not configured once it is running."""

    name = "easgate-guard"

    def __init__(self, gateway) -> None:
        self.gateway = gateway

    def running(self) -> None:
        if self.gateway.config is None or ctx.master.addons.get("gateway") is None:
            logging.getLogger("easgate").error(
                "easgate: the gateway script is not loaded (see the error above); stopping instead of "
                "running as a plain proxy")
            ctx.master.shutdown()


try:
    if ctx.master is not None and ctx.master.addons.get("easgate-guard") is None:
        ctx.master.addons.add(_EasgateGuard(addons[0]))
except AttributeError:  # imported outside a running mitmproxy (e.g. by a test)
    pass
