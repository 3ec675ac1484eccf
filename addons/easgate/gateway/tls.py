"""TLS offload: the operator's certificate towards clients, optional client certificates.

mitmproxy's own TLS setup would present a certificate minted by mitmproxy's CA and accept any
client certificate without telling anyone. easgate builds the client-side TLS itself, from one
pyOpenSSL context made at configure time, and verifies the presented chain in Python on every
handshake: OpenSSL skips its verify callback on resumed sessions, so its verdict can't be trusted
alone (docs/design-notes.md, "TLS").
"""

from __future__ import annotations

import base64
import datetime
import logging
import os
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from OpenSSL import SSL, crypto

from ..core.errors import ConfigError
from . import mitmcompat, revocation
from .config import TlsConfig, TrustedCa

logger = logging.getLogger(__name__)

# The supervisor of `easgate run --workers N` hands its workers one session ticket key through an
# inherited memfd named by this variable (never the key itself in the environment).
TICKET_KEY_FD_ENV = "EASGATE_TICKET_KEY_FD"
TICKET_KEY_CHECK_S = 10.0  # how often a configured key file is looked at for a rotation


def inherited_ticket_key() -> bytes | None:
    fd = os.environ.get(TICKET_KEY_FD_ENV, "")
    if not fd.isdigit():
        return None
    try:
        key = os.pread(int(fd), mitmcompat.TICKET_KEY_LEN + 1, 0)
    except OSError:
        return None
    return key if len(key) == mitmcompat.TICKET_KEY_LEN else None


def read_ticket_key(path: Path) -> bytes:
    key = path.read_bytes()
    if len(key) != mitmcompat.TICKET_KEY_LEN:
        raise ValueError(f"{path} holds {len(key)} bytes, not {mitmcompat.TICKET_KEY_LEN}")
    return key


