"""docs/connector.md's commands, run exactly as written in a copy of the checkout (tests/docsite.py)."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from doccommands import ROOT, commands_in, covers
from docsite import make_site, wait_for

DOC = "docs/connector.md"
START = [".venv/bin/easgate connector policies/connector.yaml",
         ".venv/bin/easgate devices -c policies/connector.yaml import policies/demo-inventory.csv"]
DEVICES = [".venv/bin/easgate devices -c policies/connector.yaml add ApplNEW000000001 --user alice "
           "--type iPhone --model \"iPhone 16\"",
           ".venv/bin/easgate devices -c policies/connector.yaml block ApplNEW000000001",
           ".venv/bin/easgate devices -c policies/connector.yaml unblock ApplNEW000000001",
           ".venv/bin/easgate devices -c policies/connector.yaml list --user alice",
           ".venv/bin/easgate devices -c policies/connector.yaml remove ApplNEW000000001"]
IMPORT = ".venv/bin/easgate devices -c policies/connector.yaml import --replace mdm-export.csv"


def endpoint_commands() -> list[str]:
    return [c.text for c in commands_in(ROOT / DOC) if c.text.startswith("curl ")]


@pytest.fixture
def site(tmp_path):
    s = make_site(tmp_path)
    yield s
    s.stop_all()


def csv_block() -> str:
    text = (ROOT / DOC).read_text()
    return re.search(r"```csv\n(.*?)```", text, re.S)[1]


@covers(DOC, *START, *endpoint_commands(), *DEVICES, IMPORT)
def test_connector_doc_commands(site):
    conn = site.start(DOC, START[0])
    wait_for(conn, rf"easgate connector listening at http://127\.0\.0\.1:{site.ports[9080]}")
    assert "5 added" in site.run(DOC, START[1]).stdout

    simulate, authorize, version, log, health = (json.loads(site.run(DOC, c).stdout) for c in endpoint_commands())
    assert simulate["result"] == "Allow" and simulate["simulated"] and simulate["device"]["managed"]
    assert authorize == {"result": "Allow", "reason": authorize["reason"], "source": "inventory", "user": "alice",
                         "device_id": "ApplF17ABCDEF01"}
    assert version["product"] == "easgate-connector"
    assert [r["device_id"] for r in (log if isinstance(log, list) else log["decisions"])] == ["ApplF17ABCDEF01"]
    assert health["status"] == "ok" and health["devices"] == 5

    add, block, unblock, listing, remove = DEVICES
    site.run(DOC, add)
    site.run(DOC, block)
    out = site.run(DOC, listing).stdout
    assert "ApplNEW000000001" in out and "ApplF17ABCDEF01" in out and "bob" not in out
    site.run(DOC, unblock)
    site.run(DOC, remove)
    assert "ApplNEW000000001" not in site.run(DOC, listing).stdout

    (site.dir / "mdm-export.csv").write_text(csv_block())
    out = site.run(DOC, IMPORT).stdout
    assert "removed (--replace)" in out and "2 devices in" in out
    # the noncompliant Android from the export is denied at once, the retired iPad is gone
    url = (f"curl -s 'http://127.0.0.1:{site.ports[9080]}/services/ActiveSync/Simulate?"
           "user=bob@contoso.com&DeviceId=androidc1234567890'")
    bob = json.loads(subprocess.run(["bash", "-c", url], capture_output=True, text=True).stdout)
    assert bob["result"] == "Deny" and bob["device"]["compliant"] is False
