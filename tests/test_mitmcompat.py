"""What easgate.gateway.mitmcompat relies on in the installed mitmproxy and pyOpenSSL.

Each test names one private API the gateway uses. A mitmproxy upgrade that changes one fails
here, by name, instead of turning into a gateway that silently stops aborting denied
connections or checking upstream certificates.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import ssl
import sys
import typing

import h11
import pytest
from mitmproxy import connection
from mitmproxy.addons import proxyserver, tlsconfig
from mitmproxy.proxy import commands, context, events, layer, mode_servers, server
from mitmproxy.proxy.layers.http import HttpStream, _http1
from mitmproxy.proxy.layers.tls import TLSLayer
from mitmproxy.test import taddons
from OpenSSL import SSL

from easgate.gateway import mitmcompat


def test_proxyserver_keeps_connection_handlers_by_client_id():
    assert isinstance(proxyserver.Proxyserver().connections, dict)


def test_connection_handlers_keep_transports_with_a_task_and_a_writer():
    assert "transports" in inspect.signature(server.ConnectionHandler.__init__).parameters or \
        "self.transports" in inspect.getsource(server.ConnectionHandler.__init__)
    fields = {f.name for f in dataclasses.fields(server.ConnectionIO)}
    assert {"handler", "writer"} <= fields


def test_pyopenssl_exposes_the_verify_param_calls():
    for name in ("SSL_get0_param", "X509_VERIFY_PARAM_set_hostflags", "X509_VERIFY_PARAM_set1_host",
                 "X509_VERIFY_PARAM_set1_ip"):
        assert hasattr(SSL._lib, name), name
    assert callable(SSL._openssl_assert)
    assert isinstance(tlsconfig.DEFAULT_HOSTFLAGS, int) and tlsconfig.DEFAULT_HOSTFLAGS & 0x4


def test_verify_upstream_name_sets_the_name_or_the_ip():
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    for sni in ("exchange.example.test", "127.0.0.1", "::1"):
        conn = SSL.Connection(ctx)
        mitmcompat.verify_upstream_name(conn, sni)  # raises if OpenSSL refuses the parameter
    assert SSL.Connection(ctx).get_servername() is None


def test_http1_layer_has_the_chunked_reader_the_trailer_fix_replaces():
    mitmcompat.install()
    assert getattr(_http1.ChunkedReader, "_easgate", False), "the trailer fix was not installed"
    reader = _http1.make_body_reader(None)  # a chunked body: the layer builds the module's reader
    assert isinstance(reader, _http1.ChunkedReader)
    # the layer still answers a protocol error from the reader (not only NotImplementedError) ...
    src = inspect.getsource(_http1.Http1Connection.read_body)
    assert "except h11.ProtocolError" in src and "ReceiveProtocolError" in src
    # ... and the fixed reader raises one on trailer fields, and passes a body without them
    from h11._receivebuffer import ReceiveBuffer

    buf = ReceiveBuffer()
    buf += b"3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n"
    with pytest.raises(h11.RemoteProtocolError, match="trailers"):
        while reader(buf) is not None:
            pass
    buf, reader = ReceiveBuffer(), _http1.make_body_reader(None)
    buf += b"3\r\nabc\r\n0\r\n\r\n"
    events = []
    while (e := reader(buf)) is not None:
        events.append(type(e).__name__)
    assert events == ["Data", "EndOfMessage"]


def test_reverse_instance_listens_through_listen_and_handle_stream():
    params = list(inspect.signature(mode_servers.ReverseInstance.listen).parameters)
    assert params[:3] == ["self", "host", "port"]
    assert hasattr(mode_servers.ReverseInstance, "handle_stream")


def test_http1_server_cuts_request_heads_from_its_buffer_by_h11s_blank_line():
    """screen_http1_heads sees the bytes read_headers is about to parse: the same buffer, cut the same way."""
    from h11._receivebuffer import blank_line_regex

    mitmcompat.screen_http1_heads(lambda buf, peer: None)
    wrapped = _http1.Http1Server.read_headers
    assert getattr(wrapped, "_easgate", False)
    src = inspect.getsource(inspect.unwrap(wrapped.__closure__[0].cell_contents))
    assert "self.buf.maybe_extract_lines()" in src and "read_request_head" in src and "self.done" in src
    for sample in (b"a\r\n\r\nb", b"a\n\nb", b"a\n\r\nb", b"a\r\n\nb", b"a\r\r\n\r\n", b"a\r\nb"):
        want = blank_line_regex.search(sample)
        got = mitmcompat.HEAD_END.search(sample)
        assert (want and want.span()) == (got and got.span()), sample


def test_100_continue_is_sent_right_after_the_requestheaders_hook():
    """answer_before_continue holds back the 100 that state_wait_for_request_headers sends after the hook."""
    mitmcompat.answer_before_continue()
    wrapped = HttpStream.state_wait_for_request_headers
    assert getattr(wrapped, "_easgate", False)
    src = inspect.getsource(inspect.unwrap(wrapped.__closure__[0].cell_contents))
    assert src.index("HttpRequestHeadersHook") < src.index("100-continue") < src.index("Response.make(100)")
    assert "state_consume_request_body" in src
    for name in ("send_response", "check_killed", "state_errored"):
        assert callable(getattr(HttpStream, name)), name


def test_http1_layer_answers_errors_through_make_error_response():
    mitmcompat.install()
    assert getattr(_http1.make_error_response, "_easgate", False), "the error-page fix was not installed"
    page = _http1.make_error_response(502, "Connect call failed ('10.0.0.5', 443)")
    assert page.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and b"10.0.0.5" not in page and b"Server:" not in page
    assert "make_error_response(" in inspect.getsource(_http1.Http1Server)


def test_client_tls_layer_logs_handshake_errors_in_on_handshake_error():
    from mitmproxy.proxy.layers import tls

    mitmcompat.install()
    assert getattr(tls.ClientTLSLayer.on_handshake_error, "_easgate", False)
    assert "may not trust the proxy's certificate" in inspect.getsource(tls.ClientTLSLayer)


def test_openssl_names_verify_errors():
    assert mitmcompat.verify_error_string(10) == "certificate has expired"


def test_a_cancelled_connect_reads_client_disconnected_or_connection_cancelled():
    """UpstreamPools tells a connect the client abandoned from one the server failed by these strings."""
    handle_client = inspect.getsource(server.ConnectionHandler.handle_client)
    assert 'io.handler.cancel("client disconnected")' in handle_client
    assert "self.client.timestamp_end = time.time()" in handle_client
    assert handle_client.index("timestamp_end") < handle_client.index('cancel("client disconnected")')
    open_connection = inspect.getsource(server.ConnectionHandler.open_connection)
    assert "except (OSError, asyncio.CancelledError) as e:" in open_connection
    assert 'err = "connection cancelled"' in open_connection and "err = str(e)" in open_connection
    assert mitmcompat.CANCELLED_CONNECT_ERRORS == {"client disconnected", "connection cancelled"}
    assert mitmcompat.connect_was_cancelled("client disconnected")
    assert not mitmcompat.connect_was_cancelled("[Errno 111] Connect call failed ('127.0.0.1', 9)")


def _handshake(server: SSL.Connection, client: SSL.Connection) -> None:
    """A TLS handshake between two in-memory connections (and the TLS 1.3 tickets after it)."""
    for _ in range(20):
        for conn in (client, server):
            try:
                conn.do_handshake()
            except SSL.WantReadError:
                pass
        for a, b in ((client, server), (server, client)):
            try:
                b.bio_write(a.bio_read(65536))
            except SSL.WantReadError:
                pass
        try:
            client.recv(1)  # reads the session tickets a TLS 1.3 server sends after the handshake
        except (SSL.WantReadError, SSL.ZeroReturnError):
            pass
    assert server.get_peer_finished() is not None and client.get_peer_finished() is not None


def test_session_ticket_keys_are_set_through_ssl_ctx_ctrl_and_resume_across_contexts(pki):
    """tls.py shares one ticket key between workers and nodes through SSL_CTX_ctrl, which the cffi
    binding does not expose: found in cryptography's _rust extension's symbol table."""
    import os

    assert mitmcompat.ticket_keys_settable(), "SSL_CTX_ctrl not found: TLS sessions would not resume across workers"
    key = os.urandom(80)
    for version in (SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION):
        servers = []
        for k in (key, key, os.urandom(80)):
            ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
            ctx.use_certificate_chain_file(str(pki / "gateway-full.pem"))
            ctx.use_privatekey_file(str(pki / "gateway-full.pem"))
            ctx.set_session_id(b"easgate")
            assert mitmcompat.set_ticket_key(ctx, k) and mitmcompat.get_ticket_key(ctx) == k
            servers.append(ctx)
        cctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        cctx.set_min_proto_version(version)
        cctx.set_max_proto_version(version)
        first = SSL.Connection(cctx)
        first.set_connect_state()
        server = SSL.Connection(servers[0])
        server.set_accept_state()
        _handshake(server, first)
        session = first.get_session()
        for ctx, want in ((servers[1], True), (servers[2], False)):
            client = SSL.Connection(cctx)
            client.set_connect_state()
            client.set_session(session)
            server = SSL.Connection(ctx)
            server.set_accept_state()
            _handshake(server, client)
            assert bool(SSL._lib.SSL_session_reused(server._ssl)) is want, (version, want)
    try:
        mitmcompat.set_ticket_key(SSL.Context(SSL.TLS_SERVER_METHOD), b"short")
    except ValueError:
        pass
    else:
        raise AssertionError("a key of the wrong length must be refused")


def test_release_buffers_sets_the_mode_on_one_connection():
    conn = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD))
    mitmcompat.release_buffers(conn)
    assert SSL._lib.SSL_set_mode(conn._ssl, 0) & SSL.MODE_RELEASE_BUFFERS  # SSL_set_mode returns the mode


def _handshake_any(client: SSL.Connection, server) -> None:
    """Run a TLS handshake between a pyOpenSSL client and a pyOpenSSL or stdlib-ssl server (memory BIOs)."""
    py = isinstance(server, tuple)  # (ssl.SSLObject, incoming MemoryBIO, outgoing MemoryBIO)
    for _ in range(10):
        for conn in (client, server[0] if py else server):
            try:
                conn.do_handshake()
            except (SSL.WantReadError, ssl.SSLWantReadError):
                pass
        try:
            data = client.bio_read(65535)
        except SSL.WantReadError:
            data = b""
        server[1].write(data) if py else (data and server.bio_write(data))
        try:
            back = server[2].read() if py else server.bio_read(65535)
        except SSL.WantReadError:
            back = b""
        if back:
            client.bio_write(back)
    assert client.get_protocol_version_name() == "TLSv1.3"


def _group(conn: SSL.Connection) -> str:
    return SSL._ffi.string(SSL._lib.SSL_get0_group_name(conn._ssl)).decode()


def test_one_key_share_still_gets_a_post_quantum_group_from_an_upstream_that_prefers_it(pki):
    """The gateway's upstream ClientHello carries one key share (X25519), not the ML-KEM one OpenSSL
    would keep for the connection's life; an upstream that prefers X25519MLKEM768 still gets it."""
    client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD))
    if not mitmcompat.one_key_share(client):
        pytest.skip("this OpenSSL (before 3.5) has no group tuples nor X25519MLKEM768")
    client.set_connect_state()
    try:
        client.do_handshake()
    except SSL.WantReadError:
        pass
    hello = client.bio_read(65535)
    assert len(hello) < 600, f"a ClientHello of {len(hello)} bytes still carries the ML-KEM key share"
    sctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    sctx.use_certificate_chain_file(str(pki / "exchange.pem"))
    sctx.use_privatekey_file(str(pki / "exchange.key"))
    server = SSL.Connection(sctx)
    server.set_accept_state()
    server.bio_write(hello)
    _handshake_any(client, server)
    assert _group(client) == "X25519MLKEM768"  # after a HelloRetryRequest

    # an upstream without ML-KEM (the stdlib's OpenSSL here, or Schannel): X25519 at once
    client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD))
    assert mitmcompat.one_key_share(client)
    client.set_connect_state()
    pctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    pctx.load_cert_chain(str(pki / "exchange.pem"), str(pki / "exchange.key"))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    _handshake_any(client, (pctx.wrap_bio(incoming, outgoing, server_side=True), incoming, outgoing))
    assert _group(client) in ("X25519", "x25519")


