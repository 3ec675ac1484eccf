"""A throw-away demo PKI for easgate, generated with the ``cryptography`` library.

Nothing here is meant for production: every key is written unencrypted and the
CAs exist only so that the demo (and the test suite) can exercise the gateway's
TLS and client-certificate paths end to end without the ``openssl`` CLI.

The PKI mirrors a NetScaler + XenMobile deployment:

* ``public-ca``   - the CA that issued the operator's public gateway certificate
                    (``gateway.pem``); mail clients trust it.
* ``internal-ca`` - the CA of the internal upstream servers (Exchange, MDM).
* ``root-ca`` / ``device-ca`` - "XenMobile Root CA" and its intermediate
                    "XenMobile Device CA" (pathlen 0) which issue device
                    (client) certificates.
* ``rogue-ca``    - an unrelated CA whose device certificate must never verify.

All keys are EC P-256 so that generating the whole set takes well under a
second.  ``index.txt`` is an OpenSSL ``ca`` database of the device CA, usable
with ``openssl ocsp -index index.txt -CA device-cas.pem -rsigner device-ca.pem
-rkey device-ca.key``. ``device-ca.crl`` is the device CA's CRL (empty at first);
``revoke()`` (``easgate pki DIR --revoke NAME``) marks a device revoked in both. With
``ocsp_url=`` the device certificates carry that OCSP responder in their AIA.
"""

from __future__ import annotations

import base64
import datetime
import fcntl
import ipaddress
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import (
    AuthorityInformationAccessOID,
    ExtendedKeyUsageOID,
    NameOID,
)

__all__ = [
    "DEFAULT_HOSTNAMES",
    "DEVICES",
    "DEVICE_URI_PREFIX",
    "DEVICE_USERS",
    "UPN_OID",
    "PKI_FILES",
    "IDP_AUDIENCE",
    "IDP_ISSUER",
    "cert_b64_der",
    "generate_pki",
    "issue_token",
    "load_cert",
    "load_certs",
    "revoke",
]

DEFAULT_HOSTNAMES: tuple[str, ...] = ("mail.example.test", "localhost", "127.0.0.1")
INTERNAL_EXCHANGE_HOSTNAMES: tuple[str, ...] = ("exchange.internal", "localhost", "127.0.0.1")
INTERNAL_MDM_HOSTNAMES: tuple[str, ...] = ("mdm.internal", "localhost", "127.0.0.1")

DEMO_ORG = "easgate demo"
#: Device certificates carry SAN URI ``urn:easgate:device:<CN>``.
DEVICE_URI_PREFIX = "urn:easgate:device:"
#: szOID_NT_PRINCIPAL_NAME: the SAN otherName type that holds a User Principal Name.
UPN_OID = x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")

#: Device certificates: file stem -> (CN, O, issuing CA, validity kind).
#: validity kind is "valid", "expired" (ended yesterday) or "notyet" (starts tomorrow).
DEVICES: dict[str, tuple[str, str, str, str]] = {
    "device-iphone": ("ApplF17ABCDEF01", DEMO_ORG, "device-ca", "valid"),
    "device-ipad": ("ApplDMPQ99887766", DEMO_ORG, "device-ca", "valid"),
    "device-android": ("androidc1234567890", DEMO_ORG, "device-ca", "valid"),
    "device-expired": ("ApplEXPIRED00001", DEMO_ORG, "device-ca", "expired"),
    "device-notyet": ("ApplNOTYET000001", DEMO_ORG, "device-ca", "notyet"),
    # Same CN as the iPhone, but issued by an unrelated CA: must never verify.
    "device-rogue": ("ApplF17ABCDEF01", DEMO_ORG, "rogue-ca", "valid"),
    # The demo inventory's other phones (policies/demo-inventory.csv), so device binding can hold for them.
    "device-carol": ("ApplDEADBEEF0001", DEMO_ORG, "device-ca", "valid"),
    "device-dave": ("ApplLOST00000001", DEMO_ORG, "device-ca", "valid"),
    "device-erin": ("ApplNEW000000001", DEMO_ORG, "device-ca", "valid"),
}

