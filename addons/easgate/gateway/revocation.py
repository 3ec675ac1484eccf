"""Client-certificate revocation: OCSP and CRL, per trusted CA `off`, `optional` or `mandatory`.

The classic NetScaler binding is `-ocspCheck Optional`: a revoked device certificate must not count
as verified, but an unreachable OCSP responder must not lock every device out. easgate lets the
operator choose per trusted CA (`tls.client_certs.ca[].revocation`, see docs/revocation.md):

=============================  ============================  =====================================
answer for the leaf            optional                      mandatory
=============================  ============================  =====================================
good (OCSP good / CRL lacks)   verified                      verified
revoked (OCSP or CRL)          not verified                  not verified
no answer (OCSP "unknown",     verified, counted + logged    not verified
down, slow, garbage, bad
signature, stale, CRL expired)
=============================  ============================  =====================================

Only the leaf is checked, only after its chain verified, and the CA that issued it (matched by name
and key in the verified chain; an issuer the config doesn't list inherits from the nearest listed
CA above it) decides the mode. Sources: the CA's CRL file (signature verified with the CA's key,
reloaded when the file changes, at most one stat per second) and its OCSP responder (the config's
`ocsp_url`, else the certificate's AIA). Revoked by either is revoked; good by either (and revoked
by neither) is good; otherwise there is no answer.

OCSP is asynchronous (asyncio streams + h11, `asyncio.timeout`), so a slow responder delays only the
handshake that waits for it. Answers are verified (signed by the CA itself, or by a responder
certificate in the response that the CA issued with the OCSPSigning EKU; the signature checked
with `cryptography`'s public-key API), must be fresh (thisUpdate/nextUpdate, 5 minutes of clock
skew), and are cached per (issuer key, serial) until nextUpdate, at most `ocsp_cache_max_s`, in a
bounded LRU (one per gateway process). Concurrent lookups of one certificate share one request.
A certificate listed in a signed CRL stays revoked after that CRL expires. Nothing here imports
mitmproxy: `tls.TlsOffload` calls `RevocationChecker.check` from its async
`tls_established_client` hook and turns the `Answer` into the connection's verdict with `judge`.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import time
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import h11
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import (
    dsa,
    ec,
    ed448,
    ed25519,
    padding,
    rsa,
)
from cryptography.x509 import ocsp
from cryptography.x509.oid import (
    AuthorityInformationAccessOID,
    ExtendedKeyUsageOID,
    SignatureAlgorithmOID,
)

from .config import Revocation

logger = logging.getLogger(__name__)

GOOD = "good"
REVOKED = "revoked"
UNKNOWN = "unknown"  # no usable answer: not good, not revoked

#: Clock skew tolerated on thisUpdate / nextUpdate (OpenSSL's `ocsp -validity_period` default).
SKEW = datetime.timedelta(minutes=5)
#: A response without nextUpdate is accepted while its thisUpdate is younger than this.
MAX_AGE_WITHOUT_NEXT_UPDATE = datetime.timedelta(days=1)
#: Most OCSP answers kept (LRU); each is a few hundred bytes.
CACHE_ENTRIES = 20_000
#: Largest OCSP response read from a responder.
MAX_RESPONSE_BYTES = 256 * 1024
#: A CRL file is stat()ed at most this often.
CRL_STAT_INTERVAL_S = 1.0

STATS_KEYS = ("checks", "good", "revoked", "unknown", "errors", "cache_hits", "coalesced")


def new_stats() -> dict[str, int]:
    """checks = good + revoked + unknown (final answers, one per checked handshake); errors counts
    every source that failed (responder down/slow/garbage/stale/forged, CRL unusable/expired);
    cache_hits are OCSP answers served from the cache, coalesced the lookups that joined one
    already in flight."""
    return dict.fromkeys(STATS_KEYS, 0)


@dataclass(frozen=True, slots=True)
class Answer:
    """The revocation status of one certificate: from one source, or all of them combined."""

    status: str  # good | revoked | unknown
    source: str  # "OCSP", "CRL", "OCSP+CRL", or "" when nothing answered
    detail: str = ""  # why there is no answer, or when the certificate was revoked
    checked: bool = True  # False: no check was made (offline replay, config reloaded)


def not_checked(why: str) -> Answer:
    return Answer(UNKNOWN, "", why, checked=False)


def judge(mode: str, answer: Answer) -> tuple[bool, str]:
    """(still verified?, reason) for a chain-verified certificate with this revocation answer."""
    if answer.status == GOOD:
        return True, f"verified; not revoked ({answer.source})"
    if answer.status == REVOKED:
        return False, f"certificate revoked ({answer.source})" + (f" {answer.detail}" if answer.detail else "")
    if not answer.checked:
        return (mode != "mandatory"), ("verified; " if mode != "mandatory" else "") + answer.detail
    if mode == "mandatory":
        return False, f"revocation status unavailable: {answer.detail}"
    return True, f"verified; revocation unknown: {answer.detail}"


# ------------------------------------------------------------------------------------------------
# Identities


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def ca_id(cert: x509.Certificate) -> tuple[bytes, bytes]:
    """A CA as an issuer: its name and its key (what AKI/SKI stand for, without trusting the labels)."""
    return cert.subject.public_bytes(), _spki(cert)


def _key_hash(cert: x509.Certificate) -> bytes:
    """SHA-1 of the subjectPublicKey bits: OCSP's ResponderID byKey (= RFC 5280 SKI method 1)."""
    return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest


