"""The one authorization engine, used by the gateway and by `easgate connector` alike.

One precedence order; the first row that applies decides:

==  ==================================================================  =======  ==========
#   condition                                                           verdict  source
==  ==================================================================  =======  ==========
1   identity error, no user, no DeviceId, or a value outside MS-ASHTTP  deny     identity
    (see ``identity``: never re-encoded)
2   the policy's deny lists (devices, users, device types, agents)      deny     policy
3   the backend (see below) says the operator blocked the device        deny     block
4   the policy's allow lists                                            allow    policy
5   the backend's verdict: connector answer, inventory row (owner,      either   connector,
    compliance), or the connector's fail mode                                    inventory,
                                                                                 fail-mode
6   nothing matched: the policy mode (block: deny, permit: allow)       either   mode
==  ==================================================================  =======  ==========

So deny lists beat everything, an operator's block (``easgate devices block X``) beats every allow
list, and allow lists beat the backend's other denies (unmanaged, another user's, noncompliant).

The backend is injected (``Lookup``: an async callable taking the identity, returning a Decision or
None for "no opinion"): the gateway passes its XNC connector client or the policy file's inventory,
the connector its SQLite inventory. So authz never imports gateway or connector.

Rows 3, 5 and 6 depend only on (user, DeviceId) and the policy: with a cache they are remembered
per exact (user, DeviceId) -- no case folded, the decision source decides what case means -- with
single flight; rows 1, 2 and 4 read the DeviceType and User-Agent too and are evaluated on every
request. Fail-mode verdicts are never cached. An exception from any stage propagates: the caller
turns it into ``INTERNAL_ERROR`` (deny), never into an allow.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from ..core.decision import Decision, Source
from . import identity
from .cache import DecisionCache, cache_key
from .policy import IdentityLike, Policy

__all__ = ["Engine", "Lookup", "identity_decision", "run_sync"]

Lookup = Callable[[IdentityLike], Awaitable[Decision | None]]


def identity_decision(ident: IdentityLike) -> Decision | None:
    """Row 1: a deny when the identity is unusable, else None."""
    if ident.error:
        return Decision(False, ident.error, Source.IDENTITY)
    if not ident.user:
        return Decision(False, "request has no user", Source.IDENTITY)
    if not ident.device_id:
        return Decision(False, "request has no DeviceId", Source.IDENTITY)
    err = identity.identity_error(ident.user, ident.device_id, ident.device_type)
    if err is not None:
        return Decision(False, err, Source.IDENTITY)
    return None


class Engine:
    """Decides for one identity. ``policy`` is called once per decision (a reloadable store's
    current policy); ``lookup`` is the backend (None: the policy file's own inventory)."""

    def __init__(self, policy: Callable[[], Policy], lookup: Lookup | None = None,
                 cache: DecisionCache | None = None) -> None:
        self.policy = policy
        self.lookup = lookup
        self.cache = cache

    async def decide(self, ident: IdentityLike) -> Decision:
        d = identity_decision(ident)
        if d is not None:
            return d
        policy = self.policy()
        reason = policy.deny.match(ident, "deny")
        if reason is not None:
            return Decision(False, reason, Source.POLICY)
        backend, cached = await self._backend(ident, policy)
        if backend.source is not Source.BLOCK:
            reason = policy.allow.match(ident, "allow")
            if reason is not None:
                return Decision(True, reason, Source.POLICY)
        return backend.with_source(Source.CACHE) if cached else backend

    async def _backend(self, ident: IdentityLike, policy: Policy) -> tuple[Decision, bool]:
        """Rows 3, 5, 6 and whether they came from the cache."""
        cache = self.cache
        if cache is None:
            return await self._compute(ident, policy), False
        key = cache_key(ident.user, ident.device_id)
        hit = cache.get(key)
        if hit is not None:
            return hit, True
        generation = cache.generation

        async def compute_and_store() -> Decision:
            # Stored inside the single flight, so the cache is filled before the in-flight entry
            # goes: a request arriving in between finds one or the other, never neither.
            d = await self._compute(ident, policy)
            if d.source is not Source.FAIL_MODE:  # a connector blip must not be remembered
                cache.put(key, d, generation=generation)
            return d

        d, _shared = await cache.single_flight(key, compute_and_store)
        return d, False

    async def _compute(self, ident: IdentityLike, policy: Policy) -> Decision:
        if self.lookup is None:
            d = policy.inventory_decision(ident)
        else:
            d = await self.lookup(ident)
        return d if d is not None else policy.mode_decision(ident)


def run_sync(coro: Coroutine[Any, Any, Decision]) -> Decision:
    """Run a decision whose backend never waits (the connector's SQLite lookup, the policy file's
    inventory, no cache) without an event loop."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError("the decision waited for something; await Engine.decide instead")
