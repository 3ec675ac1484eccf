"""The JWKS behind Bearer users: fetched off the event loop, bounded in time and size, cached and
refreshed, the last good keys kept when a refresh fails. A real HTTP server on loopback that
misbehaves on purpose; the validator's clock is injected, so no test waits for a TTL."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from easgate.authz.bearer import BearerConfig, BearerValidator

ISSUER, AUDIENCE = "https://idp.example.test", "https://mail.example.test"
KEY = ec.generate_private_key(ec.SECP256R1())
JWK = {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(KEY.public_key())), "kid": "k1", "use": "sig", "alg": "ES256"}


def token(user: str = "alice@example.test", kid: str = "k1") -> str:
    now = int(time.time())
    return jwt.encode({"upn": user, "iss": ISSUER, "aud": AUDIENCE, "exp": now + 600}, KEY, algorithm="ES256",
                      headers={"kid": kid})


class Idp(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.mode = "ok"  # ok | slow | huge | error
        self.release = threading.Event()
        self.hits = 0
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/keys"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *a) -> None:
        pass

    def do_GET(self) -> None:
        srv: Idp = self.server  # type: ignore[assignment]
        srv.hits += 1
        if srv.mode == "slow":
            srv.release.wait(10)
        status, body = 200, json.dumps({"keys": [JWK]}).encode()
        if srv.mode == "huge":
            body = json.dumps({"keys": [JWK], "pad": "x" * 300_000}).encode()
        elif srv.mode == "error":
            status, body = 500, b"down"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass


@pytest.fixture
def idp():
    s = Idp()
    yield s
    s.release.set()
    s.shutdown()
    s.server_close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def validator(idp: Idp, clock: Clock | None = None, wall=time.time, **over) -> BearerValidator:
    cfg = BearerConfig(issuer=ISSUER, audience=(AUDIENCE,), jwks_url=idp.url, algorithms=("ES256",),
                       **{"refresh_s": 3600, "min_refresh_s": 30, **over})
    return BearerValidator(cfg, clock or Clock(), wall)


async def test_fetched_once_then_cached_then_refreshed(idp):
    clock = Clock()
    v = validator(idp, clock)
    for _ in range(3):
        assert await v.user(token()) == ("alice@example.test", None)
    assert idp.hits == 1
    clock.now += 3601
    assert await v.user(token()) == ("alice@example.test", None)
    assert idp.hits == 2


async def test_concurrent_tokens_share_one_fetch(idp):
    v = validator(idp)
    results = await asyncio.gather(*(v.user(token()) for _ in range(20)))
    assert all(r == ("alice@example.test", None) for r in results)
    assert idp.hits == 1


async def test_a_failed_refresh_keeps_the_last_good_keys(idp):
    clock = Clock()
    v = validator(idp, clock)
    assert (await v.user(token()))[0] == "alice@example.test"
    idp.mode = "error"
    clock.now += 3601
    assert (await v.user(token()))[0] == "alice@example.test"
    assert idp.hits == 2 and "HTTP Error 500" in (v.last_error or "")


async def test_too_large_a_key_set_is_refused(idp):
    idp.mode = "huge"
    user, why = await validator(idp, max_bytes=64 * 1024).user(token())
    assert user is None and "more than 65536 bytes" in why


async def test_a_slow_provider_neither_blocks_the_loop_nor_the_request_for_long(idp):
    """The fetch runs in a thread and gives up after fetch_timeout_ms: meanwhile the event loop keeps
    running (a ticker coroutine sees no gap anywhere near the fetch's length)."""
    idp.mode = "slow"
    v = validator(idp, fetch_timeout_ms=300)
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    t = asyncio.create_task(ticker())
    start = time.perf_counter()
    user, why = await v.user(token())
    took = time.perf_counter() - start
    done.set()
    await t
    assert user is None and "not in the JWKS" in why and "timed out" in why
    assert took < 5  # bounded by fetch_timeout_ms (+ slack), not by the provider's 10 s
    assert len(gaps) > 5 and max(gaps) < took / 2  # the loop was never held for the fetch


async def test_unknown_key_id_refetches_at_most_every_min_refresh(idp):
    clock = Clock()
    v = validator(idp, clock)
    assert (await v.user(token()))[0] is not None
    for _ in range(3):
        user, why = await v.user(token(kid="rotated"))
        assert user is None and "'rotated' not in the JWKS" in why
    assert idp.hits == 1  # within min_refresh_s of the first fetch: no new fetch
    clock.now += 31
    await v.user(token(kid="rotated"))
    assert idp.hits == 2


async def test_a_verified_token_is_remembered_until_it_expires_or_its_key_goes(idp, tmp_path):
    """The signature is checked once per token, not per request; the answer is not kept past the
    token's exp (plus leeway), nor once the key set changed (a removed key stops counting at once)."""
    wall = [time.time()]
    v = validator(idp, wall=lambda: wall[0])
    t = token()
    assert await v.user(t) == ("alice@example.test", None)
    checks = []
    real = v._check

    async def counting(tok):
        checks.append(tok)
        return await real(tok)

    v._check = counting
    assert await v.user(t) == ("alice@example.test", None)
    assert checks == []  # remembered
    wall[0] += 600 + 61  # past exp + leeway
    assert await v.user(t) == (None, "bearer token expired")

    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [JWK]}))
    f = BearerValidator(BearerConfig(issuer=ISSUER, audience=(AUDIENCE,), jwks_file=jwks, algorithms=("ES256",)))
    assert (await f.user(t))[0] == "alice@example.test"
    other = {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key())),
             "kid": "k2", "use": "sig"}
    jwks.write_text(json.dumps({"keys": [other]}))
    os.utime(jwks, (time.time() + 5, time.time() + 5))  # a new mtime even within the filesystem's resolution
    user, why = await f.user(t)
    assert user is None and "'k1' not in the JWKS" in why
