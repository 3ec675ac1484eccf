"""Client-certificate revocation (OCSP and CRL, optional or mandatory), end to end and in pieces.

End to end: a real `openssl ocsp -index` responder on loopback serving a demo PKI whose device
certificates name it in their AIA, a small Python OCSP responder for the answers openssl won't
give (stale, forged, garbage, slow, delegated signer), a real CRL file, and three real gateway
processes spoken to with curl:

    G_opt  client certs optional, on_invalid untrusted, revocation optional
    G_man  client certs optional, on_invalid untrusted, revocation mandatory
    G_req  client certs required; OCSP CA mandatory, CRL CA optional

Two demo PKIs with the same CA names (as after a CA re-key) tell the CAs apart by key: the OCSP one
(`rpki`, device certificates with AIA) and the CRL one (`cpki`, no AIA, a CRL file).
"""

from __future__ import annotations

import base64
import datetime
import json
import shutil
import subprocess
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import (
    AuthorityInformationAccessOID,
    ExtendedKeyUsageOID,
    NameOID,
)

from easgate.core.errors import ConfigError
from easgate.gateway import revocation
from easgate.gateway.config import Revocation, TrustedCa, load_config
from easgate.gateway.tls import INVALID, VERIFIED, ClientCertVerifier, TlsOffload
from easgate.tools.pki import DEVICE_URI_PREFIX, generate_pki, load_cert, revoke
from easgate.tools.ports import free_port

from conftest import ROOT, GatewayProcess, base_config, curl, easgate_argv, mitmdump_argv, write_config

NOW = lambda: datetime.datetime.now(datetime.UTC)


# ------------------------------------------------------------------------------------------------
# PKI helpers


def load_key(path: Path):
    return serialization.load_pem_private_key(path.read_bytes(), None)


def issue(ca_dir: Path, name: str, *, ocsp_url: str | None = None, out: Path | None = None,
          eku=ExtendedKeyUsageOID.CLIENT_AUTH) -> x509.Certificate:
    """A certificate of `ca_dir`'s device CA, written as out/name.pem (+ CA) and out/name.key."""
    out = out or ca_dir
    ca, ca_key = load_cert(ca_dir / "device-ca.pem"), load_key(ca_dir / "device-ca.key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = NOW()
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "easgate demo"),
                                  x509.NameAttribute(NameOID.COMMON_NAME, name)]))
         .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
         .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(DEVICE_URI_PREFIX + name)]),
                        critical=False)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()), critical=False))
    if ocsp_url:
        b = b.add_extension(x509.AuthorityInformationAccess([x509.AccessDescription(
            AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ocsp_url))]), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
    pem = serialization.Encoding.PEM
    (out / f"{name}.pem").write_bytes(cert.public_bytes(pem) + ca.public_bytes(pem))
    (out / f"{name}.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    return cert


def make_crl(ca_dir: Path, serials: list[int], last: datetime.datetime, nxt: datetime.datetime) -> bytes:
    ca, key = load_cert(ca_dir / "device-ca.pem"), load_key(ca_dir / "device-ca.key")
    b = x509.CertificateRevocationListBuilder().issuer_name(ca.subject).last_update(last).next_update(nxt)
    for s in serials:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(s).revocation_date(last).build())
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def der_b64(path: Path) -> str:
    return base64.b64encode(load_cert(path).public_bytes(serialization.Encoding.DER)).decode()


# ------------------------------------------------------------------------------------------------
# Responders


