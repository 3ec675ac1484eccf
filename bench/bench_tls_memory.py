"""OpenSSL's memory per held connection, in one process, side by side: what a held Ping's two TLS
connections (the client's, the upstream's) keep in the gateway after the request went through.

    .venv/bin/python bench/bench_tls_memory.py               # every variant, 500 connections each (~1 min)
    .venv/bin/python bench/bench_tls_memory.py --n 1000 --only client-now,upstream-now

Each variant makes `--n` pyOpenSSL connections exactly as the gateway does (memory BIOs,
SSL_MODE_RELEASE_BUFFERS; the client side from `tls.build_client_context`, the upstream side from
mitmproxy's `create_proxy_server_context` with `mitmcompat.verify_upstream_name`), completes each
handshake against a peer made with Python's `ssl` module (a different OpenSSL: the stdlib's), sends a
Ping request's bytes through it, then frees the peer: what remains is what the gateway holds for as
long as the Ping is held. glibc's malloc in use (mallinfo2) before and after, divided by `--n`.

Bytes, not time. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import ssl
import sys
import tempfile
import time
from pathlib import Path

from mitmproxy import certs
from mitmproxy.net import tls as net_tls
from OpenSSL import SSL

from easgate.gateway import mitmcompat
from easgate.gateway.config import ClientCerts, TlsConfig
from easgate.gateway.tls import build_client_context
from easgate.tools.pki import generate_pki

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

REQUEST = (b"POST /Microsoft-Server-ActiveSync?Cmd=Ping&User=u&DeviceId=ApplHOLD00000001&DeviceType=iPhone "
           b"HTTP/1.1\r\nHost: mail.example.test\r\nMS-ASProtocolVersion: 16.1\r\nUser-Agent: Apple-iPhone/1\r\n"
           b"Authorization: Basic dXNlcjpwYXNz\r\nContent-Type: application/vnd.ms-sync.wbxml\r\n"
           b"Content-Length: 4\r\n\r\n\x03\x01\x6a\x00")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL(None)
_libc.mallinfo2.restype = _Mallinfo2


def malloc_in_use() -> int:
    mi = _libc.mallinfo2()
    return mi.uordblks + mi.hblkhd


def pump(a_out, b_in) -> bool:
    """Move what `a_out()` has into `b_in`; True if anything moved."""
    data = a_out()
    if data:
        b_in(data)
        return True
    return False


def py_out(obj: ssl.MemoryBIO):
    return lambda: obj.read()


def ossl_out(conn: SSL.Connection):
    def read() -> bytes:
        out = b""
        while True:
            try:
                chunk = conn.bio_read(65535)
            except SSL.WantReadError:
                return out
            if not chunk:
                return out
            out += chunk
    return read


def step_ossl(conn: SSL.Connection) -> None:
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        pass


def step_py(obj: ssl.SSLObject) -> None:
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass


def handshake(conn: SSL.Connection, peer: ssl.SSLObject, pin: ssl.MemoryBIO, pout: ssl.MemoryBIO) -> None:
    for _ in range(20):
        step_ossl(conn)
        moved = pump(ossl_out(conn), pin.write)
        step_py(peer)
        moved |= pump(py_out(pout), conn.bio_write)
        step_ossl(conn)
        moved |= pump(ossl_out(conn), pin.write)
        if not moved:
            break


def read_all_ossl(conn: SSL.Connection) -> bytes:
    out = b""
    while True:
        try:
            out += conn.recv(65535)
        except (SSL.WantReadError, SSL.ZeroReturnError):
            return out


class Pki:
    def __init__(self, d: Path) -> None:
        self.dir = d
        generate_pki(d)


def client_side(pki: Path, variant: str):
    """The client-facing connection (gateway = TLS server), as tls.TlsOffload makes it."""
    cfg = TlsConfig(certificate=pki / "gateway-full.pem", key=None,
                    client_certs=ClientCerts(mode="optional", ca=(pki / "device-ca.pem", pki / "root-ca.pem")))
    ctx, _ = build_client_context(cfg)
    peer_ctx = ssl.create_default_context(cafile=str(pki / "public-ca.pem"))
    if variant.endswith("tls12"):
        peer_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if "cert" in variant:  # a managed phone: the demo iPhone's certificate and its device CA
        peer_ctx.load_cert_chain(str(pki / "device-iphone-bundle.pem"), str(pki / "device-iphone.key"))

    def one():
        conn = SSL.Connection(ctx)
        conn.set_accept_state()
        pin, pout = ssl.MemoryBIO(), ssl.MemoryBIO()
        peer = peer_ctx.wrap_bio(pin, pout, server_hostname="mail.example.test")
        handshake(conn, peer, pin, pout)
        if "keep-bios" not in variant:
            assert mitmcompat.fresh_bios(conn)  # mitmcompat's receive_handshake_data
        peer.write(REQUEST)
        pump(py_out(pout), conn.bio_write)
        got = read_all_ossl(conn)
        assert got == REQUEST, got[:80]
        pump(ossl_out(conn), pin.write)  # tickets etc.
        if "cert" in variant:
            assert conn.get_peer_certificate() is not None
        if "mitmproxy" in variant:  # what mitmproxy's TLS layer keeps on the Client (certificate_list)
            conn.kept = [certs.Cert(c) for c in conn.get_peer_cert_chain(as_cryptography=True)]
        return conn
    return one


def client_side_pq(pki: Path, variant: str):
    """The client-facing connection against a phone whose TLS offers X25519MLKEM768 (OpenSSL 3.5+'s
    defaults, as recent iOS and Android do): the gateway's OpenSSL picks it."""
    cfg = TlsConfig(certificate=pki / "gateway-full.pem", key=None,
                    client_certs=ClientCerts(mode="optional", ca=(pki / "device-ca.pem", pki / "root-ca.pem")))
    ctx, _ = build_client_context(cfg)
    peer_ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)

    def one():
        conn = SSL.Connection(ctx)
        conn.set_accept_state()
        peer = SSL.Connection(peer_ctx)
        peer.set_connect_state()
        for _ in range(10):
            for a, b in ((peer, conn), (conn, peer)):
                step_ossl(a)
                pump(ossl_out(a), b.bio_write)
        read_all_ossl(conn)
        group = SSL._ffi.string(SSL._lib.SSL_get0_group_name(conn._ssl)).decode()
        assert group == "X25519MLKEM768", group
        assert mitmcompat.fresh_bios(conn)
        peer.sendall(REQUEST)
        pump(ossl_out(peer), conn.bio_write)
        assert read_all_ossl(conn) == REQUEST
        return conn
    return one


