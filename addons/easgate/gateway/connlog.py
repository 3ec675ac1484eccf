"""Whether mitmproxy's four log lines per connection are shown (`easgate_log_connections`).

mitmproxy logs `client connect`, `server connect ADDRESS`, `client disconnect` and `server
disconnect ADDRESS` at info level for every connection. Phones reconnect all day (carrier and NAT
timeouts end idle connections; a Ping lasts up to an hour): at one reconnect per phone every 15
minutes, 10,000 phones make ~45 of these lines a second, ~4 million a day, and making and writing
them was 5-9% of a new connection's CPU (bench/RESULTS.md). The audit log has a line per ActiveSync
request, and what goes wrong on a connection (a failed handshake or connect, an idle timeout, a
crash) is still logged at info or above. So they are debug lines unless `--set
easgate_log_connections=true` (each names the connection's address and, with workers, its worker:
what following one phone's connections across workers needs).
"""

from __future__ import annotations

import logging

from mitmproxy import ctx

#: mitmproxy.proxy.server's routine lines (ConnectionHandler.log, mitmproxy 12.3.1)
ROUTINE = frozenset({"client connect", "client disconnect"})
ROUTINE_PREFIXES = ("server connect ", "server disconnect ")
SERVER_LOGGER = "mitmproxy.proxy.server"


class _Demote(logging.Filter):
    """Routine connection lines become debug lines: shown with `termlog_verbosity=debug`, dropped
    (before they are formatted or written) otherwise."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO:
            msg = record.msg
            if msg in ROUTINE or (isinstance(msg, str) and msg.startswith(ROUTINE_PREFIXES)):
                record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


class ConnectionLog:
    name = "easgate-connlog"

    def __init__(self) -> None:
        self._demote = _Demote()

    def load(self, loader) -> None:
        loader.add_option("easgate_log_connections", bool, False,
                          "Log mitmproxy's client/server connect and disconnect line for every connection at "
                          "info level (off: they are debug lines).")

    def running(self) -> None:  # the default, which no configure event names
        self._set(demote=not ctx.options.easgate_log_connections)

    def configure(self, updated) -> None:
        if "easgate_log_connections" in updated:
            self._set(demote=not ctx.options.easgate_log_connections)

    def done(self) -> None:
        self._set(demote=False)

    def _set(self, demote: bool) -> None:
        log = logging.getLogger(SERVER_LOGGER)
        if demote:
            if self._demote not in log.filters:
                log.addFilter(self._demote)
        else:
            log.removeFilter(self._demote)