def test_fresh_bios_after_a_handshake_keep_the_connection_working(pki):
    """mitmproxy's TLS layer gets two new memory BIOs once a handshake is done (the old ones keep
    the size of the handshake's flights); the connection must go on as before, both ways."""
    mitmcompat.install()
    assert getattr(TLSLayer.receive_handshake_data, "_easgate", False), "the fresh BIOs were not installed"
    assert "return True, None" in inspect.getsource(inspect.unwrap(
        TLSLayer.receive_handshake_data.__closure__[0].cell_contents))
    sctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    sctx.use_certificate_chain_file(str(pki / "gateway-full.pem"))
    sctx.use_privatekey_file(str(pki / "gateway-full.pem"))
    server, client = SSL.Connection(sctx), SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD))
    server.set_accept_state()
    client.set_connect_state()
    _handshake(server, client)
    old = server._into_ssl, server._from_ssl
    assert mitmcompat.fresh_bios(server) and mitmcompat.fresh_bios(client)
    assert (server._into_ssl, server._from_ssl) != old
    for a, b in ((client, server), (server, client)):
        a.sendall(b"x" * 40_000)
        b.bio_write(a.bio_read(65536))
        got = b""
        while len(got) < 40_000:
            got += b.recv(65536)
        assert got == b"x" * 40_000
    client.sendall(b"pending")
    server.bio_write(client.bio_read(65536))
    assert not mitmcompat.fresh_bios(server), "a BIO with unread bytes must be kept"
    assert server.recv(100) == b"pending"