#: The user each device certificate names, as an MDM puts it (docs/device-certificates.md): the UPN in a
#: SAN otherName and the same address as a SAN rfc822Name (e-mail).
DEVICE_USERS: dict[str, str] = {
    "device-iphone": "alice@example.test",
    "device-ipad": "alice@example.test",
    "device-android": "bob@contoso.com",
    "device-expired": "alice@example.test",
    "device-notyet": "alice@example.test",
    "device-rogue": "alice@example.test",
    "device-carol": "carol@contoso.com",
    "device-dave": "dave@example.test",
    "device-erin": "erin@example.test",
}

#: The demo's throw-away identity provider (what ADFS / Entra ID are for Bearer tokens).
IDP_ISSUER = "https://idp.example.test/adfs"
IDP_AUDIENCE = "https://mail.example.test"
IDP_KID = "easgate-demo-idp"

_CAS = ("public-ca", "internal-ca", "root-ca", "device-ca", "rogue-ca")
_SERVERS = ("gateway", "exchange", "mdm")

_README_ENTRIES: list[tuple[str, str]] = [
    ("public-ca.pem / .key", "CA that issued the operator's public gateway certificate; mail clients trust it."),
    ("gateway.pem / .key", "The gateway's public TLS server certificate (leaf only) and its key (EKU serverAuth)."),
    ("gateway-chain.pem", "The CA chain of gateway.pem (public-ca.pem)."),
    ("gateway-full.pem", "Leaf + chain + key in one file: what a NetScaler certkey pair holds; also usable as mitmproxy --certs."),
    ("internal-ca.pem / .key", "CA of the internal upstream servers (Exchange, MDM); the gateway trusts it upstream."),
    ("exchange.pem / .key", "Upstream Exchange server certificate: exchange.internal, localhost, 127.0.0.1."),
    ("mdm.pem / .key", "Upstream MDM server certificate: mdm.internal, localhost, 127.0.0.1."),
    ("root-ca.pem / .key", "'XenMobile Root CA' (self-signed)."),
    ("device-ca.pem / .key", "'XenMobile Device CA': intermediate under the root (pathlen 0) that issues device certificates."),
    ("device-cas.pem", "Device CA + root CA concatenated: the trust bundle for client (device) certificates."),
    ("rogue-ca.pem / .key", "An unrelated CA. Its device certificate (device-rogue) must never be accepted."),
    ("device-<name>.pem", "Device (client) certificate + issuing CA (EKU clientAuth; CN and SAN URI urn:easgate:device:<DeviceId>, SAN UPN and e-mail of its user)."),
    ("device-<name>.key", "The device's private key."),
    ("device-<name>-bundle.pem", "Certificate + chain + key in one file (handy for curl --cert)."),
    ("idp.key / idp-jwks.json", "A throw-away identity provider's signing key (EC P-256) and its JWKS: Bearer tokens for the demo."),
    ("index.txt (+ .attr)", "OpenSSL 'ca' database of every certificate issued by the device CA (for openssl ocsp -index)."),
    ("device-ca.crl", "The device CA's CRL (next update in 7 days); `easgate pki DIR --revoke NAME` adds to it."),
    ("serials.json", "Certificate name -> serial number (upper-case hex, as in index.txt)."),
]


def _pki_files() -> list[str]:
    files: list[str] = []
    for ca in _CAS:
        files += [f"{ca}.pem", f"{ca}.key"]
    files += ["device-cas.pem", "device-ca.crl"]
    for srv in _SERVERS:
        files += [f"{srv}.pem", f"{srv}.key"]
    files += ["gateway-chain.pem", "gateway-full.pem"]
    for dev in DEVICES:
        files += [f"{dev}.pem", f"{dev}.key", f"{dev}-bundle.pem"]
    files += ["idp.key", "idp-jwks.json"]
    files += ["index.txt", "index.txt.attr", "serials.json", "README.txt"]
    return files


#: Every file generate_pki() writes; the keys of its returned mapping.
PKI_FILES: tuple[str, ...] = tuple(_pki_files())

# Files holding private keys: written with mode 0600.
_SECRET_SUFFIXES = (".key", "-bundle.pem", "-full.pem")


# --------------------------------------------------------------------------- helpers


def load_certs(path: Path | str) -> list[x509.Certificate]:
    """All PEM certificates in `path`, in file order."""
    return x509.load_pem_x509_certificates(Path(path).read_bytes())


def load_cert(path: Path | str) -> x509.Certificate:
    """The first PEM certificate in `path` (the leaf for chain/bundle files)."""
    return load_certs(path)[0]