class TicketKeys:
    """Which key this process encrypts and decrypts TLS session tickets with (TLS 1.2 and 1.3).

    OpenSSL makes a random key per context: a reconnect that lands on another worker (SO_REUSEPORT
    spreads connections by their addresses), on another node, or after a config reload, gets a
    full handshake. So the key is, in this order: `tls.session_ticket_key` (a file the operator
    shares between nodes and rotates, like nginx's ssl_session_ticket_key), the key the supervisor
    gave all its workers, or one random key for the life of this process. A resumed session still
    gets its client certificate verified again (TlsOffload), like a full handshake.
    """

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self.file: Path | None = None
        self.key: bytes | None = None
        self.source = ""
        self._stamp: tuple | None = None
        self._next_check = 0.0
        self._process_key: bytes | None = None
        self._warned = False

    def configure(self, path: Path | None) -> None:
        """Choose the key for the contexts built from now on (ConfigError if the file is bad)."""
        if path is not None:
            try:
                self.key, self._stamp = read_ticket_key(path), self._stat(path)
            except (OSError, ValueError) as e:
                raise ConfigError(None, "tls.session_ticket_key", str(e),
                                  f"write a new key: openssl rand 80 > {path}") from None
            self.file, self.source = path, str(path)
            self._next_check = self.clock() + TICKET_KEY_CHECK_S
            return
        self.file = None
        inherited = inherited_ticket_key()
        if inherited is not None:
            self.key, self.source = inherited, "shared by this gateway's workers"
        else:
            if self._process_key is None:
                self._process_key = os.urandom(mitmcompat.TICKET_KEY_LEN)
            self.key, self.source = self._process_key, "this process"

    def install(self, ctx: SSL.Context) -> bool:
        if self.key is None:
            return False
        if mitmcompat.set_ticket_key(ctx, self.key):
            return True
        if not self._warned:
            self._warned = True
            logger.warning("easgate: this OpenSSL build does not let easgate set TLS session ticket keys: a client "
                           "resumes its session only on the worker (and node) that issued it")
        return False

    def maybe_rotate(self, ctx: SSL.Context) -> None:
        """Pick up a new key file (checked every TICKET_KEY_CHECK_S): tickets under the old key then
        get a full handshake once, as with nginx when a key leaves ssl_session_ticket_key."""
        if self.file is None or self.clock() < self._next_check:
            return
        self._next_check = self.clock() + TICKET_KEY_CHECK_S
        stamp = self._stat(self.file)
        if stamp == self._stamp:
            return
        try:
            key = read_ticket_key(self.file)
        except (OSError, ValueError) as e:
            logger.error(f"easgate: tls.session_ticket_key: {e}; keeping the current key")
            return
        self._stamp = stamp
        if key != self.key:
            self.key = key
            if self.install(ctx):
                logger.info(f"easgate: TLS session ticket key rotated from {self.file}")

    @staticmethod
    def _stat(path: Path) -> tuple | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

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
    """Verifies a presented chain against the configured trust anchors (device CA, root CA), and
    holds the per-CA revocation settings (`revocation`: None when every CA has revocation off)."""

    def __init__(self, ca_files, stats: dict[str, int] | None = None) -> None:
        trusted = [t if isinstance(t, TrustedCa) else TrustedCa(Path(t)) for t in ca_files]
        anchors: list[x509.Certificate] = []
        policies: list[revocation.CaPolicy] = []
        settings_of: dict[x509.Certificate, tuple[str, object]] = {}
        for t in trusted:
            certs = _load_pem_chain(t.file)
            if not certs:
                raise ConfigError(None, t.key, f"{t.file} holds no PEM certificate", "point it at the CA's PEM file")
            crl = None
            if t.revocation.crl is not None:
                try:
                    crl = revocation.CrlFile(t.revocation.crl, certs)
                except (OSError, ValueError) as e:
                    raise ConfigError(None, f"{t.key}.crl", str(e), "use the CRL this CA signed (PEM or DER), "
                                      "e.g. the device-ca.crl that `easgate pki` writes") from None
            for c in certs:
                other = settings_of.get(c)
                if other is not None and other[1] != t.revocation:
                    raise ConfigError(None, t.key, f"{c.subject.rfc4514_string()} in {t.file} is also listed at "
                                      f"{other[0]} with other revocation settings", "list each CA certificate once")
                if other is None:
                    settings_of[c] = (t.key, t.revocation)
                    anchors.append(c)
                    policies.append(revocation.CaPolicy(c, t.revocation, crl, t.key))
        self.anchors = anchors
        self.store = Store(anchors) if anchors else None
        checker = revocation.RevocationChecker(policies, stats)
        self.revocation: revocation.RevocationChecker | None = checker if checker.active else None

    def verify(self, chain: list[x509.Certificate], now: datetime.datetime | None = None) -> CertVerdict:
        return self.verify_chain(chain, now)[0]

    def verify_chain(self, chain: list[x509.Certificate], now: datetime.datetime | None = None,
                     ) -> tuple[CertVerdict, list[x509.Certificate]]:
        """The chain-only verdict, and the verified chain (leaf first, anchor last; [] if not verified)."""
        if not chain:
            return NONE_VERDICT, []
        leaf = chain[0]
        subject = leaf.subject.rfc4514_string()
        der_b64 = base64.b64encode(leaf.public_bytes(serialization.Encoding.DER)).decode()
        if self.store is None:
            return CertVerdict(INVALID, "client certificates are not trusted (no CA configured)", subject, der_b64), []
        now = now or datetime.datetime.now(datetime.UTC)
        try:
            verifier = PolicyBuilder().store(self.store).time(now).build_client_verifier()
            verified = verifier.verify(leaf, chain[1:])
        except VerificationError as e:
            reason = str(e)
            if leaf.not_valid_after_utc < now:
                reason = f"certificate expired {leaf.not_valid_after_utc:%Y-%m-%d}"
            elif leaf.not_valid_before_utc > now:
                reason = f"certificate not valid before {leaf.not_valid_before_utc:%Y-%m-%d}"
            return CertVerdict(INVALID, reason, subject, der_b64), []
        except Exception as e:  # a certificate cryptography can't even read is not a verified one
            return CertVerdict(INVALID, f"unverifiable certificate: {e}", subject, der_b64), []
        return CertVerdict(VERIFIED, "verified", subject, der_b64), list(verified.chain)

    def with_revocation(self, v: CertVerdict, mode: str, answer) -> CertVerdict:
        """The chain verdict `v` once the revocation answer is in (see revocation.judge)."""
        if v.status != VERIFIED or mode == "off" or answer is None:
            return v
        ok, reason = revocation.judge(mode, answer)
        return CertVerdict(VERIFIED if ok else INVALID, reason, v.subject, v.der_b64)


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


