"""easgate as a mitmproxy script:

    mitmdump -s addons/gateway.py --set server=false --set easgate_config=policies/gateway.yaml
    mitmweb  -s addons/gateway.py --set server=false --set easgate_config=policies/gateway.yaml

mitmproxy silently unloads a script whose option gets a bad `--set` value, and would then run as a
plain proxy with its own CA. The guard below is registered with the master itself (not as part of
this script), so it survives such an unload and stops the proxy if the gateway never came up.

The final check (`easgate.gateway.finalcheck`) is registered with the master too, at the end of
its chain: a script's addons are one subtree of mitmproxy's script loader, and an exception in any
hook of that subtree skips the rest of it, so a check inside the script could be skipped by the
very fault it exists for. On a script reload it is pointed at the new gateway.
"""

import logging

from mitmproxy import ctx

from easgate.gateway.chain import make_addons

_gateway, _final = make_addons()
addons = [_gateway]


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
    if ctx.master is not None:
        if ctx.master.addons.get("easgate-guard") is None:
            ctx.master.addons.add(_EasgateGuard(_gateway))
        final = ctx.master.addons.get(_final.name)
        if final is None:
            ctx.master.addons.add(_final)
        else:
            final.gw = _gateway  # a reloaded script: check for the new gateway
except AttributeError:  # imported outside a running mitmproxy (e.g. by a test)
    pass
