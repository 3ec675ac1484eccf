"""Stand-in upstreams for the demo and the tests: a small Exchange (HTTPS) and an MDM server (HTTP).

Real sockets, real TLS: they answer the way the real servers would as far as a gateway can tell,
and they remember what reached them, so a test can prove what did *not*.

`easgate standins CONFIG` starts them on the pool addresses a gateway config names (the
ActiveSync route's pool gets an Exchange stand-in, every other pool an MDM stand-in), so a config
such as policies/gateway.yaml can be tried before the real servers are connected.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import signal
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ..core.errors import ConfigError
from ..gateway.config import GatewayConfig, load_config


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: StandIn

    def log_message(self, fmt, *args) -> None:  # quiet
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(body)
                body += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _handle(self) -> None:
        body = self._read_body()
        seen = {
            "server": self.server.name,
            "method": self.command,
            "path": self.path,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body_len": len(body),
            "time": time.time(),
        }
        with self.server.lock:
            self.server.seen.append(seen)
        if self.server.echo:
            print(f"{self.server.name}: {self.command} {self.path}", flush=True)
        hold = self.server.hold_s if "Cmd=Ping" in self.path or self.path.endswith("/hold") else 0
        if hold:
            time.sleep(hold)
        status, headers, payload = self.server.answer(self, seen)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_OPTIONS = do_HEAD = do_DELETE = _handle


class QuietServer(ThreadingHTTPServer):
    """A threading HTTP server that says nothing when a peer hangs up or fails its TLS handshake:
    the gateway closes its upstream connections whenever a client of its own goes away, and a
    traceback per close on stderr buries what matters (or lands in another test's captured output)."""

    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], OSError):  # reset, broken pipe, timeout, ssl.SSLError
            return
        super().handle_error(request, client_address)