def test_an_upstream_that_closes_before_answering_ends_in_handle_protocol_error():
    """answer_held resets the upstream of a held request and answers it in handle_protocol_error: the
    upstream's close must reach the stream there as a ResponseProtocolError, in the states checked,
    and send_response must finish the exchange (response hook, head, body, end of message)."""
    mitmcompat.install()
    wrapped = HttpStream.handle_protocol_error
    assert getattr(wrapped, "_easgate", False), "the held-request answer was not installed"
    original = inspect.getsource(inspect.unwrap(wrapped.__closure__[0].cell_contents))
    assert "ResponseProtocolError" in original and "HttpErrorHook" in original
    assert "server closed connection" in inspect.getsource(_http1.Http1Client.read_headers)
    def unwrapped(fn):  # mitmcompat's own wrappers keep mitmproxy's function in their closure
        while getattr(fn, "_easgate", False):
            fn = next(c.cell_contents for c in fn.__closure__ if inspect.isfunction(c.cell_contents))
        return fn

    assert "self.server_state = self.state_wait_for_response_headers" in inspect.getsource(
        unwrapped(HttpStream.state_wait_for_request_headers))
    assert "self.client_state = self.state_done" in inspect.getsource(HttpStream.state_consume_request_body)
    assert "HttpResponseHook" in inspect.getsource(HttpStream.send_response)
    assert "flow_done" in inspect.getsource(HttpStream.send_response)
    assert "ResponseEndOfMessage" in inspect.getsource(HttpStream.flow_done)
    for name in ("state_done", "state_wait_for_response_headers", "check_killed"):
        assert callable(getattr(HttpStream, name)), name


