"""Every command in README.md and docs/*.md is run by a test (see tests/doccommands.py).

Adding a command to a document: write (or extend) a test that runs it exactly as written, and
name it in the test's `@covers("docs/FILE.md", "the command")` decorator. This test then passes.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from doccommands import NOT_RUN, ROOT, all_commands, commands_in, normalize

TESTS = Path(__file__).resolve().parent


def covered() -> dict[tuple[str, str], list[str]]:
    """(document, normalized command) -> the tests whose @covers names it (every tests/test_*.py)."""
    out: dict[tuple[str, str], list[str]] = {}
    for path in sorted(TESTS.glob("test_*.py")):
        module = importlib.import_module(path.stem)
        for name, fn in vars(module).items():
            for file, cmd in getattr(fn, "doc_commands", ()):
                out.setdefault((file, cmd), []).append(f"{path.name}::{name}")
    return out


def test_every_documented_command_is_run_by_a_test():
    cov = covered()
    exempt = {(f, normalize(c)) for f, c in NOT_RUN}
    missing = [c for c in all_commands() if (c.file, c.key) not in cov and (c.file, c.key) not in exempt]
    assert not missing, (
        "documented commands no test runs (write a test that runs each exactly as written and add "
        "@covers(FILE, COMMAND) to it, see tests/doccommands.py):\n"
        + "\n".join(f"  {c.file}:{c.line}: {c.text}" for c in missing))


def test_every_covered_command_is_still_documented():
    shown = {(c.file, c.key) for c in all_commands()}
    stale = [f"  {f}: {c!r} (claimed by {', '.join(tests)})" for (f, c), tests in covered().items()
             if (f, c) not in shown]
    stale += [f"  {f}: {c!r} (NOT_RUN)" for f, c in NOT_RUN if (f, normalize(c)) not in shown]
    assert not stale, "commands tests claim to run that the documents no longer show:\n" + "\n".join(stale)


def test_the_extractor_reads_blocks_as_documented(tmp_path, monkeypatch):
    """Continuations, comments, quoted '#', and non-command blocks."""
    import doccommands

    doc = tmp_path / "x.md"
    doc.write_text("\n".join([
        "```",
        "easgate run gw.yaml -- --set a=b   # a comment",
        "curl -s 'http://h/#frag' \\",
        "    -o out   # continued",
        "# a whole-line comment",
        "```",
        "```text",
        "easgate: config error: this is output",
        "```",
        "```yaml",
        "listen: {port: 1}",
        "```",
        "```sh",
        "openssl ocsp -index i &",
        "```",
    ]) + "\n")
    monkeypatch.setattr(doccommands, "ROOT", tmp_path)
    got = [(c.line, c.text) for c in commands_in(doc)]
    assert got == [(2, "easgate run gw.yaml -- --set a=b"), (3, "curl -s 'http://h/#frag' -o out"),
                   (14, "openssl ocsp -index i &")]


def test_readme_layout_and_outputs_are_not_mistaken_for_commands():
    for c in all_commands():
        assert not c.text.startswith(("easgate: config error", "addons/", "ActiveSync request:", "defaults")), c
    assert (ROOT / "README.md").is_file()


def test_nothing_points_outside_the_repository():
    """The project is self-contained: no file names ../shared (the brief's read-only area) or its DESIGN.md."""
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    skip = {"tests/test_docs.py"}  # this test names what it looks for
    bad = []
    for name in files:
        path = ROOT / name
        if name in skip or path.suffix not in (".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".sh", ".cfg", ""):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if "../shared" in line or "shared/DESIGN" in line or "DESIGN.md" in line:
                bad.append(f"{name}:{n}: {line.strip()}")
    assert not bad, "files that point outside the repository:\n" + "\n".join(bad)


def test_every_metric_the_gateway_serves_is_in_the_operations_table():
    """docs/operations.md's metrics table is where an operator looks up what a series means: a
    metric added without a row there is one nobody can read (two were missing when this test came)."""
    names = set(re.findall(r'd\.(?:metric|histogram)\(\s*"(easgate_\w+)"',
                           (ROOT / "addons/easgate/gateway/metrics.py").read_text()))
    assert len(names) > 20  # the pattern still finds them
    table = [line for line in (ROOT / "docs/operations.md").read_text().splitlines() if line.startswith("| `easgate_")]
    documented = set(re.findall(r"`(easgate_\w+)`", "\n".join(table)))
    assert sorted(names - documented) == []
