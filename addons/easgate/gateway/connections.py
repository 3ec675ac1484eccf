"""Open files and the per-process connection cap.

- `raise_fd_limit()`: RLIMIT_NOFILE as high as the machine allows (the hard limit, or, with
  CAP_SYS_RESOURCE, /proc/sys/fs/nr_open); a held ActiveSync Ping costs two descriptors.
- `Connections` (addon): the per-process cap on concurrent client connections (a clean close past
  it, logged once per burst), and the requests in flight that a graceful stop waits for.
"""

from __future__ import annotations

import logging
import resource
import time

logger = logging.getLogger("easgate")

FD_RESERVE = 64  # descriptors kept for log files, the audit log, connector and listener sockets


# ------------------------------------------------------------------------------------------------
# Open files


_fd_limit: tuple[int, int] | None = None  # (before, after) for this process


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft (and, if permitted, the hard) open-files limit; returns (before, after)."""
    global _fd_limit
    if _fd_limit is not None:
        return _fd_limit
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        nr_open = int(open("/proc/sys/fs/nr_open").read())
    except (OSError, ValueError):
        nr_open = hard if hard != resource.RLIM_INFINITY else 1 << 20
    target = hard if hard != resource.RLIM_INFINITY else nr_open
    new = soft
    if nr_open > target:  # only with CAP_SYS_RESOURCE (root)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nr_open, nr_open))
            new = nr_open
        except (ValueError, OSError):
            pass
    if new == soft and soft != target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            new = target
        except (ValueError, OSError):
            pass
    _fd_limit = (soft, new)
    return _fd_limit


def auto_max_connections(fd_limit: int) -> int:
    """Every held connection needs a client and an upstream descriptor."""
    return max(16, (fd_limit - FD_RESERVE) // 2)


# ------------------------------------------------------------------------------------------------
# Connection cap and requests in flight


class Connections:
    """Per-process cap on concurrent client connections; the requests in flight per connection."""

    name = "easgate-connections"
    SUMMARY_EVERY_S = 10.0

    def __init__(self) -> None:
        self.configured = 0
        self.cap = 1 << 30
        self.active = 0
        self.peak = 0
        self.refused = 0
        self.inflight: dict[str, set[str]] = {}
        self._last_log = -1e9
        self._unlogged = 0

    def load(self, loader) -> None:
        raise_fd_limit()  # as early as possible in the process

    def apply(self, cfg) -> None:
        self.configured = cfg.max_connections
        fd = raise_fd_limit()[1]
        self.cap = cfg.max_connections or auto_max_connections(fd)
        if cfg.max_connections and cfg.max_connections > auto_max_connections(fd):
            logger.warning(f"easgate: max_connections {cfg.max_connections} is more than the open-files limit "
                           f"({fd}) allows for held connections (about {auto_max_connections(fd)})")

    def running(self) -> None:
        before, after = raise_fd_limit()
        if after > before:
            fd = f"open files limit: {after} (raised from {before})"
        else:
            fd = f"open files limit: {after}" + (
                "" if after >= 1 << 20 else " (the hard limit; raise it with ulimit -Hn / LimitNOFILE= or CAP_SYS_RESOURCE)")
        how = "max_connections" if self.configured else "from the open-files limit; set max_connections to change"
        logger.info(f"easgate: {fd}; at most {self.cap} concurrent client connections in this process ({how})")

    def client_connected(self, client) -> None:
        self.active += 1
        if self.active > self.cap:
            self.refused += 1
            client.error = f"easgate: connection limit of {self.cap} reached"
            now = time.monotonic()
            if now - self._last_log >= self.SUMMARY_EVERY_S:
                more = f" ({self._unlogged} more refused since the last message)" if self._unlogged else ""
                logger.warning(f"easgate: connection from {client.peername[0] if client.peername else '?'} refused: "
                               f"{self.cap} concurrent connections is this process's limit (max_connections){more}")
                self._last_log, self._unlogged = now, 0
            else:
                self._unlogged += 1
        elif self.active > self.peak:
            self.peak = self.active

    def client_disconnected(self, client) -> None:
        self.active -= 1
        self.inflight.pop(client.id, None)

    def requestheaders(self, flow) -> None:
        s = self.inflight.get(flow.client_conn.id)
        if s is None:
            self.inflight[flow.client_conn.id] = {flow.id}
        else:
            s.add(flow.id)

    def response(self, flow) -> None:
        s = self.inflight.get(flow.client_conn.id)
        if s:
            s.discard(flow.id)

    error = response

    def busy(self, client_id: str) -> bool:
        return bool(self.inflight.get(client_id))
