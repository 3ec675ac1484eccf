"""The connector's change feed: which devices' decisions may have changed, for gateways that follow it.

An easgate extension next to the XNC Authorize endpoint (``connector/service.py`` serves it,
``gateway/xnc.py`` follows it; neither imports the other, so the wire format lives here):

    GET /services/easgate/changes?since=SEQ&instance=ID&wait=S

answers ``200 {"instance": ID, "seq": N, "devices": [DeviceId, ...], "reset": false}`` as soon as
there are changes after ``SEQ`` of that connector instance, or after ``S`` seconds (at most
``MAX_WAIT_S``) with an empty list. ``reset: true`` means "anything may have changed": the
connector restarted (another ``instance``), ``SEQ`` is older than what it keeps, too many devices
changed at once, or it lost its own view of the inventory for a while. A follower without a position
(``since`` absent) gets the current position at once and nothing else.

A change is any committed inventory change a decision depends on (a block, an unblock, owner,
managed, compliant, a device added or removed), from any writer: ``easgate devices``, an import, a
direct SQL edit (SQLite triggers; PostgreSQL LISTEN/NOTIFY).
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass

__all__ = ["CHANGES_PATH", "Changes", "MAX_DEVICES", "MAX_WAIT_S", "WAIT_S", "decode", "encode", "query"]

CHANGES_PATH = "/services/easgate/changes"
WAIT_S = 25.0  # what a follower asks for: under the idle timeouts of the proxies that may sit between
MAX_WAIT_S = 60.0
MAX_DEVICES = 1000  # more at once: a reset (the follower forgets everything rather than one by one)
MAX_ANSWER = 256 * 1024


@dataclass(frozen=True, slots=True)
class Changes:
    instance: str
    seq: int
    devices: tuple[str, ...] = ()
    reset: bool = False


def query(since: int | None, instance: str | None, wait_s: float = WAIT_S) -> str:
    """The query string of a follower's request (the path is the configured URL's)."""
    params: dict[str, str] = {"wait": f"{wait_s:g}"}
    if since is not None and instance:
        params.update(since=str(since), instance=instance)
    return urllib.parse.urlencode(params)


def encode(c: Changes) -> bytes:
    return (json.dumps({"instance": c.instance, "seq": c.seq, "devices": list(c.devices), "reset": c.reset},
                       separators=(",", ":")) + "\n").encode()


def decode(body: bytes) -> Changes:
    """Strictly read an answer; ValueError when it is not one (the follower treats it as an outage)."""
    if len(body) > MAX_ANSWER:
        raise ValueError("change feed answer too large")
    v = json.loads(body)
    if not isinstance(v, dict):
        raise ValueError("change feed answer is not a JSON object")
    instance, seq, devices, reset = v.get("instance"), v.get("seq"), v.get("devices"), v.get("reset")
    if not isinstance(instance, str) or not instance or not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise ValueError("change feed answer has no instance and seq")
    if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices) or not isinstance(reset, bool):
        raise ValueError("change feed answer has no devices list and reset flag")
    return Changes(instance, seq, tuple(devices), reset)
