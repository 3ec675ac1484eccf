"""What every benchmark shares: the commit its numbers came from, and RESULTS.md written only from
a clean tree, so a number in RESULTS.md always names a commit anyone can check out and re-run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def commit() -> str:
    """The short commit, with a visible mark when the tree has changes (never written to RESULTS.md)."""
    return _git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if dirty() else "")


def dirty() -> bool:
    """Tracked files changed, RESULTS.md aside (the sections a run of several scripts appends)."""
    return bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/RESULTS.md"))


def refuse_dirty_write(write: bool, script: str) -> None:
    """Called before a run with --write: fail in one line at once instead of after minutes of measuring."""
    if write and dirty():
        print(f"{script}: --write needs a clean tree (commit first): RESULTS.md names the commit its numbers "
              "came from", file=sys.stderr)
        sys.exit(2)


def append(section: str, script: str) -> None:
    """Append one markdown section to RESULTS.md (checked again: the tree may have changed meanwhile)."""
    refuse_dirty_write(True, script)
    with RESULTS.open("a") as f:
        f.write("\n" + section.strip("\n") + "\n")
    print(f"appended to {RESULTS}", file=sys.stderr)