def test_layers_queue_their_paused_events_in_a_small_queue():
    """mitmcompat swaps the deque of every layer's `_paused_event_queue` for a list (760 -> 56 bytes
    per layer; a held Ping keeps 9 layers). Relies on layer.py's `collections` global being used for
    `collections.deque()` in Layer.__init__ only; checked with a layer that pauses on a blocking
    command, gets an event meanwhile, and must see it replayed, in order, once the command completes."""
    mitmcompat.install()
    src = inspect.getsource(layer)
    assert re.findall(r"\bcollections\.(\w+)\b(?! import)", src) == ["deque", "deque"], \
        "layer.py uses more of `collections` than Layer.__init__'s deque: review mitmcompat._small_layer_queues"

    seen: list = []
    client = connection.Client(peername=("1.2.3.4", 5), sockname=("0.0.0.0", 443), timestamp_start=0)
    server_conn = connection.Server(address=("10.0.0.1", 443))

    class Pausing(layer.Layer):
        def _handle_event(self, event):
            seen.append(type(event).__name__)
            if isinstance(event, events.Start):
                yield commands.OpenConnection(server_conn)  # blocking: the layer pauses

    with taddons.context() as tctx:
        lay = Pausing(context.Context(client, tctx.options))
        assert isinstance(lay._paused_event_queue, mitmcompat.SmallQueue)
        assert sys.getsizeof(lay._paused_event_queue) < 100
        cmds = list(lay.handle_event(events.Start()))
        assert isinstance(cmds[0], commands.OpenConnection)
        assert list(lay.handle_event(events.DataReceived(client, b"a"))) == []  # queued while paused
        assert list(lay.handle_event(events.DataReceived(client, b"b"))) == []
        assert len(lay._paused_event_queue) == 2
        list(lay.handle_event(events.OpenConnectionCompleted(cmds[0], None)))
    assert seen == ["Start", "DataReceived", "DataReceived"]
    assert not lay._paused_event_queue