def cert_b64_der(cert: x509.Certificate) -> str:
    """One-line base64 of the DER encoding, no newlines (NetScaler's NSClientCert header form)."""
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode("ascii")


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _serial_hex(serial: int) -> str:
    """Serial as OpenSSL prints it in index.txt (BN_bn2hex: upper case, whole bytes)."""
    h = format(serial, "X")
    return h if len(h) % 2 == 0 else "0" + h


def _openssl_time(dt: datetime.datetime) -> str:
    """ASN.1 time string as stored in index.txt (UTCTime before 2050, GeneralizedTime after)."""
    dt = dt.astimezone(datetime.UTC)
    return dt.strftime("%y%m%d%H%M%SZ") if dt.year < 2050 else dt.strftime("%Y%m%d%H%M%SZ")


_ONELINE_SHORT = {
    NameOID.COUNTRY_NAME: "C",
    NameOID.STATE_OR_PROVINCE_NAME: "ST",
    NameOID.LOCALITY_NAME: "L",
    NameOID.ORGANIZATION_NAME: "O",
    NameOID.ORGANIZATIONAL_UNIT_NAME: "OU",
    NameOID.COMMON_NAME: "CN",
}


def _openssl_oneline(name: x509.Name) -> str:
    """X509_NAME_oneline()-style subject, e.g. ``/O=easgate demo/CN=foo``."""
    parts = []
    for attr in name:
        short = _ONELINE_SHORT.get(attr.oid, attr.oid.dotted_string)
        parts.append(f"/{short}={attr.value}")
    return "".join(parts)


def _name(cn: str, org: str = DEMO_ORG) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _san(hostnames: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for h in hostnames:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            entries.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(entries)


def _der_utf8(text: str) -> bytes:
    """DER UTF8String (the value of a UPN otherName)."""
    body = text.encode("utf-8")
    if len(body) < 0x80:
        return bytes((0x0C, len(body))) + body
    n = len(body).to_bytes((len(body).bit_length() + 7) // 8, "big")
    return bytes((0x0C, 0x80 | len(n))) + n + body


def _device_san(cn: str, upn: str | None = None) -> x509.SubjectAlternativeName:
    """SAN URI urn:easgate:device:<DeviceId>; with `upn`, also the UPN (otherName) and e-mail
    (rfc822Name): what XenMobile, Workspace ONE and Intune certificate templates put there."""
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(f"{DEVICE_URI_PREFIX}{cn}")]
    if upn:
        names.append(x509.OtherName(UPN_OID, _der_utf8(upn)))  # UTF-8
        if upn.isascii():  # an rfc822Name is ASCII only
            names.append(x509.RFC822Name(upn))
    return x509.SubjectAlternativeName(names)


@dataclass
class _Issued:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _make_ca(
    cn: str,
    org: str,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    issuer: _Issued | None = None,
    path_length: int | None = None,
) -> _Issued:
    key = _new_key()
    subject = _name(cn, org)
    signer_key = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,  # lets the CA sign OCSP responses itself
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(_aki(issuer), critical=False)
    return _Issued(key, builder.sign(signer_key, hashes.SHA256()))


def _aki(issuer: _Issued) -> x509.AuthorityKeyIdentifier:
    ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _make_leaf(
    issuer: _Issued,
    subject: x509.Name,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    eku: x509.ObjectIdentifier,
    san: x509.SubjectAlternativeName | None = None,
    ocsp_url: str | None = None,
) -> _Issued:
    key = _new_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_aki(issuer), critical=False)
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    if ocsp_url is not None:
        builder = builder.add_extension(x509.AuthorityInformationAccess([x509.AccessDescription(
            AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ocsp_url))]), critical=False)
    return _Issued(key, builder.sign(issuer.key, hashes.SHA256()))


