"""Tests for easgate.pki: the throw-away demo PKI."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import re
import shutil
import socket
import ssl
import stat
import subprocess
import threading
import time
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from easgate.authz.binding import Place, place_values
from easgate.tools.pki import (
    DEVICE_USERS,
    DEVICES,
    IDP_AUDIENCE,
    IDP_ISSUER,
    PKI_FILES,
    cert_b64_der,
    generate_pki,
    issue_token,
    load_cert,
    load_certs,
)

VALID_DEVICES = ["device-iphone", "device-ipad", "device-android"]
INVALID_DEVICES = ["device-rogue", "device-expired", "device-notyet"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate_pki(tmp_path_factory.mktemp("pki"))


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def cn(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def pem_labels(path: Path) -> list[str]:
    return re.findall(r"-----BEGIN ([A-Z ]+)-----", path.read_text())


def client_verifier(*store_files: Path):
    certs = [c for f in store_files for c in load_certs(f)]
    return PolicyBuilder().store(Store(certs)).time(now()).build_client_verifier()


def server_verifier(store_file: Path, name: x509.GeneralName):
    return PolicyBuilder().store(Store(load_certs(store_file))).time(now()).build_server_verifier(name)


# --------------------------------------------------------------------------- files


def test_files_and_modes(pki: dict[str, Path]) -> None:
    assert set(pki) == set(PKI_FILES)
    directory = pki["README.txt"].parent
    on_disk = {p.name for p in directory.iterdir()}
    assert on_disk == set(PKI_FILES)  # no leftover temp files
    expected = {
        "public-ca.pem", "public-ca.key", "gateway.pem", "gateway.key", "gateway-chain.pem",
        "gateway-full.pem", "internal-ca.pem", "internal-ca.key", "exchange.pem", "exchange.key",
        "mdm.pem", "mdm.key", "root-ca.pem", "root-ca.key", "device-ca.pem", "device-ca.key",
        "device-cas.pem", "rogue-ca.pem", "rogue-ca.key", "index.txt", "serials.json", "README.txt",
    }  # fmt: skip
    for dev in VALID_DEVICES + INVALID_DEVICES:
        expected |= {f"{dev}.pem", f"{dev}.key", f"{dev}-bundle.pem"}
    assert expected <= set(PKI_FILES)
    for name, path in pki.items():
        assert path.is_file(), name
        mode = stat.S_IMODE(path.stat().st_mode)
        if "PRIVATE KEY" in path.read_text():
            assert mode == 0o600, name
        else:
            assert mode == 0o644, name
    for name in PKI_FILES:
        if name.endswith(".key"):
            assert stat.S_IMODE(pki[name].stat().st_mode) == 0o600
    readme = pki["README.txt"].read_text()
    for word in ("gateway-full.pem", "device-cas.pem", "index.txt", "device-rogue"):
        assert word in readme


def test_keys_are_p256_and_match_certs(pki: dict[str, Path]) -> None:
    stems = ["public-ca", "internal-ca", "root-ca", "device-ca", "rogue-ca", "gateway", "exchange", "mdm"]
    for stem in stems + list(DEVICES):
        key = serialization.load_pem_private_key(pki[f"{stem}.key"].read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(key.curve, ec.SECP256R1)
        assert load_cert(pki[f"{stem}.pem"]).public_key() == key.public_key(), stem


def test_gateway_full_is_leaf_chain_key(pki: dict[str, Path]) -> None:
    full = pki["gateway-full.pem"]
    assert pem_labels(full) == ["CERTIFICATE", "CERTIFICATE", "PRIVATE KEY"]
    certs = load_certs(full)
    assert certs[0] == load_cert(pki["gateway.pem"])
    assert certs[1:] == load_certs(pki["gateway-chain.pem"]) == load_certs(pki["public-ca.pem"])
    key = serialization.load_pem_private_key(full.read_bytes(), None)
    assert key.public_key() == certs[0].public_key()
    assert pem_labels(pki["gateway.pem"]) == ["CERTIFICATE"]


def test_device_files(pki: dict[str, Path]) -> None:
    device_ca = load_cert(pki["device-ca.pem"])
    rogue_ca = load_cert(pki["rogue-ca.pem"])
    for stem, (common_name, org, ca_stem, _) in DEVICES.items():
        certs = load_certs(pki[f"{stem}.pem"])
        assert len(certs) == 2
        assert certs[1] == (rogue_ca if ca_stem == "rogue-ca" else device_ca)
        assert cn(certs[0]) == common_name
        assert certs[0].subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == org
        eku = certs[0].extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert pem_labels(pki[f"{stem}-bundle.pem"]) == ["CERTIFICATE", "CERTIFICATE", "PRIVATE KEY"]
        assert load_certs(pki[f"{stem}-bundle.pem"]) == certs
    assert cn(load_cert(pki["device-iphone.pem"])) == "ApplF17ABCDEF01"
    assert cn(load_cert(pki["device-ipad.pem"])) == "ApplDMPQ99887766"
    assert cn(load_cert(pki["device-android.pem"])) == "androidc1234567890"
    iphone, rogue = load_cert(pki["device-iphone.pem"]), load_cert(pki["device-rogue.pem"])
    assert iphone.subject == rogue.subject and iphone.issuer != rogue.issuer
    assert load_certs(pki["device-cas.pem"]) == [device_ca, load_cert(pki["root-ca.pem"])]


def test_ca_structure(pki: dict[str, Path]) -> None:
    root, device_ca = load_cert(pki["root-ca.pem"]), load_cert(pki["device-ca.pem"])
    assert cn(root) == "XenMobile Root CA"
    assert cn(device_ca) == "XenMobile Device CA"
    assert device_ca.issuer == root.subject
    device_ca.verify_directly_issued_by(root)
    bc = device_ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    for stem in ("public-ca", "internal-ca", "root-ca", "rogue-ca"):
        ca = load_cert(pki[f"{stem}.pem"])
        assert ca.issuer == ca.subject
        ca.verify_directly_issued_by(ca)
        validity = ca.not_valid_after_utc - ca.not_valid_before_utc
        assert validity >= datetime.timedelta(days=10 * 365 - 1)


def test_validity_and_serials(pki: dict[str, Path]) -> None:
    t = now()
    certs = {name[:-4]: load_cert(p) for name, p in pki.items() if name.endswith(".pem")}
    serials = json.loads(pki["serials.json"].read_text())
    for stem in ["gateway", "exchange", "mdm", *VALID_DEVICES, "device-rogue"]:
        c = certs[stem]
        assert c.not_valid_before_utc <= t - datetime.timedelta(hours=23)
        assert c.not_valid_after_utc - c.not_valid_before_utc >= datetime.timedelta(days=2 * 365 - 1)
    assert certs["device-expired"].not_valid_after_utc < t - datetime.timedelta(hours=23)
    assert certs["device-notyet"].not_valid_before_utc > t + datetime.timedelta(hours=23)
    seen = set()
    for stem in ["gateway", "exchange", "mdm", *DEVICES]:
        c = certs[stem]
        assert int(serials[stem], 16) == c.serial_number
        assert c.serial_number.bit_length() > 64  # random, not 1, 2, 3...
        seen.add(c.serial_number)
    assert len(seen) == 3 + len(DEVICES)


def test_index_txt(pki: dict[str, Path]) -> None:
    serials = json.loads(pki["serials.json"].read_text())
    lines = pki["index.txt"].read_text().splitlines()
    issued_by_device_ca = [s for s, (_, _, ca, _) in DEVICES.items() if ca == "device-ca"]
    assert len(lines) == len(issued_by_device_ca) == 8
    by_serial = {}
    for line in lines:
        fields = line.split("\t")
        assert len(fields) == 6, line
        status, expiry, revoked, serial, filename, subject = fields
        assert status == "V" and revoked == "" and filename == "unknown"
        assert re.fullmatch(r"(\d{2}|\d{4})\d{10}Z", expiry)
        assert re.fullmatch(r"([0-9A-F]{2})+", serial)
        by_serial[serial] = (expiry, subject)
    for stem in issued_by_device_ca:
        cert = load_cert(pki[f"{stem}.pem"])
        expiry, subject = by_serial[serials[stem]]
        assert expiry == cert.not_valid_after_utc.strftime("%y%m%d%H%M%SZ")
        assert subject.endswith(f"/CN={cn(cert)}")
    assert serials["device-rogue"] not in by_serial


def test_cert_b64_der(pki: dict[str, Path]) -> None:
    cert = load_cert(pki["device-iphone.pem"])
    b64 = cert_b64_der(cert)
    assert "\n" not in b64 and " " not in b64
    assert base64.b64decode(b64) == cert.public_bytes(serialization.Encoding.DER)
    assert x509.load_der_x509_certificate(base64.b64decode(b64)) == cert


# --------------------------------------------------------------------------- verification


@pytest.mark.parametrize("device", VALID_DEVICES)
def test_valid_devices_verify(pki: dict[str, Path], device: str) -> None:
    leaf, *chain = load_certs(pki[f"{device}.pem"])
    # Trust bundle = device CA + root CA.
    verified = client_verifier(pki["device-cas.pem"]).verify(leaf, [])
    assert verified.chain[0] == leaf
    # Only the root trusted: the device CA travels as an intermediate.
    verified = client_verifier(pki["root-ca.pem"]).verify(leaf, chain)
    assert [cn(c) for c in verified.chain] == [cn(leaf), "XenMobile Device CA", "XenMobile Root CA"]
    # ... and without it the chain cannot be built.
    with pytest.raises(VerificationError):
        client_verifier(pki["root-ca.pem"]).verify(leaf, [])


@pytest.mark.parametrize("device", INVALID_DEVICES)
def test_invalid_devices_rejected(pki: dict[str, Path], device: str) -> None:
    leaf, *chain = load_certs(pki[f"{device}.pem"])
    for intermediates in ([], chain):
        with pytest.raises(VerificationError):
            client_verifier(pki["device-cas.pem"]).verify(leaf, intermediates)
        with pytest.raises(VerificationError):
            client_verifier(pki["root-ca.pem"]).verify(leaf, [*intermediates, load_cert(pki["device-ca.pem"])])


def test_server_certs_are_not_client_certs(pki: dict[str, Path]) -> None:
    # Wrong EKU: the gateway's serverAuth cert must not pass as a device.
    verifier = client_verifier(pki["public-ca.pem"])
    with pytest.raises(VerificationError):
        verifier.verify(load_cert(pki["gateway.pem"]), [])


@pytest.mark.parametrize(
    "name",
    [
        x509.DNSName("mail.example.test"),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ],
)
def test_gateway_verifies(pki: dict[str, Path], name: x509.GeneralName) -> None:
    leaf = load_cert(pki["gateway.pem"])
    assert server_verifier(pki["public-ca.pem"], name).verify(leaf, [])[0] == leaf


def test_gateway_rejections(pki: dict[str, Path]) -> None:
    leaf = load_cert(pki["gateway.pem"])
    with pytest.raises(VerificationError):
        server_verifier(pki["public-ca.pem"], x509.DNSName("evil.example.test")).verify(leaf, [])
    with pytest.raises(VerificationError):
        server_verifier(pki["internal-ca.pem"], x509.DNSName("mail.example.test")).verify(leaf, [])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mail.example.test", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


@pytest.mark.parametrize(
    "stem,names",
    [("exchange", ["exchange.internal", "localhost", "127.0.0.1"]), ("mdm", ["mdm.internal", "localhost", "127.0.0.1"])],
)
def test_internal_servers_verify(pki: dict[str, Path], stem: str, names: list[str]) -> None:
    leaf = load_cert(pki[f"{stem}.pem"])
    for n in names:
        try:
            name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(n))
        except ValueError:
            name = x509.DNSName(n)
        server_verifier(pki["internal-ca.pem"], name).verify(leaf, [])
        with pytest.raises(VerificationError):
            server_verifier(pki["public-ca.pem"], name).verify(leaf, [])


# --------------------------------------------------------------------------- real TLS


def _handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str
) -> tuple[BaseException | None, BaseException | None, dict | None]:
    """One TLS handshake over loopback. Returns (server error, client error, peer cert seen by server)."""
    result: dict = {"server_error": None, "peer": None}
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(10)
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                result["peer"] = tls.getpeercert()
                tls.sendall(b"hello")
        except BaseException as e:  # noqa: BLE001 - reported to the test
            result["server_error"] = e
        finally:
            listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_error = None
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                assert tls.recv(5) == b"hello"
    except (ssl.SSLError, OSError) as e:
        client_error = e
    thread.join(10)
    assert not thread.is_alive()
    return result["server_error"], client_error, result["peer"]


def _server_ctx(pki: dict[str, Path], require_client_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["gateway-full.pem"])
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=pki["device-cas.pem"])
    return ctx


def _client_ctx(pki: dict[str, Path], device: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki["public-ca.pem"])
    if device:
        ctx.load_cert_chain(pki[f"{device}-bundle.pem"])
    return ctx


def test_tls_handshake(pki: dict[str, Path]) -> None:
    server_err, client_err, _ = _handshake(_server_ctx(pki), _client_ctx(pki), "mail.example.test")
    assert server_err is None and client_err is None


def test_tls_handshake_wrong_hostname_fails(pki: dict[str, Path]) -> None:
    _, client_err, _ = _handshake(_server_ctx(pki), _client_ctx(pki), "evil.example.test")
    assert isinstance(client_err, ssl.SSLCertVerificationError)


def test_tls_client_cert(pki: dict[str, Path]) -> None:
    server_err, client_err, peer = _handshake(
        _server_ctx(pki, require_client_cert=True), _client_ctx(pki, "device-iphone"), "mail.example.test"
    )
    assert server_err is None and client_err is None
    assert ("commonName", "ApplF17ABCDEF01") in [rdn[0] for rdn in peer["subject"]]


def test_tls_rogue_client_cert_rejected(pki: dict[str, Path]) -> None:
    server_err, _, peer = _handshake(
        _server_ctx(pki, require_client_cert=True), _client_ctx(pki, "device-rogue"), "mail.example.test"
    )
    assert isinstance(server_err, ssl.SSLError) and peer is None


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_openssl_cli_agrees(pki: dict[str, Path]) -> None:
    def verify(*args: str) -> bool:
        return subprocess.run(["openssl", "verify", *args], capture_output=True).returncode == 0

    cas = str(pki["device-cas.pem"])
    for dev in VALID_DEVICES:
        assert verify("-CAfile", cas, "-purpose", "sslclient", str(pki[f"{dev}.pem"]))
    for dev in INVALID_DEVICES:
        assert not verify("-CAfile", cas, "-purpose", "sslclient", str(pki[f"{dev}.pem"]))
    assert verify(
        "-CAfile", str(pki["public-ca.pem"]), "-purpose", "sslserver",
        "-verify_hostname", "mail.example.test", str(pki["gateway.pem"]),
    )  # fmt: skip


# --------------------------------------------------------------------------- idempotence


def _snapshot(paths: dict[str, Path]) -> dict[str, tuple[int, bytes]]:
    return {n: (p.stat().st_mtime_ns, p.read_bytes()) for n, p in paths.items()}


def test_idempotent_and_force(tmp_path: Path) -> None:
    directory = tmp_path / "nested" / "pki"  # created if missing
    first = generate_pki(directory)
    before = _snapshot(first)
    second = generate_pki(directory)
    assert second == first
    assert _snapshot(second) == before  # nothing rewritten

    forced = generate_pki(directory, force=True)
    assert forced == first
    after = _snapshot(forced)
    for name in ("root-ca.pem", "device-ca.key", "gateway.pem", "device-iphone.pem", "serials.json"):
        assert after[name][1] != before[name][1], name


def test_regenerates_incomplete_or_stale(tmp_path: Path) -> None:
    paths = generate_pki(tmp_path)
    old_root = paths["root-ca.pem"].read_bytes()
    paths["device-ca.key"].unlink()
    generate_pki(tmp_path)
    assert paths["device-ca.key"].exists()
    # The whole PKI is regenerated, so the device CA still chains to the root.
    load_cert(paths["device-ca.pem"]).verify_directly_issued_by(load_cert(paths["root-ca.pem"]))
    assert paths["root-ca.pem"].read_bytes() != old_root

    generate_pki(tmp_path, hostnames=["gw.example.org", "10.0.0.5"])
    san = load_cert(paths["gateway.pem"]).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gw.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    assert cn(load_cert(paths["gateway.pem"])) == "gw.example.org"


def test_concurrent_generators_leave_a_consistent_pki(tmp_path: Path) -> None:
    results: list[dict[str, Path]] = []
    threads = [threading.Thread(target=lambda: results.append(generate_pki(tmp_path))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 4
    paths = results[0]
    load_cert(paths["device-ca.pem"]).verify_directly_issued_by(load_cert(paths["root-ca.pem"]))
    load_cert(paths["device-iphone.pem"]).verify_directly_issued_by(load_cert(paths["device-ca.pem"]))
    load_cert(paths["gateway.pem"]).verify_directly_issued_by(load_cert(paths["public-ca.pem"]))
    key = serialization.load_pem_private_key(paths["gateway-full.pem"].read_bytes(), None)
    assert key.public_key() == load_cert(paths["gateway.pem"]).public_key()
    assert {p.name for p in tmp_path.iterdir()} == set(PKI_FILES)


def test_single_hostname_string(tmp_path: Path) -> None:
    paths = generate_pki(tmp_path, hostnames="gw.example.org")  # type: ignore[arg-type]
    san = load_cert(paths["gateway.pem"]).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gw.example.org"]


def test_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    generate_pki(tmp_path)
    assert time.perf_counter() - start < 1.0


def test_device_certificates_carry_device_id_and_upn_like_an_mdm(pki: dict[str, Path]) -> None:
    """DeviceId in the CN and a SAN URI, the user's UPN in a SAN otherName and as e-mail
    (docs/device-certificates.md); read back the way the gateway's device binding reads them."""
    for stem, (device_id, _, _, _) in DEVICES.items():
        cert = load_cert(pki[f"{stem}.pem"])
        assert place_values(cert, Place("san_uri", pattern="urn:easgate:device:(.+)")) == (device_id,)
        assert place_values(cert, Place("subject_cn")) == (device_id,)
        assert place_values(cert, Place("san_upn")) == (DEVICE_USERS[stem],)
        assert place_values(cert, Place("san_email")) == (DEVICE_USERS[stem],)


def test_demo_identity_provider_tokens_verify_against_its_jwks(pki: dict[str, Path]) -> None:
    token = issue_token(pki["idp.key"].parent, "alice@example.test")
    jwks = jwt.PyJWKSet.from_json(pki["idp-jwks.json"].read_text())
    key = jwks[jwt.get_unverified_header(token)["kid"]]
    claims = jwt.decode(token, key.key, algorithms=["ES256"], audience=IDP_AUDIENCE, issuer=IDP_ISSUER)
    assert claims["upn"] == "alice@example.test" and claims["exp"] > claims["iat"]
    assert "PRIVATE" not in pki["idp-jwks.json"].read_text()
