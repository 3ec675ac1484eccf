"""The last word before anything goes upstream: no recorded allow for this very request, no send.

mitmproxy forwards a request unless a hook stops it, and its AddonManager runs the hooks of one
top-level addon as a unit: an exception in one hook is logged and the rest of *that* addon's tree
is skipped, then the next top-level addon runs (`addonmanager.safecall`). So a check nested in
the gateway's own tree would be skipped by the very fault it is meant to catch. `FinalCheck` is
therefore registered as its own top-level addon at the end of the chain, and it runs on

* `requestheaders`, because with `stream_large_bodies` mitmproxy sends the request head upstream
  right after that hook (and a streamed body right behind it), and
* `request`, the moment before a buffered request is sent.

What it checks is kept in the `Ledger`, in memory, per flow id, never in `flow.metadata` (which a
flow read from a file, a replay or any addon can carry or write):

* the content switch recorded a route for this flow in this pass, and the request still goes to
  the server it was pointed at then (no later hook re-pointed it, e.g. from the MDM to Exchange), and
* on a route with `authorize`, the gate granted an allow *for this request*: the grant holds the
  request line and headers as decided on, so a request changed after the decision (path, Host,
  Authorization, ...) no longer matches it.

Anything else is refused as `internal error`: answered like any deny (audited, counted), or the
connection is dropped when the request is already streaming.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Protocol

from mitmproxy import flow as mflow
from mitmproxy import http

from ..core import keys
from .respond import drop
from .shared import Current

#: flow metadata of a request the gate decides on its body (ItemOperations under a command rule that
#: refuses attachments): its allow is granted in the gate's `request` hook, not in `requestheaders`

logger = logging.getLogger("easgate.authz")

_EXPECT = b"expect"  # mitmproxy removes Expect: 100-continue after requestheaders


def _target(req: http.Request) -> tuple:
    d = req.data
    return (d.scheme, d.host, d.port)


def fingerprint(req: http.Request) -> tuple:
    """Everything of a request head that the upstream reads, as one comparable value."""
    d = req.data
    return (d.method, d.scheme, d.host, d.port, d.authority, d.path, d.http_version,
            tuple(f for f in d.headers.fields if f[0].lower() != _EXPECT))


class Ledger:
    """Per-flow records of this pass: the route chosen, and the allow granted (bound to the request)."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[str, tuple]] = {}
        self.grants: dict[str, tuple] = {}

    def routed(self, flow: http.HTTPFlow, route: str) -> None:
        """The route chosen, and the server the flow was pointed at for it."""
        self.routes[flow.id] = (route, _target(flow.request))
        self.grants.pop(flow.id, None)  # a new pass (replay) decides anew

    def grant(self, flow: http.HTTPFlow) -> None:
        self.grants[flow.id] = fingerprint(flow.request)

    def route_of(self, flow: http.HTTPFlow) -> str | None:
        """The route recorded in this pass, if the flow still goes where that route sent it."""
        r = self.routes.get(flow.id)
        return r[0] if r is not None and r[1] == _target(flow.request) else None

    def allowed(self, flow: http.HTTPFlow) -> bool:
        g = self.grants.get(flow.id)
        return g is not None and g == fingerprint(flow.request)

    def forget(self, flow: http.HTTPFlow) -> None:
        self.routes.pop(flow.id, None)
        self.grants.pop(flow.id, None)

    def __len__(self) -> int:
        return len(self.routes) + len(self.grants)


class FailClosed(Protocol):
    """What answers a refused flow like any deny (audited, counted): the authorization stage."""

    async def fail_closed(self, flow: http.HTTPFlow, why: str, started: float) -> None: ...


class FinalCheck:
    """Refuses every unanswered flow that lacks a route, or an allow for this request on an
    authorized route. Never raises: if refusing fails, the flow is killed."""

    name = "easgate-finalcheck"

    def __init__(self, current: Current, ledger: Ledger, gate: FailClosed | None) -> None:
        self.current = current  # the config in force: whether a route authorizes
        self.ledger = ledger  # what the content switch and the gate recorded for this request
        self.gate = gate  # answers a refusal as a deny; None: the refused flow is dropped
        self.refused = 0

    # The hooks return the refusal for mitmproxy to await, or None when the request passes: a
    # request that passes needs no task of its own (FastAddonManager.start_hook).

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        return self._check(flow, last=False)

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        return self._check(flow, last=True)

    def response(self, flow: http.HTTPFlow) -> None:
        self.ledger.forget(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.ledger.forget(flow)

    def why_not(self, flow: http.HTTPFlow) -> str | None:
        """None if the flow may go upstream as it is, else what is missing."""
        ledger = self.ledger
        name = ledger.route_of(flow)
        if name is None:
            return "the request was not routed, or was re-pointed after routing"
        cfg = self.current.config
        try:
            route = cfg.route(name) if cfg is not None else None
        except KeyError:  # a reload removed it while the request was decided
            route = None
        if route is None:
            return f"unknown route {name}"
        if route.authorize and not ledger.allowed(flow):
            return "no allow decision for this request"
        return None

    def _check(self, flow: http.HTTPFlow, last: bool) -> Awaitable[None] | None:
        """None when the flow may go on (or is answered already); else its refusal, to await."""
        if not flow.live:
            return None  # a flow read from a file (offline replay): nothing is sent anywhere
        try:
            if flow.response is not None or flow.error is not None:
                self.ledger.forget(flow)
                return None
            if not last and keys.PENDING in flow.metadata:
                return None  # decided on its body in the gate's `request` hook, checked again there (last)
            why = self.why_not(flow)
            if why is None:
                if last:
                    self.ledger.forget(flow)
                return None
            self.refused += 1
            self.ledger.forget(flow)
            if self.gate is None:
                drop(flow)
                return None
            return self._refuse(flow, why, self.gate)
        except Exception:
            self._kill(flow)
            return None

    async def _refuse(self, flow: http.HTTPFlow, why: str, gate: FailClosed) -> None:
        try:
            await gate.fail_closed(flow, why, time.perf_counter())
            if flow.response is None and flow.error is None:
                drop(flow)
        except Exception:
            self._kill(flow)

    @staticmethod
    def _kill(flow: http.HTTPFlow) -> None:
        logger.exception("easgate: the final check failed; dropping the request")
        try:
            flow.kill()
        except Exception:
            flow.error = flow.error or mflow.Error(mflow.Error.KILLED_MESSAGE)
