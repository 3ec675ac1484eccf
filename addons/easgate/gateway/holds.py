"""Requests the gateway holds open for a device, so that a block reaches them.

A Ping or a Sync with a heartbeat is held by Exchange for up to ~59 minutes. An allow decided
when it arrived would otherwise outlive a block by that long: a lost phone keeps getting mail.
`HeldRequests` knows every authorized request still waiting for its answer, by (user, DeviceId),
so the gate can close them when the device's decision turns to deny (a revocation, a policy
reload, a re-authorization that now denies) and re-authorize each at least every allow_ttl_s.

Ending one answers it, where the client has no response bytes yet, with the deny a phone
understands (deny.mode: the HTTP status, or the command's WBXML response with status 129/130) and
closes its upstream connection (`answer`, through mitmcompat.answer_held); otherwise (deny.mode
drop, a response already under way) both connections are reset (`close`), which ends the long
poll at once on both sides.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from mitmproxy import http

from ..authz import identity
from . import mitmcompat

__all__ = ["Held", "HeldRequests"]


@dataclass(slots=True)
class Held:
    flow: http.HTTPFlow
    ident: identity.Identity
    since: float  # clock() when it was allowed
    authorized: float  # clock() of its last allow
    checking: bool = field(default=False)  # a re-authorization is under way


class HeldRequests:
    """Authorized requests in flight, by flow id; cheap to add and remove on every request."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.held: dict[str, Held] = {}

    def __len__(self) -> int:
        return len(self.held)

    def add(self, flow: http.HTTPFlow, ident: identity.Identity) -> None:
        now = self.clock()
        self.held[flow.id] = Held(flow, ident, now, now)

    def remove(self, flow: http.HTTPFlow) -> None:
        self.held.pop(flow.id, None)

    def all(self) -> list[Held]:
        return list(self.held.values())

    def of_device(self, device_id: str) -> Iterator[Held]:
        d = device_id.lower()
        return (h for h in list(self.held.values()) if (h.ident.device_id or "").lower() == d)

    def due(self, every_s: float) -> list[Held]:
        """The held requests whose last allow is at least every_s old and not being re-checked."""
        now = self.clock()
        return [h for h in self.held.values() if not h.checking and now - h.authorized >= every_s]

    def answer(self, h: Held, response: http.Response) -> float | None:
        """Answer a held request with `response` and close its upstream connection; how long it was
        held, or None when it cannot be answered (then `close` it)."""
        if not mitmcompat.answer_held(h.flow, response):
            return None
        self.held.pop(h.flow.id, None)
        return self.clock() - h.since

    def close(self, h: Held) -> float:
        """Reset the client and upstream connections of a held request; returns how long it was held."""
        self.held.pop(h.flow.id, None)
        flow = h.flow
        if flow.killable:
            flow.kill()
        mitmcompat.abort(flow.client_conn, flow.server_conn)
        mitmcompat.abort(flow.client_conn)
        return self.clock() - h.since
