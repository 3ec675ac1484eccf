"""Bearer (OAuth) users: a JWT checked against the identity provider's keys before its user counts.

Outlook and modern-auth phones send `Authorization: Bearer <JWT>` instead of Basic. The gateway
takes the user from a claim (`upn` by default) only after PyJWT (with `cryptography`) checked the
signature with a key from the configured JWKS (a file, or a URL on the local network), the issuer,
the audience, the expiry (and `nbf`) and that the algorithm is on the allow-list, which admits
asymmetric algorithms only (an `HS256` token signed with a public key as the secret is the
classic JWT confusion attack). Nothing here hand-rolls a signature check.

A JWKS URL is fetched off the event loop (a thread), with a timeout and a size bound; the keys
are cached and re-fetched every `refresh_s`, and at most every `min_refresh_s` when a token names a
key id the cache does not know (the provider rotated its keys). Concurrent requests share one
fetch. When a fetch fails the last good keys stay in use (logged); without any keys every token is
refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from ..core.yamlfile import Node

__all__ = ["ASYMMETRIC_ALGORITHMS", "BearerConfig", "BearerValidator", "JwksError", "bearer_token", "parse_bearer"]

logger = logging.getLogger("easgate.bearer")

ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
MAX_TOKEN_CHARS = 16 * 1024
MAX_USER_CHARS = 1024
VERIFIED_CACHE = 10_000


class JwksError(Exception):
    """The key set could not be read (file, URL, JSON, keys)."""


@dataclass(frozen=True)
class BearerConfig:
    issuer: str
    audience: tuple[str, ...]
    jwks_file: Path | None = None
    jwks_url: str | None = None
    jwks_ca: Path | None = None  # CA file for an https JWKS URL; None = system trust store
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    user_claim: tuple[str, ...] = ("upn",)  # the first of these claims present is the user
    leeway_s: int = 60
    fetch_timeout_ms: int = 2000
    max_bytes: int = 256 * 1024
    refresh_s: int = 3600
    min_refresh_s: int = 30


def bearer_token(values: list[str]) -> str | None:
    """The token of an `Authorization: Bearer` header (already checked for conflicting copies)."""
    if not values:
        return None
    parts = values[0].strip().split(None, 1)
    if len(parts) == 2 and parts[0].lower() == "bearer":
        return parts[1].strip() or None
    return None


def _keyset(data: bytes, where: str) -> dict[str | None, list[tuple[jwt.PyJWK, str | None]]]:
    """kid -> keys of a JWKS document; keys PyJWT cannot use (other kty, symmetric) are skipped."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise JwksError(f"{where} is not JSON ({e})")
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise JwksError(f"{where} is not a JWKS (no 'keys' list)")
    out: dict[str | None, list[tuple[jwt.PyJWK, str | None]]] = {}
    for entry in doc["keys"]:
        if not isinstance(entry, dict) or entry.get("kty") == "oct" or entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(entry)
        except Exception:
            continue
        alg = entry.get("alg") if isinstance(entry.get("alg"), str) else None
        out.setdefault(entry.get("kid") if isinstance(entry.get("kid"), str) else None, []).append((key, alg))
    if not out:
        raise JwksError(f"{where} holds no usable signing key")
    return out