def ocsp_urls(cert: x509.Certificate) -> list[str]:
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return []
    urls = [d.access_location.value for d in aia
            if d.access_method == AuthorityInformationAccessOID.OCSP
            and isinstance(d.access_location, x509.UniformResourceIdentifier)]
    return sorted(urls, key=lambda u: not u.lower().startswith("http://"))  # usable ones first


def _utc(dt: datetime.datetime) -> str:
    return dt.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _revoked_detail(when: datetime.datetime | None, reason: x509.ReasonFlags | None) -> str:
    parts = []
    if when is not None:
        parts.append(f"on {_utc(when)}")
    if reason is not None and reason != x509.ReasonFlags.unspecified:
        parts.append(f"({reason.value})")
    return " ".join(parts)


# ------------------------------------------------------------------------------------------------
# CRL


class CrlFile:
    """One CRL file of one configured CA, verified with that CA's key and reloaded when it changes."""

    def __init__(self, path: Path, cas: list[x509.Certificate]) -> None:
        self.path = path
        self.cas = cas  # the certificates of the CA entry; the CRL must be signed by one of them
        self.crl: x509.CertificateRevocationList | None = None
        self.issuer: tuple[bytes, bytes] | None = None
        self.error: str | None = None
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._stamp, self.crl, self.issuer = self._load()  # a bad file at startup is a config error

    def _load(self):
        st = os.stat(self.path)
        data = self.path.read_bytes()
        try:
            crl = x509.load_pem_x509_crl(data) if b"-----BEGIN" in data else x509.load_der_x509_crl(data)
        except ValueError as e:
            raise ValueError(f"{self.path} is not a CRL (PEM or DER): {e}") from None
        for ca in self.cas:
            if crl.issuer == ca.subject and crl.is_signature_valid(ca.public_key()):
                break
        else:
            raise ValueError(f"{self.path} is not signed by {' or '.join(c.subject.rfc4514_string() for c in self.cas)} "
                             f"(it names {crl.issuer.rfc4514_string()})")
        try:
            crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
            raise ValueError(f"{self.path} is a delta CRL; easgate needs the full CRL")
        except x509.ExtensionNotFound:
            pass
        return (st.st_mtime_ns, st.st_size, st.st_ino), crl, ca_id(ca)

    def refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < CRL_STAT_INTERVAL_S:
            return
        self._checked = now
        try:
            st = os.stat(self.path)
            if (st.st_mtime_ns, st.st_size, st.st_ino) == self._stamp:
                return
            self._stamp, self.crl, self.issuer = self._load()
            self.error = None
            logger.info(f"easgate: reloaded CRL {self.path} ({len(self.crl)} revoked, next update "
                        f"{_utc(self.crl.next_update_utc) if self.crl.next_update_utc else 'none'})")
        except (OSError, ValueError) as e:
            # Keep the last good CRL (its own nextUpdate still limits it); say so once per change.
            try:
                st = os.stat(self.path)
                self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            except OSError:
                self._stamp = None
            self.error = str(e)
            logger.warning(f"easgate: CRL {self.path} not reloaded: {e}"
                           + ("; keeping the previous one" if self.crl is not None else ""))

    def applies_to(self, issuer: x509.Certificate) -> bool:
        return self.issuer == ca_id(issuer)

    def status(self, leaf: x509.Certificate, now: datetime.datetime) -> Answer:
        self.refresh()
        crl = self.crl
        if crl is None:
            return Answer(UNKNOWN, "CRL", f"CRL {self.path.name} unusable: {self.error}")
        r = crl.get_revoked_certificate_by_serial_number(leaf.serial_number)
        reason = None
        if r is not None:
            try:
                reason = r.extensions.get_extension_for_class(x509.CRLReason).value.reason
            except x509.ExtensionNotFound:
                pass
            if reason == x509.ReasonFlags.remove_from_crl:
                r = None
        # A revocation is final: listed in a signed CRL is revoked, even in an expired one
        # (except certificateHold, which may have been released since).
        nu = crl.next_update_utc
        expired = nu is not None and nu < now
        if r is not None and not (expired and reason == x509.ReasonFlags.certificate_hold):
            return Answer(REVOKED, "CRL", _revoked_detail(r.revocation_date_utc, reason))
        if expired:
            return Answer(UNKNOWN, "CRL", f"CRL {self.path.name} expired {_utc(nu)}")
        if crl.last_update_utc > now + SKEW:
            return Answer(UNKNOWN, "CRL", f"CRL {self.path.name} not valid before {_utc(crl.last_update_utc)}")
        return Answer(GOOD, "CRL")