def build_client_context(cfg: TlsConfig, stats: dict[str, int] | None = None,
                         ) -> tuple[SSL.Context, ClientCertVerifier | None]:
    """One server-side TLS context for every client connection (`stats`: revocation counters)."""
    certs, key = load_server_identity(cfg)
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION if cfg.min_version == "TLS1_3" else SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION)
    # Free the read/write buffers of idle connections: a held ActiveSync Ping is mostly idle
    # (measured: 146 -> 106 KB per held Ping).
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
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
        verifier = ClientCertVerifier(cc.trusted_cas(), stats)
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


class CertRejected:
    """Why OpenSSL refused a client certificate, kept on the SSL connection (its app data) so the
    handshake failure is logged with the certificate's subject and the reason: mitmproxy's own line
    ("the client may not trust the proxy's certificate") would blame the gateway's certificate."""

    def __init__(self, what: str, subject: str, reason: str) -> None:
        self.what, self.subject, self.reason = what, subject, reason

    @property
    def handshake_failure(self) -> str:  # read by mitmcompat's handshake-error patch
        return f"{self.what} {self.subject}, rejected: {self.reason}"


def _openssl_verdict(conn, cert, errno, depth, ok) -> bool:
    # First line of defence: a chain that does not verify fails the handshake ("a bad one is not").
    if not ok and conn.get_app_data() is None:
        # OpenSSL stops at the first failure: at depth > 0 the client's own certificate has not been
        # looked at (nor is the chain available yet), so the failing one is named.
        try:
            subject = cert.to_cryptography().subject.rfc4514_string() or "(empty subject)"
        except Exception:
            subject = "(unreadable certificate)"
        what = "client certificate" if depth == 0 else f"client certificate chain: the certificate {depth} above the client's,"
        conn.set_app_data(CertRejected(what, subject, mitmcompat.verify_error_string(errno)))
    return bool(ok)


def _accept_for_python_check(conn, cert, errno, depth, ok) -> bool:
    # on_invalid: untrusted — the handshake proceeds; the Python check marks the connection.
    return True


