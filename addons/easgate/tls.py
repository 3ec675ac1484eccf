"""TLS offload: the operator's certificate towards clients, optional client certificates.

mitmproxy's own TLS setup would present a certificate minted by mitmproxy's CA and accept any
client certificate without telling anyone. easgate builds the client-side TLS itself, from one
pyOpenSSL context made at configure time, and verifies the presented chain in Python on every
handshake: OpenSSL skips its verify callback on resumed sessions, so its verdict can't be trusted
alone (see ../shared/DESIGN.md).
"""

from __future__ import annotations

import base64
import datetime
import logging
import weakref
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from OpenSSL import SSL, crypto

from .config import ConfigError, TlsConfig

logger = logging.getLogger(__name__)

NO_CERT = "none"
VERIFIED = "verified"
INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class CertVerdict:
    """What easgate concluded about one connection's client certificate."""

    status: str  # none | verified | invalid
    reason: str
    subject: str | None = None
    der_b64: str | None = None  # one line base64 of the DER: the NSClientCert header form

    @property
    def verified(self) -> bool:
        return self.status == VERIFIED

    def as_dict(self) -> dict:
        return {"status": self.status, "reason": self.reason, "subject": self.subject}


NONE_VERDICT = CertVerdict(NO_CERT, "no client certificate")


def _load_pem_chain(path: Path) -> list[x509.Certificate]:
    data = path.read_bytes()
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        return []


class ClientCertVerifier:
    """Verifies a presented chain against the configured trust anchors (device CA, root CA)."""

    def __init__(self, ca_files: tuple[Path, ...]) -> None:
        anchors: list[x509.Certificate] = []
        for f in ca_files:
            certs = _load_pem_chain(f)
            if not certs:
                raise ConfigError(None, "tls.client_certs.ca", f"{f} holds no PEM certificate", "point it at the CA's PEM file")
            anchors.extend(certs)
        self.anchors = anchors
        self.store = Store(anchors) if anchors else None

    def verify(self, chain: list[x509.Certificate], now: datetime.datetime | None = None) -> CertVerdict:
        if not chain:
            return NONE_VERDICT
        leaf = chain[0]
        subject = leaf.subject.rfc4514_string()
        der_b64 = base64.b64encode(leaf.public_bytes(serialization.Encoding.DER)).decode()
        if self.store is None:
            return CertVerdict(INVALID, "client certificates are not trusted (no CA configured)", subject, der_b64)
        now = now or datetime.datetime.now(datetime.timezone.utc)
        try:
            verifier = PolicyBuilder().store(self.store).time(now).build_client_verifier()
            verifier.verify(leaf, chain[1:])
        except VerificationError as e:
            reason = str(e)
            if leaf.not_valid_after_utc < now:
                reason = f"certificate expired {leaf.not_valid_after_utc:%Y-%m-%d}"
            elif leaf.not_valid_before_utc > now:
                reason = f"certificate not valid before {leaf.not_valid_before_utc:%Y-%m-%d}"
            return CertVerdict(INVALID, reason, subject, der_b64)
        except Exception as e:  # a certificate cryptography can't even read is not a verified one
            return CertVerdict(INVALID, f"unverifiable certificate: {e}", subject, der_b64)
        return CertVerdict(VERIFIED, "verified", subject, der_b64)


def load_server_identity(cfg: TlsConfig) -> tuple[list[x509.Certificate], object]:
    """The operator's leaf + chain and private key; raises ConfigError naming what is wrong."""
    certs = _load_pem_chain(cfg.certificate)
    if not certs:
        raise ConfigError(None, "tls.certificate", f"{cfg.certificate} holds no PEM certificate",
                          "use a PEM file with the certificate first, then its chain")
    key_file = cfg.key or cfg.certificate
    key_key = "tls.key" if cfg.key else "tls.certificate"
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(None, key_key, f"no usable unencrypted PEM private key in {key_file} ({e})",
                          "add the key to the certificate file or name it with tls.key")
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey,
                            ed448.Ed448PrivateKey)):
        raise ConfigError(None, key_key, "unsupported private key type", "use an RSA or EC key")
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, pub) != certs[0].public_key().public_bytes(
            serialization.Encoding.DER, pub):
        raise ConfigError(None, key_key, f"the private key in {key_file} does not match the certificate in {cfg.certificate}",
                          "pair the certificate with its own key (the leaf must come first in the file)")
    return certs, key