class OpensslResponder:
    """`openssl ocsp -index` serving the device CA's index.txt (it reads the index when it starts)."""

    def __init__(self, pki: Path, port: int) -> None:
        self.pki, self.port, self.proc = pki, port, None

    def start(self) -> OpensslResponder:
        # Ready when it says so: a bare connect-and-close probe sends OpenSSL 3.0's responder into a
        # busy loop that never answers again.
        p = self.pki
        self.proc = subprocess.Popen(
            ["openssl", "ocsp", "-index", str(p / "index.txt"), "-port", str(self.port), "-CA", str(p / "device-ca.pem"),
             "-rsigner", str(p / "device-ca.pem"), "-rkey", str(p / "device-ca.key"), "-nmin", "5"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        ready = threading.Event()
        lines: list[str] = []

        def pump(proc=self.proc) -> None:
            for line in proc.stderr:  # keep draining: a full pipe would stall the responder
                lines.append(line)
                if "waiting for OCSP client connections" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(10) or self.proc.poll() is not None:
            raise AssertionError("openssl ocsp did not start: " + "".join(lines))
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)


class PyResponder(ThreadingHTTPServer):
    """OCSP answers by path: stale, forged (signature altered), rogue-signer (another CA), garbage,
    slow, delegated (good, signed by a responder certificate the CA issued with the OCSPSigning
    EKU), nodelegate-eku (the same without the EKU)."""

    daemon_threads = True

    def __init__(self, ca_dir: Path, rogue: tuple, delegate: tuple, bad_delegate: tuple) -> None:
        super().__init__(("127.0.0.1", 0), _PyHandler)
        self.ca, self.ca_key = load_cert(ca_dir / "device-ca.pem"), load_key(ca_dir / "device-ca.key")
        self.rogue, self.delegate, self.bad_delegate = rogue, delegate, bad_delegate
        self.hits: Counter = Counter()
        self.lock = threading.Lock()
        self.delay_s = 0.6
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{path}"

    def answer(self, path: str, body: bytes) -> bytes:
        req = ocsp.load_der_ocsp_request(body)
        now = NOW().replace(microsecond=0)
        this, nxt = now - datetime.timedelta(minutes=1), now + datetime.timedelta(minutes=5)
        signer_cert, key, certs = self.ca, self.ca_key, []
        if path == "stale":
            this, nxt = now - datetime.timedelta(days=2), now - datetime.timedelta(hours=1)
        elif path == "rogue-signer":
            signer_cert, key = self.rogue  # another CA answers for this one
            certs = [signer_cert]
        elif path == "delegated":
            signer_cert, key = self.delegate
            certs = [signer_cert]
        elif path == "nodelegate-eku":
            signer_cert, key = self.bad_delegate
            certs = [signer_cert]
        b = (ocsp.OCSPResponseBuilder()
             .add_response_by_hash(req.issuer_name_hash, req.issuer_key_hash, req.serial_number, req.hash_algorithm,
                                   ocsp.OCSPCertStatus.GOOD, this, nxt, None, None)
             .responder_id(ocsp.OCSPResponderEncoding.HASH, signer_cert))
        if certs:
            b = b.certificates(certs)
        der = b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
        if path == "forged":  # the CA's answer, its signature altered (the DER ends with it)
            der = der[:-1] + bytes([der[-1] ^ 0x01])
        return der


class _PyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server: PyResponder

    def log_message(self, *a) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = self.path.strip("/")
        with self.server.lock:
            self.server.hits[path] += 1
        if path == "slow":
            time.sleep(5)  # accepts, reads, never answers in time
            return
        if path == "garbage":
            data, ctype = b"<html>OCSP? what OCSP?</html>", "text/html"
        else:
            if path == "delegated":
                time.sleep(self.server.delay_s)  # long enough for concurrent handshakes to overlap
            data, ctype = self.server.answer(path, body), "application/ocsp-response"
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def responder_cert(ca_dir: Path, eku: bool):
    ca, ca_key = load_cert(ca_dir / "device-ca.pem"), load_key(ca_dir / "device-ca.key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = NOW()
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"OCSP responder eku={eku}")]))
         .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30)))
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
    return b.sign(ca_key, hashes.SHA256()), key


# ------------------------------------------------------------------------------------------------
# The world: PKIs, responders, certificates, CRL, gateways (module scope: started once)

