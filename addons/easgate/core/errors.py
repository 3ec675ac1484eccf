"""The one error style for configuration problems: file, dotted key, problem and fix on one line."""

from __future__ import annotations

from pathlib import Path


class ConfigError(ValueError):
    """A configuration problem: `str(e)` is one line naming file, key and fix."""

    def __init__(self, file: Path | str | None, key: str, problem: str, fix: str = "") -> None:
        self.file, self.key, self.problem, self.fix = str(file or "<config>"), key, problem, fix
        msg = f"{self.file}: {key}: {problem}" if key else f"{self.file}: {problem}"
        super().__init__(msg + (f" ({fix})" if fix else ""))