# ------------------------------------------------------------------------------------------------
# OCSP


class OcspError(Exception):
    """No usable OCSP answer; str() is the one-line reason."""


async def http_post(url: str, body: bytes, content_type: str) -> bytes:
    """One HTTP/1.1 POST over asyncio streams; the caller bounds it with asyncio.timeout."""
    u = urllib.parse.urlsplit(url)
    if u.scheme != "http" or not u.hostname:
        raise OcspError(f"unsupported OCSP URL {url} (only http://)")
    try:
        port = u.port or 80
    except ValueError:
        raise OcspError(f"invalid port in OCSP URL {url}") from None
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")
    try:
        reader, writer = await asyncio.open_connection(u.hostname, port)
    except OSError as e:
        raise OcspError(f"cannot connect: {e.strerror or e}") from None
    try:
        conn = h11.Connection(h11.CLIENT)
        host = u.netloc.rpartition("@")[2]
        writer.write(conn.send(h11.Request(method="POST", target=target, headers=[
            ("Host", host), ("Content-Type", content_type), ("Accept", "application/ocsp-response"),
            ("Content-Length", str(len(body))), ("Connection", "close"), ("User-Agent", "easgate")])))
        writer.write(conn.send(h11.Data(data=body)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
        status, chunks, size = None, [], 0
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as e:
                raise OcspError(f"not an HTTP answer ({e})") from None
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_RESPONSE_BYTES:
                    raise OcspError(f"answer larger than {MAX_RESPONSE_BYTES} bytes")
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise OcspError("connection closed before an answer")
        if status != 200:
            raise OcspError(f"HTTP {status}")
        return b"".join(chunks)
    except OSError as e:
        raise OcspError(f"connection failed: {e.strerror or e}") from None
    finally:
        writer.close()


def verify_signature(key, signature: bytes, data: bytes, algorithm: hashes.HashAlgorithm | None,
                     oid: x509.ObjectIdentifier) -> None:
    """Raises InvalidSignature unless `key` signed `data` (the algorithms of X.509 signatures)."""
    if isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
        if oid == SignatureAlgorithmOID.RSASSA_PSS:
            pad = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=padding.PSS.AUTO)
        else:
            pad = padding.PKCS1v15()
        key.verify(signature, data, pad, algorithm)
    elif isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
        key.verify(signature, data, ec.ECDSA(algorithm))
    elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        key.verify(signature, data)
    elif isinstance(key, dsa.DSAPublicKey) and algorithm is not None:
        key.verify(signature, data, algorithm)
    else:
        raise InvalidSignature(f"unsupported signature algorithm {oid.dotted_string}")


def _responder_is(resp: ocsp.OCSPResponse, cert: x509.Certificate) -> bool:
    if resp.responder_name is not None:
        return resp.responder_name == cert.subject
    return resp.responder_key_hash == _key_hash(cert)


def check_response_signer(resp: ocsp.OCSPResponse, issuer: x509.Certificate, now: datetime.datetime) -> None:
    """Raises OcspError unless the CA itself, or a responder it delegated to, signed the response."""
    signer = None
    if _responder_is(resp, issuer):
        signer = issuer
    else:
        for c in resp.certificates:
            if not _responder_is(resp, c):
                continue
            try:
                c.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
                raise OcspError(f"responder certificate {c.subject.rfc4514_string()} was not issued by the CA") from None
            try:
                eku = c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            except x509.ExtensionNotFound:
                eku = []
            if ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
                raise OcspError(f"responder certificate {c.subject.rfc4514_string()} lacks the OCSPSigning EKU")
            if not (c.not_valid_before_utc - SKEW <= now <= c.not_valid_after_utc + SKEW):
                raise OcspError(f"responder certificate {c.subject.rfc4514_string()} is not valid now")
            signer = c
            break
    if signer is None:
        raise OcspError("signed by a responder that is neither the CA nor delegated by it")
    try:
        verify_signature(signer.public_key(), resp.signature, resp.tbs_response_bytes,
                         resp.signature_hash_algorithm, resp.signature_algorithm_oid)
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
        raise OcspError("bad signature") from None


def parse_response(der: bytes, leaf: x509.Certificate, issuer: x509.Certificate,
                   now: datetime.datetime) -> tuple[Answer, datetime.datetime | None]:
    """The verified answer for `leaf` in an OCSP response, and its nextUpdate; raises OcspError."""
    try:
        resp = ocsp.load_der_ocsp_response(der)
    except ValueError:
        raise OcspError("garbage instead of an OCSP response") from None
    if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise OcspError(f"responder answered {resp.response_status.name.lower()}")
    check_response_signer(resp, issuer, now)
    single = None
    for s in resp.responses:
        if s.serial_number != leaf.serial_number:
            continue
        try:
            want = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, s.hash_algorithm).build()
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
        if (s.issuer_key_hash, s.issuer_name_hash) == (want.issuer_key_hash, want.issuer_name_hash):
            single = s
            break
    if single is None:
        raise OcspError("the response is not about this certificate")
    this, nxt = single.this_update_utc, single.next_update_utc
    if this > now + SKEW:
        raise OcspError(f"response not valid before {_utc(this)}")
    if nxt is not None and nxt < now - SKEW:
        raise OcspError(f"stale response (nextUpdate {_utc(nxt)})")
    if nxt is None and this < now - MAX_AGE_WITHOUT_NEXT_UPDATE:
        raise OcspError(f"stale response (thisUpdate {_utc(this)}, no nextUpdate)")
    st = single.certificate_status
    if st == ocsp.OCSPCertStatus.GOOD:
        return Answer(GOOD, "OCSP"), nxt
    if st == ocsp.OCSPCertStatus.REVOKED:
        return Answer(REVOKED, "OCSP", _revoked_detail(single.revocation_time_utc, single.revocation_reason)), nxt
    return Answer(UNKNOWN, "OCSP", "OCSP responder does not know the certificate (status unknown)"), nxt