def _write(path: Path, data: bytes, secret: bool) -> None:
    """Atomically write `data` to `path` (mode 0600 for secrets, 0644 otherwise)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600 if secret else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _existing_matches(directory: Path, hostnames: Sequence[str], ocsp_url: str | None = None) -> bool:
    """True when every file exists, gateway.pem carries exactly the requested SANs and the device
    certificates the requested OCSP URL (or none)."""
    if not all((directory / f).is_file() for f in PKI_FILES):
        return False
    try:
        san = load_cert(directory / "gateway.pem").extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
        device = load_cert(directory / "device-iphone.pem")
    except (ValueError, IndexError, x509.ExtensionNotFound):
        return False
    try:
        aia = device.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
        urls = [d.access_location.value for d in aia if d.access_method == AuthorityInformationAccessOID.OCSP]
    except x509.ExtensionNotFound:
        urls = []
    try:
        dev_san = device.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        has_upn = any(o.type_id == UPN_OID for o in dev_san.get_values_for_type(x509.OtherName))
    except x509.ExtensionNotFound:
        has_upn = False
    return set(san) == set(_san(hostnames)) and urls == ([ocsp_url] if ocsp_url else []) and has_upn


# --------------------------------------------------------------------------- main API


def generate_pki(
    directory: Path,
    *,
    hostnames: Sequence[str] = DEFAULT_HOSTNAMES,
    force: bool = False,
    ocsp_url: str | None = None,
) -> dict[str, Path]:
    """Create the demo PKI in `directory` (created if missing).

    Idempotent: when all files exist (and gateway.pem was issued for the same
    `hostnames`) and `force` is False, nothing is written and the existing files
    are reused. Otherwise the whole PKI is regenerated (a partial or stale set
    is never patched up, as its CAs would no longer match).

    With `ocsp_url` (e.g. ``http://127.0.0.1:8888/``) the certificates the device CA issues carry
    it as their AIA OCSP responder (a PKI made with another URL, or none, is regenerated).

    Returns file name -> path for every file (see ``PKI_FILES``), e.g.
    ``pki["gateway-full.pem"]``.
    """
    directory = Path(directory)
    hostnames = (hostnames,) if isinstance(hostnames, str) else tuple(hostnames)
    if not hostnames:
        raise ValueError("generate_pki needs at least one gateway hostname")
    paths = {name: directory / name for name in PKI_FILES}
    if not force and _existing_matches(directory, hostnames, ocsp_url):
        return paths

    directory.mkdir(parents=True, exist_ok=True)
    # Serialise concurrent generators (e.g. two `easgate demo` starting at once) by
    # locking the directory itself, so that no mix of two generations is left behind.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        if not force and _existing_matches(directory, hostnames, ocsp_url):
            return paths  # another process finished it while we waited
        _generate(directory, hostnames, paths, ocsp_url)
    finally:
        os.close(dir_fd)  # releases the lock
    return paths


def _generate(directory: Path, hostnames: tuple[str, ...], paths: dict[str, Path],
              ocsp_url: str | None = None) -> None:
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    day = datetime.timedelta(days=1)
    start = now - day
    leaf_end = start + datetime.timedelta(days=2 * 365)
    ca_end = start + datetime.timedelta(days=10 * 365)

    files: dict[str, bytes] = {}
    serials: dict[str, str] = {}

    def put_ca(stem: str, ca: _Issued) -> None:
        files[f"{stem}.pem"] = _pem(ca.cert)
        files[f"{stem}.key"] = _key_pem(ca.key)
        serials[stem] = _serial_hex(ca.cert.serial_number)

    # -- CAs
    public_ca = _make_ca("easgate demo Public CA", DEMO_ORG, start, ca_end)
    internal_ca = _make_ca("easgate demo Internal CA", DEMO_ORG, start, ca_end)
    root_ca = _make_ca("XenMobile Root CA", DEMO_ORG, start, ca_end)
    device_ca = _make_ca("XenMobile Device CA", DEMO_ORG, start, ca_end, issuer=root_ca, path_length=0)
    rogue_ca = _make_ca("Rogue Device CA", "not easgate", start, ca_end)
    cas = {
        "public-ca": public_ca,
        "internal-ca": internal_ca,
        "root-ca": root_ca,
        "device-ca": device_ca,
        "rogue-ca": rogue_ca,
    }
    for stem, ca in cas.items():
        put_ca(stem, ca)
    files["device-cas.pem"] = _pem(device_ca.cert) + _pem(root_ca.cert)
    files["device-ca.crl"] = _crl_pem(device_ca, [], 1, now)

    # -- servers
    servers = {
        "gateway": (public_ca, hostnames),
        "exchange": (internal_ca, INTERNAL_EXCHANGE_HOSTNAMES),
        "mdm": (internal_ca, INTERNAL_MDM_HOSTNAMES),
    }
    for stem, (ca, names) in servers.items():
        # CN is informational only (verifiers match SANs) and limited to 64 characters.
        common_name = names[0] if len(names[0]) <= 64 else f"easgate {stem}"
        srv = _make_leaf(
            ca, _name(common_name), start, leaf_end, ExtendedKeyUsageOID.SERVER_AUTH, san=_san(names)
        )
        files[f"{stem}.pem"] = _pem(srv.cert)
        files[f"{stem}.key"] = _key_pem(srv.key)
        serials[stem] = _serial_hex(srv.cert.serial_number)
        if stem == "gateway":
            chain = _pem(public_ca.cert)
            files["gateway-chain.pem"] = chain
            files["gateway-full.pem"] = _pem(srv.cert) + chain + _key_pem(srv.key)

    # -- devices
    index_lines: list[str] = []
    for stem, (cn, org, ca_stem, kind) in DEVICES.items():
        if kind == "valid":
            nb, na = start, leaf_end
        elif kind == "expired":
            nb, na = now - datetime.timedelta(days=365), now - day
        elif kind == "notyet":
            nb, na = now + day, now + day + datetime.timedelta(days=2 * 365)
        else:  # pragma: no cover - table typo
            raise ValueError(f"unknown validity kind {kind!r}")
        ca = cas[ca_stem]
        # cryptography's client verifier (webpki policy) insists on a SAN in the
        # leaf, so carry the device id as a URI there too.
        dev = _make_leaf(
            ca, _name(cn, org), nb, na, ExtendedKeyUsageOID.CLIENT_AUTH, san=_device_san(cn, DEVICE_USERS.get(stem)),
            ocsp_url=ocsp_url if ca_stem == "device-ca" else None,
        )
        chain_pem = _pem(dev.cert) + _pem(ca.cert)
        files[f"{stem}.pem"] = chain_pem
        files[f"{stem}.key"] = _key_pem(dev.key)
        files[f"{stem}-bundle.pem"] = chain_pem + _key_pem(dev.key)
        serial = _serial_hex(dev.cert.serial_number)
        serials[stem] = serial
        if ca_stem == "device-ca":
            # OpenSSL ca database: status, expiry, revocation date, serial, file, subject.
            # Expired entries stay "V" (as before `openssl ca -updatedb`): openssl ocsp
            # only understands V and R.
            line = "\t".join(
                ["V", _openssl_time(na), "", serial, "unknown", _openssl_oneline(dev.cert.subject)]
            )
            index_lines.append(line)

    idp_key = _new_key()
    files["idp.key"] = _key_pem(idp_key)
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(idp_key.public_key()))
    jwk.update(kid=IDP_KID, use="sig", alg="ES256")
    files["idp-jwks.json"] = (json.dumps({"keys": [jwk]}, indent=2) + "\n").encode()

    files["index.txt"] = "".join(line + "\n" for line in index_lines).encode()
    files["index.txt.attr"] = b"unique_subject = no\n"
    files["serials.json"] = (json.dumps(serials, indent=2, sort_keys=True) + "\n").encode()
    files["README.txt"] = _readme(hostnames, now).encode()

    assert set(files) == set(PKI_FILES), set(files) ^ set(PKI_FILES)
    for name in PKI_FILES:
        _write(paths[name], files[name], secret=name.endswith(_SECRET_SUFFIXES))


CRL_DAYS = 7


def _crl_pem(ca: _Issued, revoked: Sequence[tuple[int, datetime.datetime]], number: int,
             now: datetime.datetime) -> bytes:
    """A CRL of `ca` listing `revoked` (serial, revocation date), valid for CRL_DAYS."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now)
        .next_update(now + datetime.timedelta(days=CRL_DAYS))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(_aki(ca), critical=False)
    )
    for serial, when in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build())
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def issue_token(directory: Path | str, user: str, *, ttl_s: int = 3600, audience: str = IDP_AUDIENCE,
                issuer: str = IDP_ISSUER) -> str:
    """A Bearer JWT (ES256) from the demo identity provider in `directory`: `upn` and
    `unique_name` claims name `user`, as ADFS tokens do."""
    key = serialization.load_pem_private_key((Path(directory) / "idp.key").read_bytes(), None)
    now = int(datetime.datetime.now(datetime.UTC).timestamp())
    claims = {"iss": issuer, "aud": audience, "iat": now, "nbf": now, "exp": now + ttl_s,
              "upn": user, "unique_name": user}
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": IDP_KID})  # type: ignore[arg-type]