def test_asyncio_transports_streams_and_locks_queue_in_small_queues():
    """mitmcompat swaps the deques asyncio makes per connection (the socket transport's write
    buffer, the stream protocol's drain waiters, Lock and Event waiters) for lists: 4.5 KB per held
    Ping. Relies on those modules using `collections` for deque() only, and on every method called
    on those queues being one a SmallQueue has; then checked with real sockets: 8 MB through a
    transport whose peer reads slowly (partial sends: popleft/appendleft), and waiters in order."""
    import asyncio
    import hashlib
    import os

    mitmcompat.install()
    allowed = {n for n in dir(mitmcompat.SmallQueue) if not n.startswith("_")}
    queues = {asyncio.selector_events: (r"self\._buffer", r"\bbuffer"), asyncio.streams: (r"self\._drain_waiters",),
              asyncio.locks: (r"self\._waiters",)}
    for module, names in queues.items():
        src = inspect.getsource(module)
        uses = re.findall(r"\bcollections\.(\w+)\b(?! import)", src)
        assert set(uses) == {"deque"}, f"{module.__name__} uses more of `collections` than deque: {uses}"
        called = {m for n in names for m in re.findall(n + r"\.(\w+)\(", src)}
        assert called <= allowed, f"{module.__name__} calls {called - allowed} on a queue SmallQueue replaces"
        assert isinstance(module.collections, type(mitmcompat.SMALL_QUEUE_MODULES[0].collections))

    async def scenario() -> None:
        payload = os.urandom(8 << 20)
        got = hashlib.sha256()
        done = asyncio.Event()
        assert isinstance(done._waiters, mitmcompat.SmallQueue)

        async def serve(reader, writer) -> None:
            n = 0
            while n < len(payload):
                chunk = await reader.read(65536)
                got.update(chunk)
                n += len(chunk)
                await asyncio.sleep(0)  # a slow reader: the sender's socket fills up
            writer.close()
            done.set()

        srv = await asyncio.start_server(serve, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*srv.sockets[0].getsockname()[:2])
        assert isinstance(writer.transport._buffer, mitmcompat.SmallQueue)
        for i in range(0, len(payload), 100_000):
            writer.write(payload[i:i + 100_000])  # no drain: the transport's buffer queues
        await writer.drain()
        await done.wait()
        assert got.hexdigest() == hashlib.sha256(payload).hexdigest()
        writer.close()
        srv.close()

        lock, order = asyncio.Lock(), []

        async def take(i: int) -> None:
            async with lock:
                order.append(i)
                await asyncio.sleep(0)

        await asyncio.gather(*(take(i) for i in range(5)))
        assert order == [0, 1, 2, 3, 4] and isinstance(lock._waiters, mitmcompat.SmallQueue)

    asyncio.run(scenario())


def test_hooks_run_inline_in_a_copy_of_server_event_that_matches_the_installed_one():
    """mitmcompat.run_hooks_inline replaces ConnectionHandler.server_event with a copy of mitmproxy
    12.3.1's that runs hooks through the addon manager's start_hook instead of one task each. Any
    change to the original, to hook_task or to ProxyConnectionHandler.handle_hook (what start_hook
    and _finish_hook reproduce) fails here: compare mitmcompat._dispatch and FastAddonManager.start_hook
    with the new source, then update the digests."""
    import hashlib

    mitmcompat.run_hooks_inline()
    patched = server.ConnectionHandler.server_event
    assert getattr(patched, "_easgate", False)
    digests = {
        "server_event": inspect.unwrap(patched),
        "hook_task": server.ConnectionHandler.hook_task,
        "handle_hook": mode_servers.ProxyConnectionHandler.handle_hook,
    }
    got = {k: hashlib.sha256(inspect.getsource(f).encode()).hexdigest()[:16] for k, f in digests.items()}
    assert got == {"server_event": "a2b42657ebe8bf6d", "hook_task": "9ac7970160526268",
                   "handle_hook": "9f8b52fd798203c9"}
    # the eager task factory is what made a hook's functions run where the command was handled
    from mitmproxy import master

    assert "set_eager_task_factory()" in inspect.getsource(master.Master.run)