class BearerValidator:
    """`await user(token)` -> (user, None) or (None, reason)."""

    def __init__(self, cfg: BearerConfig, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.clock = clock
        self.wall = wall
        # token -> (user, exp): a phone sends the same token with every request for its lifetime;
        # checking its signature once saves ~0.2 ms per request (bench/bench_identity.py).
        self._verified: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self.keys: dict[str | None, list[tuple[jwt.PyJWK, str | None]]] = {}
        self.fetched_at: float | None = None
        self.last_error: str | None = None
        self.fetches = 0
        self._file_mtime: float | None = None
        self._inflight: asyncio.Task | None = None
        self._ssl: ssl.SSLContext | None = None
        if cfg.jwks_url and cfg.jwks_url.startswith("https:"):
            self._ssl = ssl.create_default_context(cafile=str(cfg.jwks_ca) if cfg.jwks_ca else None)
        if cfg.jwks_file is not None:
            self._load_file()  # at configure time: a broken file is a config error

    # -- keys -------------------------------------------------------------------------------

    def _load_file(self) -> None:
        path = self.cfg.jwks_file
        assert path is not None
        try:
            mtime = path.stat().st_mtime
            if mtime == self._file_mtime:
                return
            data = path.read_bytes()[: self.cfg.max_bytes + 1]
        except OSError as e:
            raise JwksError(f"cannot read {path}: {e.strerror}")
        if len(data) > self.cfg.max_bytes:
            raise JwksError(f"{path} is larger than {self.cfg.max_bytes} bytes")
        self.keys = _keyset(data, str(path))
        self._verified.clear()
        self._file_mtime = mtime
        self.fetched_at = self.clock()

    def _fetch_url(self) -> bytes:
        """Runs in a thread: one bounded GET of the JWKS URL."""
        url = self.cfg.jwks_url
        assert url is not None
        req = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "easgate"})
        timeout = self.cfg.fetch_timeout_ms / 1000
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self._ssl) as r:
                if r.status != 200:
                    raise JwksError(f"{url} answered HTTP {r.status}")
                data = r.read(self.cfg.max_bytes + 1)
        except JwksError:
            raise
        except Exception as e:
            raise JwksError(f"cannot fetch {url}: {e}")
        if len(data) > self.cfg.max_bytes:
            raise JwksError(f"{url} answered more than {self.cfg.max_bytes} bytes")
        return data

    async def _refresh_url(self) -> None:
        url = self.cfg.jwks_url
        self.fetches += 1
        try:
            async with asyncio.timeout(self.cfg.fetch_timeout_ms / 1000 + 0.5):
                data = await asyncio.to_thread(self._fetch_url)
            self.keys = _keyset(data, str(url))
            self._verified.clear()  # a key may have gone: verify every token again
            self.last_error = None
        except (JwksError, TimeoutError) as e:
            msg = str(e) or f"fetching {url} timed out after {self.cfg.fetch_timeout_ms} ms"
            self.last_error = msg
            logger.warning(f"easgate: JWKS refresh failed, {'keeping the last keys' if self.keys else 'no keys'}: {msg}")
        finally:
            self.fetched_at = self.clock()

    async def refresh(self, force: bool = False) -> None:
        """Bring the key set up to date; concurrent callers share one fetch."""
        if self.cfg.jwks_file is not None:
            try:
                self._load_file()
                self.last_error = None
            except JwksError as e:  # keep the last good keys
                self.last_error = str(e)
                logger.warning(f"easgate: JWKS reload failed, keeping the last keys: {e}")
            return
        now = self.clock()
        if self.fetched_at is not None:
            age = now - self.fetched_at
            if age < self.cfg.min_refresh_s or (not force and age < self.cfg.refresh_s):
                return
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.get_running_loop().create_task(self._refresh_url())
        await asyncio.shield(self._inflight)

    def _candidates(self, kid: Any) -> list[tuple[jwt.PyJWK, str | None]]:
        if isinstance(kid, str):
            return self.keys.get(kid, [])
        every = [k for keys in self.keys.values() for k in keys]
        return every if len(every) == 1 else []  # no kid: only an unambiguous single key

    # -- tokens -----------------------------------------------------------------------------

    async def user(self, token: str) -> tuple[str | None, str | None]:
        cfg = self.cfg
        if len(token) > MAX_TOKEN_CHARS:
            return None, f"bearer token longer than {MAX_TOKEN_CHARS} characters"
        await self.refresh()  # a changed key set drops the verified tokens
        hit = self._verified.get(token)
        if hit is not None:
            if self.wall() <= hit[1] + cfg.leeway_s:
                self._verified.move_to_end(token)
                return hit[0], None
            del self._verified[token]
            return None, "bearer token expired"
        user, why, exp = await self._check(token)
        if user is not None and exp is not None:
            self._verified[token] = (user, exp)
            if len(self._verified) > VERIFIED_CACHE:
                self._verified.popitem(last=False)
        return user, why

    def forget(self) -> None:
        """Drop the verified tokens (the key set changed: a removed key must stop counting)."""
        self._verified.clear()

    async def _check(self, token: str) -> tuple[str | None, str | None, float | None]:
        cfg = self.cfg
        try:
            header = jwt.get_unverified_header(token)
        except Exception:
            return None, "bearer token is not a JWT", None
        alg = header.get("alg")
        if alg not in cfg.algorithms:
            return None, f"bearer token algorithm {str(alg)[:20]!r} is not allowed (identity.bearer.algorithms)", None
        kid = header.get("kid")
        await self.refresh()
        keys = self._candidates(kid)
        if not keys and (isinstance(kid, str) or not self.keys):
            await self.refresh(force=True)  # the provider may have rotated its keys (or none were fetched yet)
            keys = self._candidates(kid)
        if not keys:
            what = f"key id {kid[:64]!r}" if isinstance(kid, str) else "a key id (and the key set has several keys)"
            return None, f"bearer token names {what} not in the JWKS" + (f" ({self.last_error})" if self.last_error else ""), None
        claims = None
        error = "bearer token signature does not verify"
        for key, key_alg in keys:
            if key_alg is not None and key_alg != alg:  # a key published for one algorithm only
                continue
            try:
                claims = jwt.decode(
                    token, key=key.key, algorithms=[alg], audience=list(cfg.audience), issuer=cfg.issuer,
                    leeway=cfg.leeway_s, options={"require": ["exp", "iss", "aud"], "verify_signature": True},
                )
                break
            except jwt.ExpiredSignatureError:
                return None, "bearer token expired", None
            except jwt.ImmatureSignatureError:
                return None, "bearer token not yet valid (nbf/iat)", None
            except jwt.InvalidIssuerError:
                return None, "bearer token issuer is not identity.bearer.issuer", None
            except jwt.InvalidAudienceError:
                return None, "bearer token audience is not identity.bearer.audience", None
            except jwt.MissingRequiredClaimError as e:
                return None, f"bearer token has no {e.claim} claim", None
            except jwt.InvalidSignatureError:
                continue
            except Exception as e:
                error = f"bearer token rejected ({type(e).__name__})"
                continue
        if claims is None:
            return None, error, None
        for name in cfg.user_claim:
            value = claims.get(name)
            if isinstance(value, str) and value.strip():
                value = value.strip()
                if len(value) > MAX_USER_CHARS or not value.isprintable():
                    return None, f"bearer token claim {name} is not a usable user name", None
                exp = claims.get("exp")
                return value, None, float(exp) if isinstance(exp, (int, float)) else None
        return None, f"bearer token has none of the user claims {', '.join(cfg.user_claim)}", None


