"""Deploying: the wheel in a clean venv (runtime dependencies only), the lock file, the systemd units
(`systemd-analyze verify`), and docs/deployment.md's commands run as written.

The wheelhouse is built once from the checkout with pip (the warm pip cache makes it quick), and
every install below is `--no-index` against it: the tests stay offline after that. Every install
runs with PIP_NO_COMPILE=1: pip does not byte-compile the ~75 packages it installs (Python compiles
a module when it is first imported), which was most of these tests' time.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from easgate import __version__

from conftest import ROOT
from doccommands import covers

VENV_BIN = Path(sys.executable).parent
UNITS = ROOT / "packaging" / "systemd"
TEST_ONLY = {"pytest", "pytest-asyncio", "hypothesis", "iniconfig", "pluggy"}


def run(argv, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("timeout", 300)
    p = subprocess.run(argv, capture_output=True, text=True, **kw)
    assert p.returncode == 0, f"{argv} exited {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def pins(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return out


def _name(requires: str) -> str:
    """'Requires-Dist: PyJWT[crypto]>=2.8' -> 'pyjwt'"""
    return re.split(r"[\[<>=!~; ]", requires.split(":", 1)[1].strip(), maxsplit=1)[0].lower()


@pytest.fixture(scope="session")
def source(tmp_path_factory) -> Path:
    """The checkout's files (committed or not, minus ignored ones): what `pip install .` sees."""
    d = tmp_path_factory.mktemp("src") / "easgate"
    files = run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT).stdout.split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (d / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, d / f)
    return d


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory, source) -> Path:
    """easgate's wheel, the pinned runtime dependencies and setuptools (to build from source)."""
    wh = tmp_path_factory.mktemp("wheelhouse")
    run([sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "-q", "-w", str(wh),
         "-c", str(source / "constraints.txt"), str(source), "setuptools>=68"], timeout=600)
    # what pipx installs into its shared venv (pip, setuptools, wheel), for the docs' pipx command
    run([sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "-q", "-w", str(wh),
         "pip", "setuptools", "wheel"], timeout=600)
    return wh


@pytest.fixture(scope="session")
def clean_venv(tmp_path_factory, wheelhouse, source) -> Path:
    v = tmp_path_factory.mktemp("clean") / "venv"
    run([sys.executable, "-m", "venv", str(v)])
    run([str(v / "bin" / "pip"), "install", "--disable-pip-version-check", "-q", "--no-index", "--find-links",
         str(wheelhouse), "-c", str(source / "constraints.txt"), "easgate"], env=dict(os.environ, PIP_NO_COMPILE="1"))
    return v


# ---------------------------------------------------------------------------------------------
# The lock file


def test_constraints_pin_exactly_what_the_tested_venv_has():
    """bootstrap installs .venv with constraints.txt: the two must agree, or scripts/lock.sh is due."""
    locked = pins((ROOT / "constraints.txt").read_text())
    frozen = pins(run([sys.executable, "-m", "pip", "freeze", "--disable-pip-version-check",
                       "--exclude-editable"]).stdout)
    frozen.pop("easgate", None)
    assert frozen == locked, "run scripts/lock.sh and commit constraints.txt"
    for dep in ("mitmproxy", "pyyaml", "cryptography", "pyopenssl", "pytest"):
        assert dep in locked
    assert '-c "$root/constraints.txt"' in (ROOT / "scripts" / "bootstrap.sh").read_text()


# ---------------------------------------------------------------------------------------------
# The wheel


