"""What easgate.gateway.mitmcompat relies on in the installed mitmproxy and pyOpenSSL.

Each test names one private API the gateway uses. A mitmproxy upgrade that changes one fails
here, by name, instead of turning into a gateway that silently stops aborting denied
connections or checking upstream certificates.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import typing

from mitmproxy import connection
from mitmproxy.addons import proxyserver, tlsconfig
from mitmproxy.proxy import commands, context, events, layer, mode_servers, server
from mitmproxy.proxy.layers.http import HttpStream, _http1
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


def test_http1_layer_has_the_read_body_the_trailer_fix_wraps():
    mitmcompat.install()
    read_body = _http1.Http1Connection.read_body
    assert getattr(read_body, "_easgate", False), "the trailer fix was not installed"
    assert hasattr(_http1.Http1Server, "ReceiveProtocolError") and hasattr(_http1.Http1Server, "stream_id")


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
