"""The audit log as a gateway addon: opened from the config, reopened for logrotate, and asked
before an ActiveSync request is allowed.

`admit` turns an allow into a deny when its line cannot be written (``audit.on_error: deny``,
the default), and `record` waits until the line is written before the request goes on: an allowed
request with no audit line is exactly what the audit log is there to rule out.

Reopening after logrotate: under `easgate run`, SIGHUP reloads the config (new workers, or the
config applied in place), which opens the audit log afresh; under plain `mitmdump -s`, where
nothing else handles SIGHUP, this addon reopens the file on it. The ``easgate.audit.reopen``
command works in both.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Callable

from mitmproxy import command, ctx

from ..authz.audit import AuditLog
from ..core.decision import Decision
from .config import GatewayConfig

logger = logging.getLogger("easgate.audit")


class AuditTrail:
    def __init__(self) -> None:
        self.log = AuditLog(None)
        self._sighup = False

    def prepare(self, cfg: GatewayConfig) -> Callable[[], None]:
        a = cfg.audit
        log = AuditLog(cfg.audit_log, on_error=a.on_error, queue_lines=a.queue_lines,
                       max_value_chars=a.max_value_chars, write_timeout_s=a.write_timeout_ms / 1000)

        def swap() -> None:
            old, self.log = self.log, log
            old.close()
        return swap

    def apply(self, cfg: GatewayConfig) -> None:
        self.prepare(cfg)()

    def running(self) -> None:
        if getattr(ctx.master, "easgate_sighup_reloads", False):
            return  # easgate's runner owns SIGHUP: a reload reopens the log (apply, above)
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
            self._sighup = True
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
            pass

    def done(self) -> None:
        if self._sighup:
            try:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            except (RuntimeError, ValueError):
                pass
            self._sighup = False
        self.log.close()

    def _on_sighup(self) -> None:
        logger.info("easgate: SIGHUP: reopening the audit log")
        self.log.reopen()

    # -- what the authorization stage calls ----------------------------------------------------

    def admit(self, d: Decision) -> Decision:
        """The decision to enforce: `d`, or a deny if `d` allows and its line cannot be written."""
        if not d.allow:
            return d
        why = self.log.must_deny()
        if why is None:
            return d
        self.log.refused()
        return Decision(False, why, "audit")

    async def record(self, rec: dict) -> bool:
        """Write the line and wait for it: True once it is written, False if it cannot be (it stays
        queued while there is room; the outage is logged once)."""
        return await self.log.commit(rec)

    # -- commands --------------------------------------------------------------------------------

    @command.command("easgate.audit.reopen")
    def reopen(self) -> str:
        """Reopen the audit log file (after logrotate moved it away)."""
        if self.log.path is None:
            return "no audit_log configured"
        self.log.reopen()
        return f"reopening {self.log.path}"

    @command.command("easgate.audit.status")
    def status(self) -> str:
        """The audit log: writable or not, lines written, lost, queued, outages."""
        return json.dumps(self.log.state, sort_keys=True)
