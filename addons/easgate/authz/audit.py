"""The audit trail: one JSON line per authorization decision.

Written synchronously with line buffering: a line per decision is small, and an audit log that
lags behind or loses its tail on a crash is not an audit log.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import IO

from ..core.errors import ConfigError

logger = logging.getLogger(__name__)


class AuditLog:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.file: IO[str] | None = None
        self.failed = False
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.file = open(path, "a", buffering=1, encoding="utf-8")
            except OSError as e:
                raise ConfigError(None, "audit_log", f"cannot write {path}: {e.strerror}",
                                  "choose a writable path or fix its permissions")

    @staticmethod
    def check(path: Path | None) -> None:
        """What opening would find out, without creating the file or its directory: `easgate
        check` must not write anything."""
        if path is None:
            return
        if path.exists():
            ok = not path.is_dir() and os.access(path, os.W_OK)  # a file, a FIFO, /dev/full...
        else:
            parent = next((p for p in path.parents if p.exists()), None)
            ok = parent is not None and parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)
        if not ok:
            raise ConfigError(None, "audit_log", f"cannot write {path}",
                              "choose a writable path or fix its permissions")

    def write(self, record: dict) -> None:
        record.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=str)
        logger.debug(line)
        if self.file is None:
            return
        try:
            self.file.write(line + "\n")
            self.failed = False
        except (OSError, ValueError) as e:
            if not self.failed:  # say it once per outage, not per request
                logger.error(f"easgate: audit log {self.path} not writable: {e}; decisions still logged at debug level")
            self.failed = True

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None