def test_session_reused_tells_a_resumed_handshake_from_a_full_one(pki):
    """UpstreamPools resumes upstream TLS sessions (set_session/get_session) and asks
    mitmcompat.session_reused (SSL_session_reused through the cffi binding) whether a handshake did."""
    assert hasattr(SSL._lib, "SSL_session_reused")
    server_ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    server_ctx.use_certificate_chain_file(str(pki / "exchange.pem"))
    server_ctx.use_privatekey_file(str(pki / "exchange.key"))
    client_ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)

    def handshake(session=None) -> SSL.Connection:
        c, s = SSL.Connection(client_ctx), SSL.Connection(server_ctx)
        c.set_connect_state()
        s.set_accept_state()
        if session is not None:
            c.set_session(session)
        for _ in range(10):  # memory BIOs: shuttle bytes until both sides are done
            for a, b in ((c, s), (s, c)):
                try:
                    a.do_handshake()
                except SSL.WantReadError:
                    pass
                try:
                    b.bio_write(a.bio_read(65536))
                except SSL.WantReadError:
                    pass
        s.send(b"x")  # TLS 1.3 tickets come after the handshake: read them
        c.bio_write(s.bio_read(65536))
        assert c.recv(1) == b"x"
        return c

    first = handshake()
    assert not mitmcompat.session_reused(first)
    assert mitmcompat.session_reused(handshake(first.get_session()))


def test_options_are_read_without_copying_immutable_values():
    """mitmcompat returns str/int/bool/float/bytes/None option values without mitmproxy's deep copy
    (every `ctx.options.x` made one, two for a default); anything else is still a copy. Relies on
    optmanager._Option.current and .default as in mitmproxy 12.3.1 (digests)."""
    import hashlib

    from mitmproxy import optmanager

    mitmcompat.install()
    current = optmanager._Option.current
    assert getattr(current, "_easgate", False)
    digests = {k: hashlib.sha256(inspect.getsource(f).encode()).hexdigest()[:16]
               for k, f in (("current", inspect.unwrap(current)), ("default", optmanager._Option.default.fget))}
    assert digests == {"current": "6859c2d9c826806e", "default": "cfc9882b8960757d"}
    assert set(optmanager._Option.__slots__) >= {"value", "_default"}

    o = optmanager.OptManager()
    o.add_option("n", int, 3, "")
    o.add_option("s", str, "x", "")
    o.add_option("seq", typing.Sequence[str], ["a"], "")
    assert (o.n, o.s) == (3, "x")
    o.update(n=5)
    assert o.n == 5
    got = o.seq
    got.append("b")  # a copy: the option is not changed through it
    assert o.seq == ["a"]
    o.update(seq=["c"])
    o.seq.append("d")
    assert o.seq == ["c"]


def test_a_connection_s_own_tasks_come_from_copies_that_match_the_installed_mitmproxy():
    """mitmcompat.lean_connections replaces ConnectionHandler.handle_client and handle_connection
    with copies of mitmproxy 12.3.1's (marked where they differ) and the watchdog with a timer. Any
    change to the originals, to TimeoutWatchdog or to on_timeout (the callback the timer starts)
    fails here: compare mitmcompat's copies and TimerWatchdog with the new source, then update the
    digests."""
    import hashlib

    mitmcompat.lean_connections()
    cls = server.ConnectionHandler
    assert getattr(cls.handle_client, "_easgate", False) and getattr(cls.handle_connection, "_easgate", False)
    assert server.TimeoutWatchdog is mitmcompat.TimerWatchdog
    digests = {
        "handle_client": inspect.unwrap(cls.handle_client),
        "handle_connection": inspect.unwrap(cls.handle_connection),
        "on_timeout": cls.on_timeout,
    }
    got = {k: hashlib.sha256(inspect.getsource(f).encode()).hexdigest()[:16] for k, f in digests.items()}
    assert got == {"handle_client": "01f1b7cc991c4711", "handle_connection": "95c3f93e9824e527",
                   "on_timeout": "0d1e6b0aa6e41173"}
    assert "TimeoutWatchdog(timeout, self.on_timeout)" in inspect.getsource(cls.__init__)
    assert "set_task_debug_info(t, name=name, client=client)" in inspect.getsource(mitmcompat.asyncio_utils.create_task)
    assert "with self.timeout_watchdog.disarm():" in inspect.getsource(mode_servers.ProxyConnectionHandler.handle_hook)