class OcspClient:
    """OCSP lookups with a bounded answer cache and one request in flight per certificate."""

    def __init__(self, stats: dict[str, int], max_entries: int = CACHE_ENTRIES) -> None:
        self.stats = stats
        self.max_entries = max_entries
        self.cache: OrderedDict[tuple, tuple[float, Answer]] = OrderedDict()
        self.inflight: dict[tuple, asyncio.Future] = {}

    def cached(self, key: tuple) -> Answer | None:
        hit = self.cache.get(key)
        if hit is None:
            return None
        if hit[0] <= time.monotonic():
            del self.cache[key]
            return None
        self.cache.move_to_end(key)
        return hit[1]

    async def status(self, leaf: x509.Certificate, issuer: x509.Certificate, url: str,
                     timeout_s: float, cache_max_s: float) -> Answer:
        key = (ca_id(issuer), leaf.serial_number, url)
        if (a := self.cached(key)) is not None:
            self.stats["cache_hits"] += 1
            return a
        fut = self.inflight.get(key)
        if fut is not None:
            self.stats["coalesced"] += 1
        else:
            fut = asyncio.ensure_future(self._lookup(key, leaf, issuer, url, timeout_s, cache_max_s))
            self.inflight[key] = fut
            fut.add_done_callback(lambda _f: self.inflight.pop(key, None))
        # shield: a client that goes away mid-lookup doesn't cancel it for the others waiting
        return await asyncio.shield(fut)

    async def _lookup(self, key, leaf, issuer, url, timeout_s, cache_max_s) -> Answer:
        req = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA1()).build()
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout_s):
                der = await http_post(url, req.public_bytes(serialization.Encoding.DER), "application/ocsp-request")
            now = datetime.datetime.now(datetime.UTC)
            answer, next_update = parse_response(der, leaf, issuer, now)
        except TimeoutError:
            self.stats["errors"] += 1
            return Answer(UNKNOWN, "OCSP", f"OCSP responder {url} did not answer within {timeout_s * 1000:.0f} ms")
        except OcspError as e:
            self.stats["errors"] += 1
            return Answer(UNKNOWN, "OCSP", f"OCSP responder {url}: {e}")
        except Exception as e:  # a bug here must read as "no answer", never as "good"
            self.stats["errors"] += 1
            logger.exception(f"easgate: OCSP lookup at {url} failed")
            return Answer(UNKNOWN, "OCSP", f"OCSP responder {url}: {type(e).__name__}: {e}")
        if answer.status in (GOOD, REVOKED):
            ttl = cache_max_s
            if next_update is not None:
                ttl = min(ttl, (next_update - now).total_seconds())
            if ttl > 0:
                self.remember(key, answer, started + ttl)
        return answer

    def remember(self, key: tuple, answer: Answer, expires: float) -> None:
        self.cache[key] = (expires, answer)
        self.cache.move_to_end(key)
        while len(self.cache) > self.max_entries:
            self.cache.popitem(last=False)


