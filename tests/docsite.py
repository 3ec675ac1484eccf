"""A copy of the checkout's layout in which the documents' commands run exactly as written.

`make_site(tmp_path)` copies `policies/` and `tests/captures/` and links `.venv` and `addons` to
the checkout's, so `.venv/bin/easgate ...` runs as a user types it. What changes is data, not
commands: the fixed ports of the copied configs (8443, 9443, 9081, 9080) become free ports (a
command's `:PORT` gets the copy's port the same way, see `Site.cmd`), and a HOME of its own gives
mitmweb a free UI port (the documented 8081 becomes it) and no browser (`~/.mitmproxy/config.yaml`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from easgate.tools.ports import free_port

from conftest import ROOT, GatewayProcess
from doccommands import doc_command
from support.procs import FORKEXEC, forking

VENV = Path(sys.executable).parent.parent


@dataclass
class Site:
    dir: Path
    env: dict
    ports: dict[int, int] = field(default_factory=dict)  # documented port -> the copy's port
    procs: list[GatewayProcess] = field(default_factory=list)

    def cmd(self, file: str, command: str) -> str:
        """The documented command, with the copy's ports for the documented ones."""
        text = doc_command(file, command)
        for old, new in self.ports.items():
            text = re.sub(rf"(?<![\w.]){old}(?![\w])", str(new), text)  # host:8443, -port 8888
        return text

    def run(self, file: str, command: str, ok: bool = True, timeout: float = 90) -> subprocess.CompletedProcess:
        p = subprocess.run(["bash", "-c", self.cmd(file, command)], cwd=self.dir, env=self.env, capture_output=True,
                           text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        assert (p.returncode == 0) == ok, f"{command}: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
        return p

    def script(self, file: str, *commands: str, timeout: float = 90) -> subprocess.CompletedProcess:
        """Several commands of one block in one shell (they share variables), stopping at the first failure."""
        text = "set -e\n" + "\n".join(self.cmd(file, c) for c in commands)
        p = subprocess.run(["bash", "-c", text], cwd=self.dir, env=self.env, capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
        assert p.returncode == 0, f"{text}\nexit {p.returncode}\n{p.stdout}\n{p.stderr}"
        return p

    def start(self, file: str, command: str, prefix: str = "") -> GatewayProcess:
        """A long-running command, in the background (`prefix`: e.g. `taskset -c 0`)."""
        text = self.cmd(file, command)
        if text.endswith("&"):  # backgrounded in the document: the test backgrounds it itself
            text = text[:-1].rstrip()
        g = GatewayProcess(["bash", "-c", f"exec {prefix} {text}"], cwd=self.dir, env=self.env)
        self.procs.append(g)
        return g

    def stop_all(self) -> None:
        for g in reversed(self.procs):
            g.stop()


def wait_for(g: GatewayProcess, pattern: str, timeout: float = 30) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, g.output)
        if m:
            return m
        if g.proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"no {pattern!r} in:\n{g.output}")


def link_venv(dest: Path) -> None:
    """`.venv` of the copy: the checkout's, except that with the fork server (support/procs.py) its
    `bin/easgate`, `bin/mitmdump` and `bin/mitmweb` run through it (support/forkexec.py), as a test's
    own easgate processes do."""
    if not forking():
        dest.symlink_to(VENV)
        return
    dest.mkdir()
    for entry in VENV.iterdir():
        if entry.name != "bin":
            (dest / entry.name).symlink_to(entry)
    (dest / "bin").mkdir()
    shim = FORKEXEC.read_text()
    for entry in (VENV / "bin").iterdir():
        target = dest / "bin" / entry.name
        if entry.name in ("easgate", "mitmdump", "mitmweb"):
            target.write_text(f"#!{VENV / 'bin' / 'python'} -SI\n" + shim)
            target.chmod(0o755)
        else:
            target.symlink_to(entry)


def make_site(tmp_path: Path) -> Site:
    d = tmp_path / "site"
    d.mkdir()
    shutil.copytree(ROOT / "policies", d / "policies")
    shutil.copytree(ROOT / "tests" / "captures", d / "tests" / "captures")
    link_venv(d / ".venv")
    (d / "addons").symlink_to(ROOT / "addons")
    home = tmp_path / "home"
    (home / ".mitmproxy").mkdir(parents=True)
    s = Site(d, dict(os.environ, HOME=str(home), PYTHONUNBUFFERED="1"))
    s.ports = {p: free_port() for p in (8443, 9443, 9081, 9080, 8081)}
    (home / ".mitmproxy" / "config.yaml").write_text(f"web_port: {s.ports[8081]}\nweb_open_browser: false\n")
    for f in (d / "policies" / "gateway.yaml", d / "policies" / "connector.yaml", d / "tests/captures/gateway.yaml"):
        text = f.read_text()
        for old, new in s.ports.items():
            text = re.sub(rf"(?<=:){old}\b|(?<=port: ){old}\b", str(new), text)
        f.write_text(text)
    return s