class StandIn(QuietServer):
    allow_reuse_address = True

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0, tls: tuple[Path, Path] | None = None,
                 hold_s: float = 0.0) -> None:
        super().__init__((host, port), _Handler)
        self.name = name
        self.seen: list[dict] = []
        self.lock = threading.Lock()
        self.hold_s = hold_s
        self.echo = False  # print one line per request (easgate standins)
        self.scheme = "http"
        if tls:
            sslctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            sslctx.load_cert_chain(str(tls[0]), str(tls[1]))
            self.socket = sslctx.wrap_socket(self.socket, server_side=True)
            self.scheme = "https"
        self.thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def answer(self, h: _Handler, seen: dict) -> tuple[int, dict, bytes]:
        raise NotImplementedError

    def start(self) -> StandIn:
        self.thread = threading.Thread(target=self.serve_forever, name=self.name, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def requests(self) -> list[dict]:
        with self.lock:
            return list(self.seen)


AUTODISCOVER_XML = """<?xml version="1.0" encoding="utf-8"?>
<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006">
  <Response xmlns="http://schemas.microsoft.com/exchange/autodiscover/mobilesync/responseschema/2006">
    <Culture>en:us</Culture>
    <User><DisplayName>Alice</DisplayName><EMailAddress>alice@example.test</EMailAddress></User>
    <Action>
      <Settings>
        <Server>
          <Type>MobileSync</Type>
          <Url>https://{host}/Microsoft-Server-ActiveSync</Url>
          <Name>https://{host}/Microsoft-Server-ActiveSync</Name>
        </Server>
      </Settings>
    </Action>
  </Response>
</Autodiscover>
"""


class ExchangeStandIn(StandIn):
    """Answers ActiveSync OPTIONS with the capability headers and POSTs with 200 like Exchange, and
    Autodiscover ([MS-ASCMD] 2.2.1.1 XML, and the JSON form) naming its internal host, as an Exchange
    behind a gateway does. A DeviceId in `moved` gets a 451 whose X-MS-Location names the internal
    host ([MS-ASHTTP] 3.1.5.2.2)."""

    internal_host = "exchange.internal"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.moved: set[str] = set()

    def answer(self, h, seen):
        lower = h.path.lower()
        if lower.startswith("/autodiscover/autodiscover.xml"):
            return 200, {"Content-Type": "text/xml; charset=utf-8", "X-Upstream": "exchange"}, \
                AUTODISCOVER_XML.format(host=self.internal_host).encode()
        if lower.startswith("/autodiscover/autodiscover.json"):
            body = json.dumps({"Protocol": "ActiveSync", "Url": f"https://{self.internal_host}/Microsoft-Server-ActiveSync"})
            return 200, {"Content-Type": "application/json", "X-Upstream": "exchange"}, body.encode()
        if self.moved and any(f"DeviceId={d}" in h.path for d in self.moved):
            return 451, {"X-MS-Location": f"https://{self.internal_host}/Microsoft-Server-ActiveSync",
                         "X-Upstream": "exchange"}, b""
        if h.command == "OPTIONS":
            return 200, {"MS-Server-ActiveSync": "15.1", "MS-ASProtocolVersions": "2.5,12.0,12.1,14.0,14.1,16.0,16.1",
                         "MS-ASProtocolCommands": "Sync,SendMail,SmartForward,SmartReply,GetAttachment,FolderSync,"
                         "FolderCreate,FolderDelete,FolderUpdate,MoveItems,GetItemEstimate,MeetingResponse,Search,"
                         "Settings,Ping,ItemOperations,Provision,ResolveRecipients,ValidateCert",
                         "Allow": "OPTIONS,POST"}, b""
        if not h.path.lower().startswith("/microsoft-server-activesync"):
            return 404, {"Content-Type": "text/plain"}, b"not an ActiveSync path\n"
        return 200, {"Content-Type": "application/vnd.ms-sync.wbxml", "X-Upstream": "exchange",
                     "X-Seen": json.dumps({"path": seen["path"], "body_len": seen["body_len"]})}, b"\x03\x01\x6a\x00"


class MdmStandIn(StandIn):
    """Shows what the MDM received, in particular the client-certificate header."""

    def answer(self, h, seen):
        cert = h.headers.get("NSClientCert")
        payload = json.dumps({"upstream": "mdm", "path": seen["path"], "NSClientCert": cert,
                              "headers": seen["headers"]}).encode()
        return 200, {"Content-Type": "application/json", "X-Upstream": "mdm"}, payload


# ---------------------------------------------------------------------------------------------
# easgate standins CONFIG


def _is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plan(cfg: GatewayConfig, cert: Path | None, key: Path | None) -> list[tuple[type[StandIn], str, object, tuple | None]]:
    """(stand-in class, pool name, server, TLS cert/key) for every pool server; ValueError naming
    what cannot be stood in for (a server on another machine, an https server without a certificate)."""
    activesync = {r.pool for r in cfg.routes if r.authorize}
    out = []
    for pool in cfg.pools.values():
        for server in pool.servers:
            if not _is_local(server.host):
                raise ValueError(f"pool {pool.name}: {server.url} is not on this machine; stand-ins listen on "
                                 "loopback addresses only (point the pool at 127.0.0.1 to try the config)")
            tls = None
            if server.scheme == "https":
                c = cert or (pool.ca.parent / "exchange.pem" if pool.ca else None)
                k = key or (c.with_suffix(".key") if c else None)
                if c is None or not c.is_file() or not k.is_file():
                    raise ValueError(f"pool {pool.name}: {server.url} needs a certificate its pool trusts: "
                                     f"{c or 'none'} not found (run `easgate pki certs`, or pass --cert and --key)")
                tls = (c, k)
            cls = ExchangeStandIn if pool.name in activesync else MdmStandIn
            out.append((cls, pool.name, server, tls))
    return out


def cmd_standins(args) -> int:
    try:
        cfg = load_config(args.config)
        todo = plan(cfg, args.cert, args.key)
    except (ConfigError, ValueError) as e:
        print(f"easgate standins: {e}", file=sys.stderr)
        return 2
    started: list[StandIn] = []
    # block the stop signals in every thread (the servers' threads inherit the mask); sigwait takes them
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        for cls, pool, server, tls in todo:
            try:
                s = cls(pool, host=server.host, port=server.port, tls=tls)
            except OSError as e:
                print(f"easgate standins: cannot listen on {server.host}:{server.port} (pool {pool}): "
                      f"{e.strerror or e}", file=sys.stderr)
                return 1
            s.echo = not args.quiet
            started.append(s.start())
            kind = "Exchange" if cls is ExchangeStandIn else "MDM"
            print(f"stand-in {kind} for pool {pool}: {server.scheme}://{server.host}:{server.port}", flush=True)
        print("stand-ins running; Ctrl-C stops them", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})  # blocked below, before the servers started
        return 0
    finally:
        for s in started:
            s.stop()


def add_commands(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("standins", help="start stand-in Exchange and MDM servers on a config's pool addresses",
                       description="Start a stand-in Exchange (for the pool of the ActiveSync route) and a stand-in "
                                   "MDM server (every other pool) on the loopback addresses a gateway config's pools "
                                   "name, to try the config before the real servers are connected. Each request "
                                   "they get is printed.")
    s.add_argument("config", help="gateway YAML whose pools to stand in for, e.g. policies/gateway.yaml")
    s.add_argument("--cert", type=Path, help="certificate (PEM) of the https stand-ins; default: exchange.pem next "
                                            "to the pool's ca file (what `easgate pki` makes)")
    s.add_argument("--key", type=Path, help="its private key; default: the --cert file with .key")
    s.add_argument("-q", "--quiet", action="store_true", help="do not print each request")
    s.set_defaults(fn=cmd_standins)