def test_the_timer_watchdog_times_out_after_inactivity_and_never_while_disarmed():
    """What mitmproxy's watchdog does, on a loop timer: the callback after `timeout` seconds without
    activity; activity and a disarm (a hook running) hold it off; stop() ends it."""
    import asyncio
    import time

    async def scenario() -> dict:
        fired: dict[str, float] = {}
        done = {k: asyncio.Event() for k in ("idle", "active", "disarmed")}

        def make(name: str) -> mitmcompat.TimerWatchdog:
            async def callback() -> None:
                fired[name] = time.monotonic() - t0
                done[name].set()
            return mitmcompat.TimerWatchdog(0.2, callback)

        t0 = time.monotonic()
        idle, active, disarmed, stopped = make("idle"), make("active"), make("disarmed"), make("stopped")
        for w in (idle, active, disarmed, stopped):
            w.start()
        stopped.stop()
        with disarmed.disarm():
            await asyncio.sleep(0.1)
            active.register_activity()  # ~0.1 s in: postpones its timeout to ~0.3 s
            await asyncio.wait_for(done["idle"].wait(), 5)
            await asyncio.sleep(0.3)  # the disarmed one is past due, and must not fire
            assert "disarmed" not in fired
        for k in ("active", "disarmed"):
            await asyncio.wait_for(done[k].wait(), 5)
        await asyncio.sleep(0.3)
        return fired

    fired = asyncio.run(scenario())
    assert set(fired) == {"idle", "active", "disarmed"}, fired  # never the stopped one
    assert 0.19 <= fired["idle"] < 0.35, fired
    assert fired["active"] >= fired["idle"] + 0.09, fired  # activity at ~0.1 s: 0.2 s after that
    assert fired["disarmed"] >= fired["idle"] + 0.3 + 0.19, fired  # a full timeout after the disarm ended


def test_the_gateway_sees_every_read_of_an_established_upstream_tls_connection():
    """UpstreamPools keeps an upstream TLS 1.3 session when its ticket arrives, through
    mitmcompat.on_upstream_read (a wrapper of ServerTLSLayer.receive_data): it relies on
    receive_data reading every record after the handshake, and on the handshake's end running the
    TlsEstablished hook (where the ticketless session is noted) before reading what came with it."""
    from mitmproxy.proxy.layers import tls

    src = inspect.getsource(tls)  # the module's: mitmcompat.install wraps receive_handshake_data
    done = src.index("    def receive_handshake_data(")
    assert done < src.index("TlsEstablishedServerHook(", done) < src.index('yield from self.receive_data(b"")', done)
    assert "self.tls.recv(65535)" in src[src.index("    def receive_data(self, data: bytes)"):]
    seen: list = []
    mitmcompat.on_upstream_read(lambda server, conn: seen.append((server, conn)))
    try:
        patched = tls.ServerTLSLayer.receive_data
        assert getattr(patched, "_easgate", False)
        assert tls.ClientTLSLayer.receive_data is TLSLayer.receive_data  # the phones' side untouched

        class NothingToRead:
            def bio_write(self, data: bytes) -> None:
                pass

            def recv(self, n: int) -> bytes:
                raise SSL.WantReadError()

        class Layer:  # what receive_data uses of a ServerTLSLayer
            conn, tls = "server", NothingToRead()

            def tls_interact(self):
                return iter(())

        layer = Layer()
        assert list(patched(layer, b"ticket")) == [] and seen == [("server", layer.tls)]
    finally:
        mitmcompat.on_upstream_read(None)
