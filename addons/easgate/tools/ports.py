"""Free loopback ports for servers that must be told their port before they start (stand-ins,
PostgreSQL, Redis, SOGo, a document's fixed ports in the tests).

A port the kernel picked for a bind to port 0 and that was then released is in the ephemeral range:
any process that binds port 0 or connects out meanwhile may get it before the server binds it (with
several test workers on one machine, that happened). These ports come from below that range, which
the kernel never hands out by itself; only another caller of this module can pick the same one, and
it is random among ~20,000.
"""

from __future__ import annotations

import random
import socket

__all__ = ["free_port", "free_ports"]

LOWEST = 10000
_rng = random.SystemRandom()


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(n: int) -> list[int]:
    """n distinct loopback ports that nothing listens on now, below the ephemeral range."""
    top = _ephemeral_start()
    socks: list[socket.socket] = []
    try:
        while len(socks) < n:
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", _rng.randrange(LOWEST, top)))
            except OSError:
                s.close()
                continue
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]