def upstream_side(pki: Path, variant: str):
    """The upstream connection (gateway = TLS client), as addon.UpstreamPools.tls_start_server makes it."""
    max_version = net_tls.Version.TLS1_2 if variant.endswith("tls12") else net_tls.Version.UNBOUNDED
    ctx = net_tls.create_proxy_server_context(
        method=net_tls.Method.TLS_CLIENT_METHOD, min_version=net_tls.Version.TLS1_2, max_version=max_version,
        cipher_list=None, ecdh_curve=None, verify=net_tls.Verify.VERIFY_PEER, ca_path=None,
        ca_pemfile=str(pki / "internal-ca.pem"), client_cert=None, legacy_server_connect=False)
    peer_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    peer_ctx.load_cert_chain(str(pki / "exchange.pem"), str(pki / "exchange.key"))

    session = []

    def one():
        conn = SSL.Connection(ctx)
        if "resumed" in variant and session:
            conn.set_session(session[0])
        mitmcompat.verify_upstream_name(conn, "exchange.internal")
        conn.set_alpn_protos([b"http/1.1"])
        conn.set_connect_state()
        if "two-shares" not in variant and "late" not in variant:
            mitmcompat.one_key_share(conn)  # tls_start_server: no ML-KEM key share kept
        if "late" not in variant:
            mitmcompat.release_buffers(conn)  # tls_start_server, before the handshake
        pin, pout = ssl.MemoryBIO(), ssl.MemoryBIO()
        peer = peer_ctx.wrap_bio(pin, pout, server_side=True)
        handshake(conn, peer, pin, pout)
        read_all_ossl(conn)  # mitmproxy reads on after the handshake: the server's session tickets
        if "keep-bios" not in variant and "late" not in variant:
            assert mitmcompat.fresh_bios(conn)  # mitmcompat's receive_handshake_data
        if "late" in variant:
            mitmcompat.release_buffers(conn)  # main before mem18: in tls_established_server
        conn.sendall(REQUEST)
        pump(ossl_out(conn), pin.write)
        got = b""
        while len(got) < len(REQUEST):
            got += peer.read(65535)
        pump(py_out(pout), conn.bio_write)  # session tickets the server sent after the handshake
        read_all_ossl(conn)
        if "resumed" in variant:
            if session:
                assert SSL._lib.SSL_session_reused(conn._ssl), "not resumed"
            else:
                session.append(conn.get_session())
        return conn
    return one