def _parse_openssl_time(s: str) -> datetime.datetime:
    s = s.split(",", 1)[0]  # "YYMMDDHHMMSSZ[,reason]"
    fmt = "%y%m%d%H%M%SZ" if len(s) == 13 else "%Y%m%d%H%M%SZ"
    return datetime.datetime.strptime(s, fmt).replace(tzinfo=datetime.UTC)


def revoke(directory: Path | str, name: str, *, when: datetime.datetime | None = None) -> Path:
    """Revoke the device certificate `name` (``device-ipad``, or just ``ipad``) of the PKI in `directory`.

    Marks it ``R`` in index.txt with its revocation date, as ``openssl ca -revoke`` does (an
    ``openssl ocsp -index`` responder reads the index when it starts: restart it), and writes a
    fresh ``device-ca.crl`` signed by the device CA (next update in 7 days) listing every
    revoked certificate. Revoking twice keeps the first date. Returns the CRL's path.
    """
    directory = Path(directory)
    try:
        serials: dict[str, str] = json.loads((directory / "serials.json").read_text())
    except FileNotFoundError:
        raise ValueError(f"{directory} holds no demo PKI (no serials.json); create it with `easgate pki {directory}`")
    stem = name if name in serials else f"device-{name}"
    if stem not in serials:
        devices = ", ".join(s for s in serials if s.startswith("device-") and s != "device-ca")
        raise ValueError(f"no certificate named {name!r} in {directory}; devices: {devices}")
    serial = serials[stem]
    now = (when or datetime.datetime.now(datetime.UTC)).replace(microsecond=0)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        index = directory / "index.txt"
        lines = index.read_text().splitlines()
        rows = [line.split("\t") for line in lines if line.strip()]
        row = next((r for r in rows if len(r) == 6 and r[3] == serial), None)
        if row is None:
            raise ValueError(f"{stem} (serial {serial}) was not issued by the device CA: it is not in {index}")
        if row[0] != "R":
            row[0], row[2] = "R", _openssl_time(now)
        _write(index, "".join("\t".join(r) + "\n" for r in rows).encode(), secret=False)
        ca = _Issued(
            serialization.load_pem_private_key((directory / "device-ca.key").read_bytes(), None),  # type: ignore[arg-type]
            load_cert(directory / "device-ca.pem"),
        )
        crl_path = directory / "device-ca.crl"
        number = 1
        try:
            old = x509.load_pem_x509_crl(crl_path.read_bytes())
            number = old.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
        except (FileNotFoundError, ValueError, x509.ExtensionNotFound):
            pass
        revoked = [(int(r[3], 16), _parse_openssl_time(r[2])) for r in rows if r[0] == "R"]
        _write(crl_path, _crl_pem(ca, revoked, number, now), secret=False)
    finally:
        os.close(dir_fd)
    return crl_path