# ------------------------------------------------------------------------------------------------
# Per-CA policy and the checker


@dataclass
class CaPolicy:
    cert: x509.Certificate
    settings: Revocation
    crl: CrlFile | None
    key: str  # config key, for messages


class RevocationChecker:
    """Decides, per verified chain, which CA's settings apply and what the leaf's status is."""

    def __init__(self, policies: list[CaPolicy], stats: dict[str, int] | None = None) -> None:
        self.by_id: dict[tuple[bytes, bytes], CaPolicy] = {ca_id(p.cert): p for p in policies}
        self.stats = stats if stats is not None else new_stats()
        self.ocsp = OcspClient(self.stats)

    @property
    def active(self) -> bool:
        return any(p.settings.mode != "off" for p in self.by_id.values())

    def policy_for(self, chain: list[x509.Certificate]) -> CaPolicy | None:
        """The settings of the leaf's issuer, or of the nearest configured CA above it."""
        for ca in chain[1:]:
            p = self.by_id.get(ca_id(ca))
            if p is not None:
                return p
        return None

    def mode_for(self, chain: list[x509.Certificate]) -> str:
        p = self.policy_for(chain) if len(chain) > 1 else None
        return p.settings.mode if p else "off"

    async def check(self, chain: list[x509.Certificate]) -> tuple[str, Answer | None]:
        """(mode, answer) for the leaf of a verified chain (leaf first, trust anchor last)."""
        p = self.policy_for(chain) if len(chain) > 1 else None
        if p is None or p.settings.mode == "off":
            return "off", None
        leaf, issuer = chain[0], chain[1]
        s = p.settings
        self.stats["checks"] += 1
        now = datetime.datetime.now(datetime.UTC)
        answers: list[Answer] = []
        if p.crl is not None and p.crl.applies_to(issuer):
            answers.append(p.crl.status(leaf, now))
            if answers[-1].status == UNKNOWN:
                self.stats["errors"] += 1
        if s.ocsp and not any(a.status == REVOKED for a in answers):
            urls = [s.ocsp_url] if s.ocsp_url else ocsp_urls(leaf)
            if urls:
                answers.append(await self.ocsp.status(leaf, issuer, urls[0], s.ocsp_timeout_ms / 1000,
                                                      s.ocsp_cache_max_s))
        answer = combine(answers)
        self.stats[answer.status] += 1
        return s.mode, answer


def combine(answers: list[Answer]) -> Answer:
    for a in answers:
        if a.status == REVOKED:
            return a
    good = [a.source for a in answers if a.status == GOOD]
    if good:
        return Answer(GOOD, "+".join(good))
    if not answers:
        return Answer(UNKNOWN, "", "no OCSP URL in the certificate, none configured, and no CRL for its issuer")
    return Answer(UNKNOWN, "+".join(a.source for a in answers), "; ".join(a.detail for a in answers))