VARIANTS = {
    "client-keep-bios": lambda pki: client_side(pki, "keep-bios"),
    "client": lambda pki: client_side(pki, ""),
    "client-tls12": lambda pki: client_side(pki, "tls12"),
    "client-pq-phone": lambda pki: client_side_pq(pki, ""),
    "client-cert": lambda pki: client_side(pki, "cert"),
    "client-cert-mitmproxy": lambda pki: client_side(pki, "cert-mitmproxy"),
    "upstream-late": lambda pki: upstream_side(pki, "late"),
    "upstream-two-shares": lambda pki: upstream_side(pki, "two-shares-keep-bios"),
    "upstream-keep-bios": lambda pki: upstream_side(pki, "keep-bios"),
    "upstream": lambda pki: upstream_side(pki, ""),
    "upstream-tls12": lambda pki: upstream_side(pki, "tls12"),
    "upstream-resumed": lambda pki: upstream_side(pki, "resumed"),
    "upstream-resumed-tls12": lambda pki: upstream_side(pki, "resumed-tls12"),
}


def measure(make, n: int) -> float:
    held = [make() for _ in range(5)]  # warm-up: contexts, caches
    gc.collect()
    before = malloc_in_use()
    held += [make() for _ in range(n)]
    gc.collect()
    after = malloc_in_use()
    del held
    gc.collect()
    return (after - before) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--only", default="", help="comma-separated variants (default: all): " + ", ".join(VARIANTS))
    ap.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md (clean tree only)")
    ap.add_argument("--leak", help="make --n connections of this one variant and exit without freeing "
                    "them (for `heaptrack` / `heaptrack_print --print-leaks`: who allocated what they hold)")
    args = ap.parse_args()
    if args.leak:
        with tempfile.TemporaryDirectory(prefix="easgate-bench-tlsmem-") as tmp:
            generate_pki(Path(tmp))
            make = VARIANTS[args.leak](Path(tmp))
            held = [make() for _ in range(args.n)]
            gc.collect()
            os._exit(0 if held else 1)
    names = [v for v in args.only.split(",") if v] or list(VARIANTS)
    benchlib.refuse_dirty_write(args.write, "bench_tls_memory.py")
    out = [f"## OpenSSL's memory per held connection (bench/bench_tls_memory.py, {time.strftime('%Y-%m-%d')}, "
           f"commit {benchlib.commit()})", "",
           f"Python {sys.version.split()[0]}; OpenSSL (gateway, cryptography's): "
           f"{SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()}; peer (Python's ssl): {ssl.OPENSSL_VERSION}. "
           f"{args.n} connections per variant, each made as the gateway makes it; glibc malloc in use after, per "
           "connection (the variants: this script's docstring and VARIANTS).", "",
           "| variant | malloc per connection |", "|---|---:|"]
    print("\n".join(out), flush=True)
    with tempfile.TemporaryDirectory(prefix="easgate-bench-tlsmem-") as tmp:
        pki = Path(tmp)
        generate_pki(pki)
        for name in names:
            per = measure(VARIANTS[name](pki), args.n)
            out.append(f"| {name} | {per / 1024:.1f} KB |")
            print(out[-1], flush=True)
    if args.write:
        benchlib.append("\n".join(out), "bench_tls_memory.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