OCSP_CASES = ["down", "slow", "stale", "garbage", "forged", "rogue-signer", "unknown", "delegated", "nodelegate-eku"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, pki, exchange, mdm):
    tmp = tmp_path_factory.mktemp("revocation")
    port = free_port()
    rpki = tmp / "rpki"
    generate_pki(rpki, ocsp_url=f"http://127.0.0.1:{port}/")
    cpki = tmp / "cpki"
    generate_pki(cpki)

    # `easgate pki DIR --revoke NAME`, then (re)start the responder so it reads the index again
    responder = OpensslResponder(rpki, port).start()
    out = subprocess.run(easgate_argv("pki", str(rpki), "--revoke", "device-ipad"), cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    responder.stop()
    responder.start()

    rogue = (load_cert(rpki / "rogue-ca.pem"), load_key(rpki / "rogue-ca.key"))
    py = PyResponder(rpki, rogue, responder_cert(rpki, eku=True), responder_cert(rpki, eku=False))
    down = f"http://127.0.0.1:{free_port()}/"
    urls = {"down": down, "unknown": f"http://127.0.0.1:{port}/"}
    for case in OCSP_CASES:
        issue(rpki, f"ocsp-{case}", ocsp_url=urls.get(case) or py.url(case))
    # the CRL PKI's devices, copied next to rpki's so that one curl --cacert serves all
    for src, dst in (("device-iphone", "crl-good"), ("device-ipad", "crl-revoked")):
        for ext in ("pem", "key"):
            shutil.copy(cpki / f"{src}.{ext}", rpki / f"{dst}.{ext}")
    revoke(cpki, "device-ipad")
    crl = tmp / "gw-device-ca.crl"
    shutil.copy(cpki / "device-ca.crl", crl)

    def cfg(cert_mode: str, on_invalid: str, ocsp_mode: str, crl_mode: str) -> dict:
        c = base_config(rpki, exchange, mdm)
        c["pools"]["exchange"]["ca"] = str(pki / "internal-ca.pem")
        c["tls"]["client_certs"] = {"mode": cert_mode, "on_invalid": on_invalid, "ca": [
            {"file": str(rpki / "device-ca.pem"), "revocation": ocsp_mode, "ocsp_timeout_ms": 1000},
            str(rpki / "root-ca.pem"),
            {"file": str(cpki / "device-ca.pem"), "revocation": crl_mode, "crl": str(crl), "ocsp": False},
            str(cpki / "root-ca.pem"),
        ]}
        return c

    gws = {}
    for name, c in (("optional", cfg("optional", "untrusted", "optional", "optional")),
                    ("mandatory", cfg("optional", "untrusted", "mandatory", "mandatory")),
                    ("required", cfg("required", "reject", "mandatory", "optional"))):
        path = write_config(tmp, c, f"{name}.yaml")
        flows = tmp / f"{name}.flows"
        # one process (`easgate run` may start several workers, each with its own OCSP cache)
        gws[name] = GatewayProcess(mitmdump_argv(path, extra=["-w", str(flows)]))
        gws[name].flows = flows
    for g in gws.values():
        g.wait_ready()
    w = type("World", (), {})()
    w.rpki, w.cpki, w.crl, w.py, w.responder, w.gws, w.mdm = rpki, cpki, crl, py, responder, gws, mdm
    yield w
    for g in gws.values():
        g.stop()
    responder.stop()
    py.shutdown()
    py.server_close()


def get(w, mode: str, cert: str | None, path: str = "/enroll"):
    """(curl exit code, NSClientCert seen by the MDM or None, elapsed s) for one request with curl."""
    g = w.gws[mode]
    t = time.monotonic()
    out = curl(g.port, f"{path}/{mode}/{cert}", w.rpki, cert=cert, timeout=10)
    elapsed = time.monotonic() - t
    if out.returncode != 0:
        return out.returncode, None, elapsed
    body, code = out.stdout.rsplit("\n", 1)
    assert code == "200", out.stdout
    return 0, json.loads(body)["NSClientCert"], elapsed


def verified(w, mode: str, cert: str) -> bool:
    rc, header, _ = get(w, mode, cert)
    assert rc == 0, f"{mode}/{cert}: curl failed with {rc}"
    if header is None:
        return False
    assert header == der_b64(w.rpki / f"{cert}.pem")
    return True


def refused(w, cert: str) -> bool:
    rc, header, _ = get(w, "required", cert)
    return rc != 0


# ------------------------------------------------------------------------------------------------
# End to end


def test_ocsp_good_and_revoked(world):
    w = world
    for mode in ("optional", "mandatory"):
        assert verified(w, mode, "device-iphone"), mode
        assert not verified(w, mode, "device-ipad"), mode  # revoked with `easgate pki --revoke`
        w.gws[mode].wait_output("certificate revoked (OCSP)")
    assert not refused(w, "device-iphone")
    assert refused(w, "device-ipad")
    w.gws["required"].wait_output("a verified client certificate is required (certificate revoked (OCSP)")


@pytest.mark.parametrize("case", ["unknown", "down", "stale", "garbage", "forged", "rogue-signer", "nodelegate-eku"])
def test_ocsp_no_answer_proceeds_when_optional_and_fails_when_mandatory(world, case):
    w = world
    cert = f"ocsp-{case}"
    assert verified(w, "optional", cert)
    assert not verified(w, "mandatory", cert)
    why = {"unknown": "does not know the certificate", "down": "cannot connect", "stale": "stale response",
           "garbage": "garbage instead of an OCSP response", "forged": "bad signature",
           "rogue-signer": "was not issued by the CA", "nodelegate-eku": "lacks the OCSPSigning EKU"}[case]
    w.gws["optional"].wait_line(lambda ln: f"CN={cert}" in ln and "revocation unknown (optional)" in ln and why in ln)
    w.gws["mandatory"].wait_line(lambda ln: f"CN={cert}" in ln and "revocation status unavailable" in ln and why in ln)


def test_slow_responder_times_out_without_blocking_other_handshakes(world):
    w = world
    g = w.gws["optional"]
    slow = subprocess.Popen(
        ["curl", "-sS", "--max-time", "10", "--cacert", str(w.rpki / "public-ca.pem"),
         "--resolve", f"mail.example.test:{g.port}:127.0.0.1", "--cert", str(w.rpki / "ocsp-slow.pem"),
         "--key", str(w.rpki / "ocsp-slow.key"), f"https://mail.example.test:{g.port}/enroll/slow"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    time.sleep(0.2)
    # meanwhile, other handshakes and requests go through at once
    for cert in ("device-iphone", None):
        rc, _, elapsed = get(w, "optional", cert)
        assert rc == 0 and elapsed < 0.8, elapsed
    assert slow.poll() is None, "the slow lookup should still be waiting"
    body, _ = slow.communicate(timeout=10)
    took = time.monotonic() - t0
    assert 0.9 < took < 3, took  # ocsp_timeout_ms: 1000
    assert json.loads(body)["NSClientCert"] == der_b64(w.rpki / "ocsp-slow.pem")  # optional: proceeds
    g.wait_line(lambda ln: "did not answer within 1000 ms" in ln)  # the log line may follow the response
    # mandatory: not verified after the timeout
    rc, header, elapsed = get(w, "mandatory", "ocsp-slow")
    assert rc == 0 and header is None and elapsed >= 0.9


def test_delegated_responder_cached_and_single_flight(world):
    w = world
    results = []
    threads = [threading.Thread(target=lambda: results.append(verified(w, "optional", "ocsp-delegated")))
               for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert results == [True] * 5
    assert verified(w, "optional", "ocsp-delegated")  # from the cache
    assert w.py.hits["delegated"] == 1, w.py.hits
    assert verified(w, "mandatory", "ocsp-delegated")
    assert w.py.hits["delegated"] == 2  # another process, its own cache


def test_crl_revoked_good_then_expired(world):
    w = world
    for mode in ("optional", "mandatory"):
        assert verified(w, mode, "crl-good")
        assert not verified(w, mode, "crl-revoked")
        w.gws[mode].wait_output("certificate revoked (CRL)")
    assert not refused(w, "crl-good") and refused(w, "crl-revoked")

    # The CRL file is replaced by an expired one (same CA): picked up without a restart.
    cpki_ipad = load_cert(w.cpki / "device-ipad.pem").serial_number
    now = NOW()
    w.crl.write_bytes(make_crl(w.cpki, [cpki_ipad], now - datetime.timedelta(days=8), now - datetime.timedelta(days=1)))
    time.sleep(1.1)  # CRL files are stat()ed at most once a second
    assert verified(w, "optional", "crl-good")
    assert not verified(w, "mandatory", "crl-good")
    assert not refused(w, "crl-good")  # G_req's CRL CA is optional
    for mode in ("optional", "mandatory"):
        w.gws[mode].wait_output("reloaded CRL")
        w.gws[mode].wait_output("expired")
        assert not verified(w, mode, "crl-revoked")  # a revocation is final, even in an expired CRL
    assert refused(w, "crl-revoked")


def test_no_certificate_needs_no_revocation_check(world):
    w = world
    for mode in ("optional", "mandatory"):
        rc, header, _ = get(w, mode, None)
        assert rc == 0 and header is None
    assert refused(w, None)  # required mode: no certificate, no handshake


def test_reason_on_flows_and_counters_in_log(world):
    """Last: stops the gateways; their flow files carry each verdict's reason."""
    from mitmproxy import io

    w = world
    for g in w.gws.values():
        g.stop()
    reasons: dict[str, list[dict]] = {}
    for mode in ("optional", "mandatory"):
        with open(w.gws[mode].flows, "rb") as f:
            for flow in io.FlowReader(f).stream():
                reasons.setdefault(flow.request.path, []).append(flow.metadata["easgate.client_cert"])
    assert reasons["/enroll/optional/device-iphone"][0] == {
        "status": "verified", "reason": "verified; not revoked (OCSP)", "subject": "CN=ApplF17ABCDEF01,O=easgate demo"}
    r = reasons["/enroll/optional/device-ipad"][0]
    assert r["status"] == "invalid" and r["reason"].startswith("certificate revoked (OCSP) on ")
    r = reasons["/enroll/optional/ocsp-down"][0]
    assert r["status"] == "verified" and r["reason"].startswith("verified; revocation unknown: OCSP responder http")
    r = reasons["/enroll/mandatory/ocsp-down"][0]
    assert r["status"] == "invalid" and r["reason"].startswith("revocation status unavailable: OCSP responder")
    assert reasons["/enroll/mandatory/crl-revoked"][0]["reason"].startswith("certificate revoked (CRL)")
    good, expired = reasons["/enroll/optional/crl-good"]
    assert good["reason"] == "verified; not revoked (CRL)"
    assert expired["reason"].startswith("verified; revocation unknown: CRL gw-device-ca.crl expired ")
    good, expired = reasons["/enroll/mandatory/crl-good"]
    assert expired["status"] == "invalid"
    assert expired["reason"].startswith("revocation status unavailable: CRL gw-device-ca.crl expired ")
    out = w.gws["optional"].output
    assert "easgate: revocation checks: checks=" in out
    stats = dict(kv.split("=") for kv in out.split("easgate: revocation checks: ")[1].splitlines()[0].split(", "))
    assert int(stats["checks"]) == int(stats["good"]) + int(stats["revoked"]) + int(stats["unknown"])
    assert int(stats["revoked"]) >= 3 and int(stats["errors"]) >= 6 and int(stats["cache_hits"]) >= 1
    assert int(stats["coalesced"]) >= 1


# ------------------------------------------------------------------------------------------------
# In pieces: config, verifier, offline verdicts, pki.revoke


def _gw_yaml(tmp_path: Path, pki: Path, ca) -> Path:
    cfg = {"tls": {"certificate": str(pki / "gateway-full.pem"), "client_certs": {"mode": "optional", "ca": ca}},
           "pools": {"mdm": {"servers": ["http://127.0.0.1:9"]}},
           "routes": [{"name": "mdm", "priority": 1, "match": "any", "pool": "mdm"}]}
    p = tmp_path / "gw.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_config_forms(tmp_path, pki):
    cfg = load_config(_gw_yaml(tmp_path, pki, [str(pki / "device-ca.pem"), str(pki / "root-ca.pem")]))
    cc = cfg.tls.client_certs
    assert cc.ca == (pki / "device-ca.pem", pki / "root-ca.pem")
    assert [t.revocation.mode for t in cc.trusted_cas()] == ["off", "off"]
    p = tmp_path / "bare.yaml"
    p.write_text(f"""
tls:
  certificate: {pki / 'gateway-full.pem'}
  client_certs:
    mode: optional
    ca:
      - {{file: {pki / 'device-ca.pem'}, revocation: mandatory, ocsp_url: "http://127.0.0.1:8888/", crl: {pki / 'device-ca.crl'}, ocsp_timeout_ms: 300}}
      - {{file: {pki / 'root-ca.pem'}, revocation: off}}
pools: {{mdm: {{servers: ["http://127.0.0.1:9"]}}}}
routes: [{{name: mdm, priority: 1, match: any, pool: mdm}}]
""")
    cc = load_config(p).tls.client_certs
    dev, root = cc.trusted_cas()
    assert dev.revocation == Revocation(mode="mandatory", ocsp_url="http://127.0.0.1:8888/", ocsp_timeout_ms=300,
                                        crl=pki / "device-ca.crl")
    assert dev.key == "tls.client_certs.ca[0]" and root.revocation.mode == "off"  # a bare YAML `off` is off
    assert cc.ca == (pki / "device-ca.pem", pki / "root-ca.pem")


@pytest.mark.parametrize("entry, key, words", [
    ({"file": "device-ca.pem", "revocation": "sometimes"}, "ca[0].revocation", "not one of off, optional, mandatory"),
    ({"file": "device-ca.pem", "revocation": True}, "ca[0].revocation", "not a mode"),
    ({"file": "device-ca.pem", "ocsp_url": "https://ocsp.example/"}, "ca[0].ocsp_url", "not an http:// URL"),
    ({"file": "device-ca.pem", "crl": "nope.crl"}, "ca[0].crl", "file not found"),
    ({"file": "device-ca.pem", "revocation": "optional", "ocsp": False}, "ca[0]", "there is no crl"),
    ({"file": "device-ca.pem", "ocsp_timeout_ms": 0}, "ca[0].ocsp_timeout_ms", "out of range"),
    ({"file": "device-ca.pem", "ocps_url": "http://x/"}, "ca[0].ocps_url", "did you mean 'ocsp_url'"),
    ({"revocation": "optional"}, "ca[0].file", "missing"),
    (42, "ca[0]", "must be a CA file path or a mapping"),
])
def test_config_errors_name_key_and_fix(tmp_path, pki, entry, key, words):
    if isinstance(entry, dict):
        entry = {k: (str(pki / v) if k in ("file", "crl") else v) for k, v in entry.items()}
    with pytest.raises(ConfigError) as e:
        load_config(_gw_yaml(tmp_path, pki, [entry]))
    assert e.value.key == f"tls.client_certs.{key}" and words in str(e.value), str(e.value)
    assert "gw.yaml" in str(e.value)


def test_verifier_errors(tmp_path, pki):
    other = tmp_path / "other"
    generate_pki(other)
    # a CRL signed by another CA (same name, other key) is a startup error naming the key
    with pytest.raises(ConfigError, match=r"tls.client_certs.ca\[0\].crl: .* is not signed by"):
        ClientCertVerifier([TrustedCa(pki / "device-ca.pem", Revocation("optional", crl=other / "device-ca.crl"),
                                      "tls.client_certs.ca[0]")])
    (tmp_path / "bad.crl").write_text("not a crl")
    with pytest.raises(ConfigError, match=r"ca\[0\].crl: .* is not a CRL"):
        ClientCertVerifier([TrustedCa(pki / "device-ca.pem", Revocation("optional", crl=tmp_path / "bad.crl"),
                                      "tls.client_certs.ca[0]")])
    # one CA certificate listed twice with different settings
    with pytest.raises(ConfigError, match="also listed at"):
        ClientCertVerifier([TrustedCa(pki / "device-cas.pem", Revocation("optional"), "tls.client_certs.ca[0]"),
                            TrustedCa(pki / "device-ca.pem", Revocation("mandatory"), "tls.client_certs.ca[1]")])
    # plain paths still work, with revocation off
    v = ClientCertVerifier((pki / "device-ca.pem", pki / "root-ca.pem"))
    assert v.revocation is None and len(v.anchors) == 2


class _Client:
    """What TlsOffload reads of a mitmproxy Client (as in a flow loaded from a file)."""

    def __init__(self, *certs: x509.Certificate) -> None:
        from mitmproxy import certs as mcerts

        self.certificate_list = [mcerts.Cert(c) for c in certs]
        self.id = f"offline-{id(self)}"
        self.timestamp_end = None  # open
        self.peername = ("127.0.0.1", 5555)
        self.tls_established = True


def _offload(tmp_path, pki, mode: str, on_invalid: str = "untrusted") -> TlsOffload:
    t = TlsOffload()
    t.apply(load_config(_offload_cfg(tmp_path, pki, mode, on_invalid)))
    return t


def _offload_cfg(tmp_path, pki, mode: str, on_invalid: str = "untrusted") -> Path:
    p = tmp_path / f"{mode}-{on_invalid}.yaml"
    p.write_text(yaml.safe_dump({
        "tls": {"certificate": str(pki / "gateway-full.pem"), "client_certs": {
            "mode": "optional", "on_invalid": on_invalid,
            "ca": [{"file": str(pki / "device-ca.pem"), "revocation": mode, "crl": str(pki / "device-ca.crl")},
                   str(pki / "root-ca.pem")]}},
        "pools": {"mdm": {"servers": ["http://127.0.0.1:9"]}},
        "routes": [{"name": "mdm", "priority": 1, "match": "any", "pool": "mdm"}]}))
    return p


def test_offline_verdicts_say_not_checked(tmp_path, pki):
    chain = [load_cert(pki / "device-iphone.pem"), load_cert(pki / "device-ca.pem")]
    v = _offload(tmp_path, pki, "optional").verdict(_Client(*chain))
    assert (v.status, v.reason) == (VERIFIED, "verified; revocation not checked (offline)")
    t = _offload(tmp_path, pki, "mandatory", on_invalid="reject")
    c = _Client(*chain)
    v = t.verdict(c)
    assert (v.status, v.reason) == (INVALID, "revocation not checked (offline)")
    assert t.refuse_reason(c) == "client certificate not verified (revocation not checked (offline))"
    v = _offload(tmp_path, pki, "off").verdict(_Client(*chain))
    assert (v.status, v.reason) == (VERIFIED, "verified")


async def test_hook_checks_and_a_reload_keeps_the_answer(tmp_path, pki):
    chain = [load_cert(pki / "device-iphone.pem"), load_cert(pki / "device-ca.pem")]
    t = _offload(tmp_path, pki, "optional")
    c = _Client(*chain)
    lookup = t.tls_established_client(type("TlsData", (), {"conn": c})())
    assert lookup is not None and c.id not in t.live and c not in t.verdicts  # the revocation lookup is left to await
    await lookup
    assert t.verdict(c).reason == "verified; not revoked (CRL)"  # the demo CRL is empty, no AIA
    assert t.revocation_stats["checks"] == 1 and t.revocation_stats["good"] == 1
    # a reload to mandatory: the connection keeps its answer, no new lookup
    t.apply(load_config(_offload_cfg(tmp_path, pki, "mandatory")))
    assert t.verdict(c).reason == "verified; not revoked (CRL)" and t.revocation_stats["checks"] == 1
    # a connection that had no answer (revocation was off) is not verified under mandatory
    t = _offload(tmp_path, pki, "off")
    c = _Client(*chain)
    assert t.tls_established_client(type("TlsData", (), {"conn": c})()) is None  # nothing to await: decided
    assert t.live[c.id][1].reason == "verified"  # an open connection's verdict, by its id
    t.apply(load_config(_offload_cfg(tmp_path, pki, "mandatory")))
    v = t.verdict(c)
    assert (v.status, v.reason) == (INVALID, "revocation not checked (the connection predates a config reload)")


def test_judge_table():
    A = revocation.Answer
    good, revoked = A("good", "OCSP"), A("revoked", "CRL", "on 2026-01-01 00:00 UTC")
    none = A("unknown", "OCSP", "OCSP responder http://x/: cannot connect: Connection refused")
    assert revocation.judge("optional", good) == (True, "verified; not revoked (OCSP)")
    assert revocation.judge("mandatory", good) == (True, "verified; not revoked (OCSP)")
    assert revocation.judge("optional", revoked) == (False, "certificate revoked (CRL) on 2026-01-01 00:00 UTC")
    assert revocation.judge("mandatory", revoked)[0] is False
    assert revocation.judge("optional", none) == (True, f"verified; revocation unknown: {none.detail}")
    assert revocation.judge("mandatory", none) == (False, f"revocation status unavailable: {none.detail}")
    assert revocation.combine([A("good", "CRL"), A("unknown", "OCSP", "x")]) == A("good", "CRL")
    assert revocation.combine([A("good", "CRL"), A("revoked", "OCSP")]).status == "revoked"
    assert "no OCSP URL" in revocation.combine([]).detail


def test_ocsp_cache_is_bounded_and_expires():
    client = revocation.OcspClient(revocation.new_stats(), max_entries=2)
    a = revocation.Answer("good", "OCSP")
    now = time.monotonic()
    client.remember(("k", 1), a, now + 60)
    client.remember(("k", 2), a, now - 1)  # already expired
    assert client.cached(("k", 2)) is None and ("k", 2) not in client.cache
    client.remember(("k", 3), a, now + 60)
    assert client.cached(("k", 1)) is a  # used: now the most recent
    client.remember(("k", 4), a, now + 60)
    assert list(client.cache) == [("k", 1), ("k", 4)]  # the least recently used went


def test_pki_revoke_writes_index_and_crl(tmp_path):
    paths = generate_pki(tmp_path)
    crl0 = x509.load_pem_x509_crl(paths["device-ca.crl"].read_bytes())
    ca = load_cert(paths["device-ca.pem"])
    assert len(crl0) == 0 and crl0.is_signature_valid(ca.public_key())
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    revoke(tmp_path, "ipad", when=when)
    revoke(tmp_path, "device-ipad")  # twice: keeps the first date
    serial = load_cert(paths["device-ipad.pem"]).serial_number
    line = next(ln for ln in paths["index.txt"].read_text().splitlines() if int(ln.split("\t")[3], 16) == serial)
    assert line.split("\t")[0] == "R" and line.split("\t")[2] == "260102030405Z"
    crl = x509.load_pem_x509_crl(paths["device-ca.crl"].read_bytes())
    assert crl.is_signature_valid(ca.public_key())
    r = crl.get_revoked_certificate_by_serial_number(serial)
    assert r is not None and r.revocation_date_utc == when
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 3
    assert crl.next_update_utc - crl.last_update_utc == datetime.timedelta(days=7)
    generate_pki(tmp_path)  # reuses the PKI: the revocation stays
    assert "\nR\t" in "\n" + paths["index.txt"].read_text()
    with pytest.raises(ValueError, match="devices: device-android"):
        revoke(tmp_path, "nosuch")
    with pytest.raises(ValueError, match="not issued by the device CA"):
        revoke(tmp_path, "device-rogue")