class TlsOffload:
    """Serves the operator's certificate and records one client-certificate verdict per connection.

    The verdict is made in the `tls_established_client` hook, which mitmproxy completes before it
    reads the connection's first request: the chain first, then, when the issuing CA has revocation
    checking on, its OCSP/CRL status (revocation.py), a lookup the hook returns for mitmproxy to
    await (other connections carry on meanwhile).
    `verdict()` returns it. A connection that never went through the hook (flows replayed offline)
    gets the chain-only verdict marked "revocation not checked (offline)": not verified when the
    CA's revocation mode is mandatory. Counters are in `revocation_stats`.
    """

    def __init__(self) -> None:
        self.context: SSL.Context | None = None
        self.verifier: ClientCertVerifier | None = None
        self.mode = "off"
        self.on_invalid = "reject"
        # client -> (config generation, verdict, revocation answer or None): connections this process
        # serves, by their id (asked several times per request: a str key, no weakref, no
        # Connection.__eq__), until client_disconnected; any other client (a flow read from a
        # file) weakly, so that nothing outlives its flow
        self.live: dict[str, tuple] = {}
        self.verdicts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.generation = 0
        self.revocation_stats: dict[str, int] = revocation.new_stats()
        self.tickets = TicketKeys()

    def prepare(self, cfg) -> Callable[[], None]:
        self.tickets.configure(cfg.tls.session_ticket_key)
        context, verifier = build_client_context(cfg.tls, self.revocation_stats)
        self.tickets.install(context)

        def swap() -> None:
            self.context, self.verifier = context, verifier
            self.mode = cfg.tls.client_certs.mode
            self.on_invalid = cfg.tls.client_certs.on_invalid
            # Open connections get their verdict recomputed against the new config when next asked;
            # the revocation answers they already have are kept (a reload sends no OCSP request).
            self.generation += 1
        return swap

    def apply(self, cfg) -> None:
        self.prepare(cfg)()

    def tls_start_client(self, tls_start) -> None:
        # Always replace whatever mitmproxy's TlsConfig prepared: its CA must never face a client.
        if self.context is None:
            raise RuntimeError("easgate TLS is not configured")
        self.tickets.maybe_rotate(self.context)
        conn = SSL.Connection(self.context)
        conn.set_accept_state()
        tls_start.ssl_conn = conn

    def tls_established_client(self, data) -> Awaitable[None] | None:
        """The chain verdict now; when the issuing CA has revocation checking on, the lookup is
        returned for mitmproxy to await (a hook that awaits nothing needs no task of its own:
        FastAddonManager.start_hook)."""
        client = data.conn
        generation = self.generation
        try:
            verdict, verified = self._chain_verdict(client)
            rc = self.verifier.revocation if self.verifier else None
            if verdict.status == VERIFIED and rc is not None:
                return self._revocation_verdict(client, generation, verdict, verified, rc)
        except Exception as e:  # never a verified certificate by accident
            self._check_failed(client, generation, e)
            return None
        self._record(client, generation, verdict, None)
        return None

    async def _revocation_verdict(self, client, generation: int, verdict: CertVerdict, verified: list,
                                  rc: revocation.RevocationChecker) -> None:
        try:
            mode, answer = await rc.check(verified)
            verdict = self.verifier.with_revocation(verdict, mode, answer)  # type: ignore[union-attr]
        except Exception as e:  # never a verified certificate by accident
            self._check_failed(client, generation, e)
            return
        self._record(client, generation, verdict, answer)

    def _check_failed(self, client, generation: int, e: Exception) -> None:
        logger.exception("easgate: client certificate check failed", exc_info=e)
        answer = revocation.not_checked(f"revocation check failed ({type(e).__name__}: {e})")
        try:
            verdict = self._recompute(client, answer, "")
        except Exception:
            verdict = CertVerdict(INVALID, f"certificate check failed ({type(e).__name__}: {e})")
        self._record(client, generation, verdict, answer)

    def _record(self, client, generation: int, verdict: CertVerdict, answer) -> None:
        if client.timestamp_end is None:
            self.live[client.id] = (generation, verdict, answer)
        else:  # gone while its certificate was checked: client_disconnected has come already
            self.verdicts[client] = (generation, verdict, answer)
        who = f"client {client.peername[0] if client.peername else '?'}: certificate {verdict.subject}"
        if verdict.status == INVALID:
            logger.warning(f"{who} not verified: {verdict.reason}")
        elif answer is not None and answer.status == revocation.UNKNOWN:
            logger.warning(f"{who} accepted, revocation unknown (optional): {answer.detail}")
        elif answer is not None:
            logger.debug(f"{who}: {verdict.reason}")

    def client_disconnected(self, client) -> None:
        self.live.pop(client.id, None)
        self.verdicts.pop(client, None)

    def done(self) -> None:
        if self.revocation_stats["checks"]:
            logger.info("easgate: revocation checks: "
                        + ", ".join(f"{k}={v}" for k, v in self.revocation_stats.items()))

    def verdict(self, client) -> CertVerdict:
        """The verdict for a connection, made once per handshake (also for resumed sessions)."""
        stored = self.live.get(client.id)
        live = stored is not None
        if not live:
            stored = self.verdicts.get(client)
        if stored is not None and stored[0] == self.generation:
            return stored[1]
        answer = stored[2] if stored is not None else None
        why = ("revocation not checked (offline)" if stored is None
               else "revocation not checked (the connection predates a config reload)")
        v = self._recompute(client, answer, why)
        if live:
            self.live[client.id] = (self.generation, v, answer)
        else:
            self.verdicts[client] = (self.generation, v, answer)
        return v

    def _chain_verdict(self, client) -> tuple[CertVerdict, list]:
        chain = [c.to_cryptography() for c in (client.certificate_list or [])]
        if not chain:
            return NONE_VERDICT, []
        if self.verifier is None:
            return CertVerdict(INVALID, "client certificates are off", chain[0].subject.rfc4514_string()), []
        return self.verifier.verify_chain(chain)

    def _recompute(self, client, answer, why: str) -> CertVerdict:
        """The verdict without a revocation lookup: `answer` if there is one, else "not checked"."""
        v, verified = self._chain_verdict(client)
        rc = self.verifier.revocation if self.verifier else None
        if v.status != VERIFIED or rc is None:
            return v
        mode = rc.mode_for(verified)
        return self.verifier.with_revocation(v, mode, answer or revocation.not_checked(why))

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