def test_the_wheel_has_every_module(wheelhouse):
    wheel = next(wheelhouse.glob(f"easgate-{__version__}-py3-none-any.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    pkg = ROOT / "addons" / "easgate"
    wanted = {str(p.relative_to(pkg.parent)) for p in pkg.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert wanted and wanted <= names, sorted(wanted - names)
    meta = next(n for n in names if n.endswith("METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    requires = [l for l in text.splitlines() if l.startswith("Requires-Dist:")]
    runtime = [r for r in requires if "extra ==" not in r]
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(map(_name, runtime)) == sorted(_name("Requires-Dist: " + d) for d in declared)
    assert not {_name(r) for r in runtime} & TEST_ONLY
    assert any(l == f"Version: {__version__}" for l in text.splitlines())


def test_a_clean_venv_gets_runtime_dependencies_only_and_a_working_easgate(clean_venv, source, tmp_path):
    frozen = pins(run([str(clean_venv / "bin" / "pip"), "freeze", "--disable-pip-version-check"]).stdout)
    assert frozen.pop("easgate") == __version__
    assert not (set(frozen) & TEST_ONLY), set(frozen) & TEST_ONLY
    locked = pins((source / "constraints.txt").read_text())
    assert {k: locked.get(k) for k in frozen} == frozen  # every package at its locked version

    easgate = str(clean_venv / "bin" / "easgate")
    v = run([easgate, "--version"], cwd=tmp_path).stdout.strip()
    assert re.fullmatch(rf"easgate {re.escape(__version__)} \(mitmproxy 12\.\d+\.\d+, Python 3\.\d+\.\d+\)", v), v
    # the installed package, not the checkout, answers (run far from the checkout)
    where = run([str(clean_venv / "bin" / "python"), "-c", "import easgate; print(easgate.__file__)"],
                cwd=tmp_path).stdout.strip()
    assert where.startswith(str(clean_venv)), where
    # easgate pki and check work from the wheel alone
    shutil.copytree(ROOT / "policies", tmp_path / "policies")
    run([easgate, "pki", "certs"], cwd=tmp_path)
    p = run([easgate, "check", "policies/gateway.yaml"], cwd=tmp_path)
    assert p.stdout.splitlines()[0].endswith("policies/gateway.yaml: OK"), p.stdout
    bad = subprocess.run([easgate, "check", "policies/connector.yaml"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr, bad.stderr


# ---------------------------------------------------------------------------------------------
# systemd


def verify(units: list[Path]) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def units(tmp_path, clean_venv) -> dict[str, Path]:
    """The shipped units, pointed at the clean venv's easgate (verify checks ExecStart= exists)."""
    if not shutil.which("systemd-analyze"):
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing (scripts/ensure_test_tools.sh installs package systemd)")
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    out = {}
    for f in sorted(UNITS.glob("*.service")):
        text = f.read_text()
        assert "ExecStart=/opt/easgate/bin/easgate " in text
        (tmp_path / f.name).write_text(text.replace("/opt/easgate/bin/easgate", str(clean_venv / "bin" / "easgate")))
        out[f.stem] = tmp_path / f.name
    assert set(out) == {"easgate", "easgate-connector"}
    return out


def directives(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def test_the_systemd_units_verify_clean(units, tmp_path):
    p = verify(list(units.values()))
    assert p.returncode == 0 and p.stdout + p.stderr == "", p.stdout + p.stderr
    # and the check does catch a mistake: a misspelt directive is reported
    broken = tmp_path / "broken.service"
    broken.write_text(units["easgate"].read_text().replace("ProtectSystem=strict", "ProtectSystm=strict"))
    assert "Unknown key" in verify([broken]).stderr


def test_the_gateway_unit_runs_unprivileged_on_443_with_reload_and_a_graceful_stop(units):
    d = directives(units["easgate"])
    assert d["User"] == "easgate" and d["Group"] == "easgate"
    assert d["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE" == d["CapabilityBoundingSet"]
    assert d["NoNewPrivileges"] == "yes" and d["ProtectSystem"] == "strict" and d["PrivateTmp"] == "yes"
    assert int(d["LimitNOFILE"]) >= 65536
    assert d["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert d["KillMode"] == "mixed"  # only the supervisor gets SIGTERM; it drains the workers
    assert "--reload-grace" in d["ExecStart"]
    c = directives(units["easgate-connector"])
    assert c["User"] == "easgate" and c["CapabilityBoundingSet"] == "" and "AmbientCapabilities" not in c
    # systemd's own rating of the hardening (0 = locked down, 10 = fully exposed)
    for unit in units.values():
        p = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True,
                           text=True, timeout=60)
        m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", p.stdout + p.stderr)
        assert m and float(m[1]) <= 2.5, p.stdout[-500:] + p.stderr


# ---------------------------------------------------------------------------------------------
# docs/deployment.md, as written


DEPLOY = "docs/deployment.md"
DEPLOY_COMMANDS = (  # every command of docs/deployment.md, in order; the test runs them all
    "python3 -m venv /opt/easgate",
    "/opt/easgate/bin/pip install -c constraints.txt .",
    "/opt/easgate/bin/easgate --version",
    "python3 -m pip wheel -c constraints.txt -w dist .",
    "/opt/easgate/bin/pip install --no-index --find-links dist -c constraints.txt easgate",
    "pipx install --python python3.13 --pip-args='-c constraints.txt' .",
    "useradd --system --home-dir /var/lib/easgate --shell /usr/sbin/nologin easgate",
    "install -d -m 0750 -o root -g easgate /etc/easgate /etc/easgate/tls",
    "install -d -m 0750 -o easgate -g easgate /var/lib/easgate /var/log/easgate",
    "/opt/easgate/bin/easgate check /etc/easgate/gateway.yaml",
    "install -m 0644 packaging/systemd/easgate.service packaging/systemd/easgate-connector.service "
    "/etc/systemd/system/",
    "systemd-analyze verify /etc/systemd/system/easgate.service /etc/systemd/system/easgate-connector.service",
    "install -D -m 0644 packaging/logrotate/easgate /etc/logrotate.d/easgate",
    "logrotate --debug /etc/logrotate.d/easgate",
    "/opt/easgate/bin/pip install -c constraints.txt --upgrade .",
    "/opt/easgate/bin/easgate check /etc/easgate/gateway.yaml",
)


def doc_blocks(path: Path) -> list[tuple[str, str]]:
    return [(m[1], m[2]) for m in re.finditer(r"^```(\w*)\n(.*?)^```", path.read_text(), re.S | re.M)]


def can_overlay() -> str | None:
    if os.geteuid() != 0:
        return "needs root (useradd, /etc and /opt in a private mount namespace)"
    if not shutil.which("unshare"):
        return "needs unshare (util-linux)"
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        "mount -t tmpfs tmpfs /opt"], capture_output=True, timeout=30)
    return None if p.returncode == 0 else f"cannot make a private mount namespace: {p.stderr!r}"


@covers(DEPLOY, *DEPLOY_COMMANDS)
def test_deployment_md_runs_as_written(tmp_path, source, wheelhouse, pki):
    why = can_overlay()
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    for tool in ("systemd-analyze", "logrotate", "pipx", "python3.13"):
        if not shutil.which(tool):
            (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{tool} missing (scripts/ensure_test_tools.sh)")
    blocks = doc_blocks(ROOT / "docs" / "deployment.md")
    yamls = [b for lang, b in blocks if lang == "yaml"]
    gateway_yaml = next(b for b in yamls if "routes:" in b)
    connector_yaml = next(b for b in yamls if "inventory:" in b)
    commands = [line for lang, b in blocks if lang == "sh" for line in b.splitlines() if line.strip()]
    assert commands and all(lang in ("sh", "yaml") for lang, _ in blocks), [lang for lang, _ in blocks]
    assert tuple(commands) == DEPLOY_COMMANDS  # what @covers says is what runs

    # The script: the doc's commands in order, each announced on stderr; the YAML files where the
    # doc says they go, and stand-in certificate files (a demo PKI) where the config names them,
    # just before the first `easgate check`.
    up = tmp_path / "ns"
    lines = ["set -euo pipefail"]
    for d in ("etc", "var"):
        (up / d / "upper").mkdir(parents=True)
        (up / d / "work").mkdir(parents=True)
        lines.append(f"mount -t overlay overlay -o lowerdir=/{d},upperdir={up / d / 'upper'},"
                     f"workdir={up / d / 'work'} /{d}")
    lines += ["mount -t tmpfs tmpfs /opt", f"cd {source}"]
    staged = False
    for cmd in commands:
        if "easgate check /etc/easgate/gateway.yaml" in cmd and not staged:
            staged = True
            lines += [f"cat > /etc/easgate/gateway.yaml <<'EOF'\n{gateway_yaml}EOF",
                      f"cat > /etc/easgate/connector.yaml <<'EOF'\n{connector_yaml}EOF"]
            for src, dst in (("gateway-full.pem", "gateway-full.pem"), ("device-ca.pem", "device-ca.pem"),
                             ("root-ca.pem", "device-root-ca.pem"), ("internal-ca.pem", "exchange-ca.pem")):
                lines.append(f"install -m 0640 -g easgate {pki / src} /etc/easgate/tls/{dst}")
        marker = shlex.quote(f"### {cmd}")
        lines += [f"echo {marker} >&2", f"echo {marker}", cmd]
    assert staged, "the doc no longer checks /etc/easgate/gateway.yaml"
    script = tmp_path / "deploy.sh"
    script.write_text("\n".join(lines) + "\n")
    pipx_bin = tmp_path / "pipx-bin"
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheelhouse), PIP_DISABLE_PIP_VERSION_CHECK="1",
               PIP_NO_COMPILE="1",
               PIPX_HOME=str(tmp_path / "pipx"), PIPX_BIN_DIR=str(pipx_bin),  # not the real ~/.local
               PATH=os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin")
    env.pop("VIRTUAL_ENV", None)
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", str(script)], env=env,
                       capture_output=True, text=True, timeout=600)
    out = dict(zip(*[iter(re.split(r"^### (.*)$", p.stdout, flags=re.M)[1:])] * 2))
    err = dict(zip(*[iter(re.split(r"^### (.*)$", p.stderr, flags=re.M)[1:])] * 2))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert set(out) == set(commands)  # every command ran

    assert re.search(rf"^easgate {re.escape(__version__)} \(mitmproxy", out["/opt/easgate/bin/easgate --version"],
                     re.M)
    check = out["/opt/easgate/bin/easgate check /etc/easgate/gateway.yaml"]
    assert "/etc/easgate/gateway.yaml: OK" in check and "activesync" in check, check
    verify_cmd = next(c for c in commands if c.startswith("systemd-analyze verify"))
    assert err[verify_cmd].strip() == "", err[verify_cmd]
    rotate_cmd = next(c for c in commands if c.startswith("logrotate"))
    assert "error" not in err[rotate_cmd].lower(), err[rotate_cmd]
    assert "/var/log/easgate/audit.jsonl" in err[rotate_cmd]
    pipx_version = run([str(pipx_bin / "easgate"), "--version"]).stdout
    assert pipx_version.startswith(f"easgate {__version__} (mitmproxy") and "Python 3.13" in pipx_version
    # the wheels to carry to a machine without PyPI: easgate and every pinned runtime dependency
    carried = {re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower() for w in (source / "dist").glob("*.whl")}
    assert {"easgate", "mitmproxy", "pyyaml", "cryptography", "pyopenssl"} <= carried, carried
    assert not carried & TEST_ONLY
    # nothing leaked out of the namespace
    assert not Path("/opt/easgate").exists() and not Path("/etc/easgate").exists()


# ---------------------------------------------------------------------------------------------
# docs/operations.md: metrics with the default workers, and a reload, as written


OPS_RUN = ".venv/bin/easgate run policies/gateway.yaml -- --set easgate_metrics=127.0.0.1:9090"
OPS_SCRAPE = "curl -s http://127.0.0.1:9090/metrics"
OPS_RELOAD = "pkill -HUP -o -f 'easgate run policies/gateway.yaml'"


@covers("docs/operations.md", OPS_RUN, OPS_SCRAPE, OPS_RELOAD)
def test_operations_md_metrics_and_reload_run_as_written(tmp_path):
    """In a network and PID namespace of its own, the fixed ports (8443, 9090) and pkill's name
    match touch nothing else on the machine. Default workers: one per core (at least two here)."""
    ops = (ROOT / "docs" / "operations.md").read_text()
    for cmd in (OPS_RUN, OPS_SCRAPE, OPS_RELOAD):
        assert f"\n{cmd}\n" in ops, cmd
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        (pytest.fail if os.environ.get("CI") else pytest.skip)("needs root, unshare and ip (namespaces)")
    poc = tmp_path / "poc"
    shutil.copytree(ROOT / "policies", poc / "policies")
    (poc / ".venv").symlink_to(Path(sys.executable).parent.parent)
    run([str(poc / ".venv" / "bin" / "easgate"), "pki", "certs"], cwd=poc)
    script = f"""set -euo pipefail
ip link set lo up
cd {poc}
until_seen() {{  # wait (up to 60 s) for a line in the log
    for _ in $(seq 600); do grep -q "$1" run.log && return 0; sleep 0.1; done
    echo "timed out waiting for: $1" >&2; cat run.log >&2; return 1
}}
{OPS_RUN} > run.log 2>&1 &
until_seen 'workers serving'
for i in $(seq 12); do
    curl -s -o /dev/null --cacert certs/public-ca.pem --resolve mail.example.test:8443:127.0.0.1 \\
        https://mail.example.test:8443/enroll
done
{OPS_SCRAPE} > before.txt
{OPS_RELOAD}
until_seen 'old worker 2 .* handed over'
{OPS_SCRAPE} > after.txt
kill -TERM %1
wait %1
"""
    (tmp_path / "ops.sh").write_text(script)  # a file: `bash -c SCRIPT` would match pkill's pattern itself
    p = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "bash", str(tmp_path / "ops.sh")],
                       capture_output=True, text=True, timeout=180)
    log = (poc / "run.log").read_text() if (poc / "run.log").exists() else ""
    assert p.returncode == 0, p.stdout + p.stderr + log
    from easgate.runtime.aggregate import Document

    before = Document.parse((poc / "before.txt").read_text()).samples
    after = Document.parse((poc / "after.txt").read_text()).samples
    workers = int(re.search(r"starting (\d+) workers", log)[1])
    assert workers >= 2 and before[("easgate_workers", "")] == workers == after[("easgate_workers", "")]
    # the 12 requests (the MDM is not running: 502s) are all counted, before and after the reload
    assert before[("easgate_requests_total", '{route="mdm"}')] == 12 == after[("easgate_requests_total",
                                                                              '{route="mdm"}')]
    assert "reload complete" in log and "restarting in" not in log, log