# ---------------------------------------------------------------------------------------------
# Configuration

BEARER_KEYS = {
    "jwks": "the identity provider's key set: a JSON file, or an http(s):// URL on the local network",
    "jwks_ca": "CA file that verifies an https:// JWKS URL (default: the system trust store)",
    "issuer": "the token issuer (the iss claim), e.g. https://sts.contoso.com/adfs",
    "audience": "the audience (aud claim) or a list of them, e.g. https://mail.example.com",
    "algorithms": f"allowed signature algorithms, from {', '.join(ASYMMETRIC_ALGORITHMS)} (default [RS256, ES256])",
    "user_claim": "the claim (or list, first present wins) holding the user (default upn)",
    "leeway_s": "clock skew allowed on exp/nbf in seconds (default 60)",
    "fetch_timeout_ms": "JWKS URL fetch timeout (default 2000)",
    "max_bytes": "largest JWKS accepted (default 262144)",
    "refresh_s": "how often a JWKS URL is re-fetched (default 3600)",
    "min_refresh_s": "least time between two fetches, also for unknown key ids (default 30)",
}


def parse_bearer(n: Node, base: Path) -> BearerConfig:
    """`identity.bearer`; raises ConfigError."""
    n.mapping(BEARER_KEYS, required=("jwks", "issuer", "audience"))
    j = n.child("jwks")
    spec = j.str() or ""
    jwks_file, jwks_url = None, None
    if spec.startswith(("http://", "https://")):
        u = urllib.parse.urlsplit(spec)
        try:
            u.port
        except ValueError:
            raise j.err(f"'{spec}' has an invalid port", "e.g. https://adfs.contoso.internal/adfs/discovery/keys")
        if not u.hostname or u.username or u.fragment:
            raise j.err(f"'{spec}' is not a usable URL", "e.g. https://adfs.contoso.internal/adfs/discovery/keys")
        jwks_url = spec
    elif "://" in spec:
        raise j.err(f"'{spec}' is neither a file nor an http(s):// URL", "e.g. jwks.json or https://idp.internal/keys")
    else:
        jwks_file = j.path(base)
    a = n.child("algorithms")
    algs = a.strlist(("RS256", "ES256"))
    for i, alg in enumerate(algs):
        if alg not in ASYMMETRIC_ALGORITHMS:
            raise (a.child(i) if isinstance(a.value, list) else a).err(
                f"'{alg}' is not an allowed algorithm",
                f"use asymmetric ones only: {', '.join(ASYMMETRIC_ALGORITHMS)} (none and HS* are refused)")
    aud = n.child("audience").strlist()
    if not aud:
        raise n.child("audience").err("is empty", "name the audience the tokens are issued for")
    cfg = BearerConfig(
        issuer=n.child("issuer").str() or "", audience=aud, jwks_file=jwks_file, jwks_url=jwks_url,
        jwks_ca=n.child("jwks_ca").path(base), algorithms=algs,
        user_claim=n.child("user_claim").strlist(("upn",)),
        leeway_s=n.child("leeway_s").int(60, 0, 3600) or 0,
        fetch_timeout_ms=n.child("fetch_timeout_ms").int(2000, 1, 60_000) or 2000,
        max_bytes=n.child("max_bytes").int(256 * 1024, 1024, 16 * 1024 * 1024) or 256 * 1024,
        refresh_s=n.child("refresh_s").int(3600, 1, 7 * 86400) or 3600,
        min_refresh_s=n.child("min_refresh_s").int(30, 0, 86400) or 0,
    )
    if jwks_file is not None:
        try:
            BearerValidator(cfg)
        except JwksError as e:
            raise j.err(str(e), "point it at the identity provider's JWKS (a JSON document with a 'keys' list)")
    return cfg
