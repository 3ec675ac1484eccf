"""The commands README.md and docs/*.md show, and which test runs each of them.

A fenced block without an info string, or with `sh`, `shell`, `bash` or `console`, holds commands:
one per line (a trailing backslash continues it; `# ...` after the command is a comment). Other
blocks (`text` for output, `yaml`, `haproxy`, `ini`...) are not commands.

Every command must be run by a test, exactly as written. A test says which commands it runs with
the `covers` decorator, and gets each command's text from the document with `doc_command`:

    @covers("docs/connector.md", ".venv/bin/easgate connector policies/connector.yaml")
    def test_the_connector_starts(...):
        cmd = doc_command("docs/connector.md", ".venv/bin/easgate connector policies/connector.yaml")
        subprocess.run(cmd, shell=True, ...)

tests/test_docs.py imports every tests/test_*.py, reads what their `covers` decorators say, and fails for a documented command no test covers, and for a covered one that is no longer
in its document. Commands that cannot run inside the test suite (they install system packages,
run the suite itself, or take ten minutes) are listed in NOT_RUN with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMAND_BLOCKS = {"", "sh", "shell", "bash", "console"}
FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")

# (document, command) -> why no test runs it. Keep it short: each entry is a command a reader
# runs that the suite does not.
NOT_RUN: dict[tuple[str, str], str] = {
    ("README.md", "make test"): "runs the whole suite (the suite cannot run itself); .ci/run runs it",
    ("docs/security.md", ".venv/bin/python -m pytest -q tests/test_hardening.py tests/test_properties.py"):
        "runs part of the suite; the suite runs those files itself",
    ("docs/security.md", ".venv/bin/python -m pytest -q -s tests/test_hardening.py -k hostile_batch"):
        "runs part of the suite; the suite runs that test itself",
    ("docs/security.md", "HYPOTHESIS_PROFILE=thorough .venv/bin/python -m pytest -q tests/test_properties.py"):
        "runs part of the suite with 3,000 examples per property (minutes)",
    ("docs/scaling.md", "apt-get install wrk nginx-light"): "installs system packages",
    ("docs/scaling.md", ".venv/bin/python bench/bench_scale.py --write"): "a ten-minute benchmark; not a test",
    ("docs/scaling.md", "pip install 'easgate[cluster]'"): "installs packages (the test extra has them)",
    ("docs/scaling.md", ".venv/bin/python bench/bench_cluster.py"): "a benchmark; not a test",
    ("docs/operations.md", ".venv/bin/python scripts/make_captures.py"):
        "rewrites tests/captures/ in the checkout; tests/test_captures.py checks what it made",
}


@dataclass(frozen=True)
class DocCommand:
    file: str  # relative to the repository, e.g. "docs/operations.md"
    line: int  # where the command starts
    text: str  # the command as written, continuation lines joined, without its trailing comment

    @property
    def key(self) -> str:
        return normalize(self.text)


def normalize(cmd: str) -> str:
    """Whitespace-insensitive form used to match `covers` entries with documents."""
    return " ".join(cmd.split())


def _strip_comment(line: str) -> str:
    # a comment starts with '#' at the line start or after whitespace, outside quotes
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def commands_in(path: Path) -> list[DocCommand]:
    rel = path.resolve().relative_to(ROOT).as_posix()
    out: list[DocCommand] = []
    fence: str | None = None
    is_cmd = False
    pending: list[str] = []
    start = 0
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = FENCE.match(raw)
        if m and (fence is None or m.group(1) == fence):
            if fence is None:
                fence, is_cmd = m.group(1), m.group(2).lower() in COMMAND_BLOCKS
            else:
                fence = None
            continue
        if fence is None or not is_cmd:
            continue
        line = _strip_comment(raw)
        if not pending:
            start = n
            if not line.strip():
                continue
        if line.endswith("\\"):
            pending.append(line[:-1].rstrip())
            continue
        pending.append(line)
        text = " ".join(p.strip() for p in pending if p.strip())
        pending = []
        if text:
            out.append(DocCommand(rel, start, text))
    return out


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def all_commands() -> list[DocCommand]:
    return [c for d in documents() for c in commands_in(d)]


def doc_command(file: str, command: str) -> str:
    """The command as the document writes it (continuations joined, comment dropped); fails the
    calling test if the document does not show it any more."""
    want = normalize(command)
    for c in commands_in(ROOT / file):
        if c.key == want:
            return c.text
    raise AssertionError(f"{file} does not show the command {command!r} any more: update the test")


def covers(file: str, *commands: str):
    """Marks a test as running these commands of `file` (read by tests/test_docs.py)."""

    def mark(fn):
        fn.doc_commands = getattr(fn, "doc_commands", ()) + tuple((file, normalize(c)) for c in commands)
        return fn

    return mark
