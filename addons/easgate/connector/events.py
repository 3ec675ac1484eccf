"""Block events from the connector to every gateway node, over Redis (or Valkey) pub/sub.

With ``redis: redis://...`` in the connector YAML and a PostgreSQL inventory, each committed
inventory change a decision depends on (LISTEN/NOTIFY, ``connector/pgstore.py``) revokes that
device in the gateways' shared cache and is published on the event channel, so every gateway
node drops its cached decisions for the device within moments instead of at the end of a TTL.
Layout and scripts: ``authz/sharedlayout.py``. Several connectors publish the same change:
harmless, a revocation is idempotent.

Redis down: the change is logged (once per burst) and not retried; the gateways' fail-over
drops their local caches when their event channel comes back, so a missed event costs at most
what it costs on one machine (the TTL).
"""

from __future__ import annotations

import logging
import threading

from ..authz.sharedlayout import REVOKE_SCRIPT, SharedLayout, encode_event
from .pgstore import redact

try:
    import redis
    from redis.exceptions import RedisError
except ImportError:  # the base install
    redis = None  # type: ignore[assignment]
    RedisError = OSError  # type: ignore[assignment,misc]

__all__ = ["BlockEvents"]

logger = logging.getLogger("easgate.connector")

TIMEOUT_S = 1.0


class BlockEvents:
    """Publishes inventory changes; thread-safe (called from the LISTEN thread)."""

    def __init__(self, url: str, prefix: str = "easgate:") -> None:
        if redis is None:
            raise RuntimeError("block events on Redis need the Redis client; pip install 'easgate[cluster]'")
        self.url = redact(url)  # for the log and /health: no password
        self.keys = SharedLayout(prefix)
        self.client = redis.Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        self._revoke = self.client.register_script(REVOKE_SCRIPT)
        self.lock = threading.Lock()
        self.published = 0
        self.errors = 0
        self._failing = False

    def changed(self, device_id: str) -> None:
        """One device changed (``"*"``: anything may have: every node forgets everything)."""
        with self.lock:
            try:
                if device_id == "*":
                    self.client.incr(self.keys.epoch)
                    self.client.publish(self.keys.channel, encode_event("all"))
                else:
                    self._revoke(keys=[self.keys.device(device_id)])
                    self.client.publish(self.keys.channel, encode_event("device", d=device_id))
            except (RedisError, OSError) as e:
                self.errors += 1
                if not self._failing:
                    logger.warning(f"easgate connector: cannot publish block events to {self.url} ({e}); "
                                   "gateways fall back to their TTLs until it is back")
                self._failing = True
                return
            if self._failing:
                logger.warning(f"easgate connector: publishing block events to {self.url} again")
            self._failing = False
            self.published += 1

    def close(self) -> None:
        self.client.close()
