"""A bound on the flows mitmweb keeps in memory (`easgate_max_flows`).

mitmweb (and the mitmproxy console) keep every flow, request and response bodies included, in
their view until someone clears it; mitmproxy has no limit of its own. A gateway shown in mitmweb
for days would grow without end. With ``--set easgate_max_flows=N`` the oldest flows are removed
from the view once there are more than N, which frees them:

* finished flows only: a request still in flight (a held ActiveSync Ping) is never removed (that
  would kill it);
* unmarked flows first: denied flows (marked ``:no_entry:``) and flows an operator marked stay
  while there are unmarked ones to drop, so the interesting ones are what remains;
* one flow at a time, as new ones arrive, so mitmweb's list updates smoothly.

0 (the default) keeps every flow, as mitmproxy does. mitmdump keeps no finished flows at all, so
the option does nothing there. `easgate_flows_evicted_total` (metrics) counts the removed flows.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx, exceptions

logger = logging.getLogger("easgate")


class FlowLimit:
    name = "easgate-flowlimit"

    def __init__(self) -> None:
        self.evicted = 0
        self._warned = False
        self.limit = 0  # easgate_max_flows, kept here: an option read per request costs a deepcopy

    def load(self, loader) -> None:
        loader.add_option("easgate_max_flows", int, 0,
                          "Keep at most this many flows in mitmweb's memory (the oldest finished ones go first, "
                          "unmarked before marked); 0 keeps all.")

    def configure(self, updated) -> None:
        if "easgate_max_flows" in updated:
            if ctx.options.easgate_max_flows < 0:
                raise exceptions.OptionsError("easgate_max_flows must be 0 (no limit) or more")
            self.limit = ctx.options.easgate_max_flows
            self.trim()

    def requestheaders(self, flow) -> None:
        self.trim()

    def response(self, flow) -> None:
        self.trim()

    def error(self, flow) -> None:
        self.trim()

    def trim(self) -> int:
        """Remove the oldest finished flows past the bound; returns how many were removed."""
        limit = self.limit
        if not limit:
            return 0
        view = ctx.master.addons.get("view") if ctx.master else None
        if not limit or view is None:
            return 0
        over = view.store_count() - limit
        if over <= 0:
            return 0
        store = getattr(view, "_store", None)
        flows = store.values() if store is not None else view.resolve("@all")  # oldest first
        victims: list = []
        taken: set[str] = set()
        for want_marked in (False, True):
            for f in flows:  # usually stops at the first flow
                if len(victims) >= over:
                    break
                if f.live or bool(f.marked) != want_marked or f.id in taken:
                    continue
                victims.append(f)
                taken.add(f.id)
        for f in victims:
            view.remove([f])  # one at a time: mitmproxy logs an alert for each multi-flow removal
        self.evicted += len(victims)
        if victims and not self._warned:
            self._warned = True
            logger.info(f"easgate: more than {limit} flows in memory; removing the oldest finished ones "
                        "(easgate_max_flows)")
        return len(victims)
