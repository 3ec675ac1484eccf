"""Test only: break one stage of the authorization decision, loaded next to the gateway.

    easgate run CONFIG -- -s tests/support/faults.py
    mitmdump -s addons/gateway.py -s tests/support/faults.py --set easgate_config=CONFIG

A request whose DeviceId contains ``Fault<Stage>`` makes that stage raise a RuntimeError in the
running gateway process; every other request is untouched. The stages are the names the gateway
calls through while it decides (they exist on the main this was written against too):

=============  ============================================================================
Identity       ``authz.identity.parse_request``
Lists          ``authz.policy.Rules.match`` (the deny and allow lists)
Cache          ``authz.cache.DecisionCache.get``
Flight         ``authz.cache.DecisionCache.single_flight``: the shared computation fails
               after 200 ms, so every request waiting on it gets the exception
Connector      ``gateway.xnc.ConnectorClient.authorize`` (an error that is not a ConnectorError)
Inventory      ``authz.policy.Policy.inventory_decision``
Audit          ``gateway.audittrail.AuditTrail.record`` (writing the audit line) for any record
               but an ``internal error`` deny
=============  ============================================================================
"""

from __future__ import annotations

import asyncio

from easgate.authz import identity
from easgate.authz.cache import DecisionCache
from easgate.authz.policy import Policy, Rules
from easgate.gateway.audittrail import AuditTrail
from easgate.gateway.xnc import ConnectorClient


class InjectedFault(RuntimeError):
    pass


def _hit(stage: str, *values) -> bool:
    return any(isinstance(v, str) and f"Fault{stage}" in v for v in values)


def _boom(stage: str):
    raise InjectedFault(f"injected fault: {stage}")


_parse_request = identity.parse_request


def parse_request(method, scheme, host, path, headers, client_ip):
    if _hit("Identity", path):
        _boom("Identity")
    return _parse_request(method, scheme, host, path, headers, client_ip)


_match = Rules.match


def match(self, ident, which):
    if _hit("Lists", ident.device_id):
        _boom("Lists")
    return _match(self, ident, which)


_get = DecisionCache.get


def get(self, key):
    if isinstance(key, tuple) and _hit("Cache", *key):
        _boom("Cache")
    return _get(self, key)


_single_flight = DecisionCache.single_flight


async def single_flight(self, key, compute):
    if isinstance(key, tuple) and _hit("Flight", *key):
        async def failing():
            await asyncio.sleep(0.2)  # long enough for the test's concurrent requests to join
            _boom("Flight")

        return await _single_flight(self, key, failing)
    return await _single_flight(self, key, compute)


_authorize = ConnectorClient.authorize


async def authorize(self, user, agent, ip, url, device_id, *more):
    if _hit("Connector", device_id):
        _boom("Connector")
    return await _authorize(self, user, agent, ip, url, device_id, *more)


_inventory_decision = Policy.inventory_decision


def inventory_decision(self, ident):
    if _hit("Inventory", ident.device_id):
        _boom("Inventory")
    return _inventory_decision(self, ident)


_record = AuditTrail.record


async def record(self, rec):
    if _hit("Audit", rec.get("device_id")) and rec.get("reason") != "internal error":
        _boom("Audit")
    return await _record(self, rec)


identity.parse_request = parse_request
Rules.match = match
DecisionCache.get = get
DecisionCache.single_flight = single_flight
ConnectorClient.authorize = authorize
Policy.inventory_decision = inventory_decision
AuditTrail.record = record