def _readme(hostnames: Sequence[str], now: datetime.datetime) -> str:
    width = max(len(n) for n, _ in _README_ENTRIES)
    lines = [
        "easgate demo PKI -- THROW-AWAY, FOR DEMOS AND TESTS ONLY",
        "",
        f"Generated {now.isoformat()} by easgate.pki.generate_pki().",
        "All keys are unencrypted EC P-256; files holding keys are mode 0600.",
        f"Gateway hostnames: {', '.join(hostnames)}",
        "",
    ]
    lines += [f"{n.ljust(width)}  {d}" for n, d in _README_ENTRIES]
    lines += ["", "Device certificates (all issued by the device CA unless noted):"]
    for stem, (cn, org, ca_stem, kind) in DEVICES.items():
        note = kind if ca_stem == "device-ca" else f"{kind}, issued by {ca_stem} -- must be rejected"
        lines.append(f"  {stem:<16} CN={cn}, O={org}, UPN {DEVICE_USERS.get(stem, '-')} ({note})")
    lines += [
        "",
        "Examples:",
        "  curl --cacert public-ca.pem --cert device-iphone-bundle.pem https://mail.example.test/",
        "  openssl ocsp -index index.txt -port 8888 -CA device-cas.pem \\",
        "       -rsigner device-ca.pem -rkey device-ca.key",
        "  easgate pki . --revoke device-ipad   # index.txt + device-ca.crl; restart openssl ocsp",
        "",
    ]
    return "\n".join(lines)