def build_client_context(cfg: TlsConfig) -> tuple[SSL.Context, ClientCertVerifier | None]:
    """One server-side TLS context for every client connection."""
    certs, key = load_server_identity(cfg)
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION if cfg.min_version == "TLS1_3" else SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION)
    ctx.use_certificate(certs[0])
    for c in certs[1:]:
        ctx.add_extra_chain_cert(c)
    ctx.use_privatekey(key)
    ctx.check_privatekey()
    # Resumed sessions must stay within this gateway's own sessions.
    ctx.set_session_id(b"easgate")
    # Only HTTP/1.1: ActiveSync clients speak it, and it keeps one request per stream to decide on.
    ctx.set_alpn_select_callback(_alpn_http11)

    cc = cfg.client_certs
    verifier = None
    if cc.mode != "off":
        verifier = ClientCertVerifier(cc.ca)
        store = ctx.get_cert_store()
        for anchor in verifier.anchors:
            store.add_cert(crypto.X509.from_cryptography(anchor))
            ctx.add_client_ca(anchor)  # the CA names sent in CertificateRequest
        mode = SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE
        if cc.mode == "required":
            mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        if cc.on_invalid == "reject":
            ctx.set_verify(mode, _openssl_verdict)
        else:
            ctx.set_verify(mode, _accept_for_python_check)
    else:
        ctx.set_verify(SSL.VERIFY_NONE, None)
    return ctx, verifier


def _alpn_http11(conn: SSL.Connection, offers: list[bytes]) -> bytes:
    return b"http/1.1" if b"http/1.1" in offers else SSL.NO_OVERLAPPING_PROTOCOLS


def _openssl_verdict(conn, cert, errno, depth, ok) -> bool:
    # First line of defence: a chain that does not verify fails the handshake ("a bad one is not").
    return bool(ok)


def _accept_for_python_check(conn, cert, errno, depth, ok) -> bool:
    # on_invalid: untrusted — the handshake proceeds; the Python check marks the connection.
    return True


class TlsOffload:
    """Serves the operator's certificate and records one client-certificate verdict per connection."""

    def __init__(self) -> None:
        self.context: SSL.Context | None = None
        self.verifier: ClientCertVerifier | None = None
        self.mode = "off"
        self.on_invalid = "reject"
        self.verdicts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def apply(self, cfg) -> None:
        self.context, self.verifier = build_client_context(cfg.tls)
        self.mode = cfg.tls.client_certs.mode
        self.on_invalid = cfg.tls.client_certs.on_invalid
        self.verdicts.clear()

    def tls_start_client(self, tls_start) -> None:
        # Always replace whatever mitmproxy's TlsConfig prepared: its CA must never face a client.
        if self.context is None:
            raise RuntimeError("easgate TLS is not configured")
        conn = SSL.Connection(self.context)
        conn.set_accept_state()
        tls_start.ssl_conn = conn

    def tls_established_client(self, data) -> None:
        verdict = self.verdict(data.conn)
        if verdict.status == INVALID:
            logger.warning(f"client {data.conn.peername[0]}: certificate {verdict.subject} not verified: {verdict.reason}")

    def client_disconnected(self, client) -> None:
        self.verdicts.pop(client, None)

    def verdict(self, client) -> CertVerdict:
        """The verdict for a connection, computed once per handshake (also for resumed sessions)."""
        v = self.verdicts.get(client)
        if v is None:
            chain = [c.to_cryptography() for c in (client.certificate_list or [])]
            if not chain:
                v = NONE_VERDICT
            elif self.verifier is None:
                v = CertVerdict(INVALID, "client certificates are off", chain[0].subject.rfc4514_string())
            else:
                v = self.verifier.verify(chain)
            self.verdicts[client] = v
        return v

    def refuse_reason(self, client) -> str | None:
        """Why requests on this connection must not proceed at all, or None."""
        if not client.tls_established:
            return "plain HTTP: this gateway only serves HTTPS"
        if self.mode == "off":
            return None
        v = self.verdict(client)
        if self.mode == "required" and v.status != VERIFIED:
            return f"a verified client certificate is required ({v.reason})"
        if v.status == INVALID and self.on_invalid == "reject":
            return f"client certificate not verified ({v.reason})"
        return None
