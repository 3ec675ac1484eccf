"""Every use of mitmproxy's (and pyOpenSSL's) private API, in one place.

mitmproxy has no public API for what a gateway needs here: aborting one connection's transport,
cancelling a connect that hangs, checking an upstream's host name with OpenSSL's verify
parameters, fixing a crash in its HTTP/1 layer, seeing a request head's raw bytes before it is
parsed, holding back `100 Continue` for a request that is already answered, and answering a
request whose upstream is still holding it (a Ping a block ends). Each function names what it relies on;
tests/test_mitmcompat.py checks each of those against the installed mitmproxy, so an upgrade that
changes one fails loudly there instead of silently here.
"""

from __future__ import annotations

import asyncio
import asyncio.locks
import asyncio.selector_events
import asyncio.streams
import collections
import contextlib
import ctypes
import functools
import ipaddress
import logging
import mmap
import re
import struct
import time
from collections.abc import Callable

import h11
from cryptography.hazmat.bindings import _rust
from mitmproxy import connection, ctx, http, optmanager
from mitmproxy.addons.tlsconfig import DEFAULT_HOSTFLAGS
from mitmproxy.net.http import http1, status_codes
from mitmproxy.proxy import commands, events, mode_servers, server, server_hooks
from mitmproxy.proxy import layer as proxy_layer
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers import tls as tls_layers
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._events import ErrorCode, ResponseEndOfMessage, ResponseHeaders, ResponseProtocolError
from mitmproxy.proxy.layers.http._hooks import HttpResponseHeadersHook
from mitmproxy.utils import asyncio_utils
from OpenSSL import SSL
from OpenSSL._util import ffi as _ossl_ffi
from OpenSSL._util import lib as _ossl_lib

logger = logging.getLogger(__name__)
_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    _http1_request_trailers()
    _http1_error_pages()
    _client_handshake_failure_reason()
    _answer_held_requests()
    _small_layer_queues()
    _fresh_bios_after_handshake()
    _options_without_copies()


# -- memory per connection --------------------------------------------------------------------
# Relies on: mitmproxy.proxy.layer using its module global `collections` for one thing only,
# `collections.deque()` in Layer.__init__ (the `_paused_event_queue`), and that queue being used
# with append, popleft, iteration and truth tests only (layer.py, layers/http/__init__.py).
# And on asyncio's selector_events, streams and locks using their `collections` global only for
# `collections.deque()` at run time (the socket transport's write buffer, a stream protocol's drain
# waiters, the waiters of Lock, Event, Condition, Semaphore), each used with append, appendleft,
# popleft, extend, remove, clear, iteration, islice, len and truth tests (tests/test_mitmcompat.py
# checks every method called on them); selector_events' `_buffer_factory = collections.deque`
# (datagram transports) is bound at import and keeps the real deque.


class SmallQueue(list):
    """A deque's append/popleft on a list: 56 bytes empty instead of a deque's 760.

    Each mitmproxy layer has a queue for the events that arrive while it waits for a hook, each
    asyncio socket transport a write buffer, each stream protocol, Lock and Event a list of waiters:
    almost always empty, and a held ActiveSync Ping keeps 9 layers, 2 transports, 2 protocols, a
    Lock and an Event for up to an hour (6 of them deques: 4.5 KB). popleft is O(n), and n is the
    handful of events, chunks waiting for a full socket or waiters queued at one time."""

    __slots__ = ()

    def popleft(self):
        return self.pop(0)

    def appendleft(self, item) -> None:
        self.insert(0, item)


class _SmallCollections:
    """What a patched module sees as `collections`: the real module, with `deque` replaced."""

    deque = SmallQueue

    def __getattr__(self, name: str):
        return getattr(collections, name)


SMALL_QUEUE_MODULES = (proxy_layer, asyncio.selector_events, asyncio.streams, asyncio.locks)


def _small_layer_queues() -> None:
    for module in SMALL_QUEUE_MODULES:
        if not isinstance(getattr(module, "collections", None), _SmallCollections):
            module.collections = _SmallCollections()  # type: ignore[attr-defined]


# Relies on: pyOpenSSL's Connection made without a socket keeping its two memory BIOs in _into_ssl and
# _from_ssl (bio_write/bio_read/bio_shutdown use them, SSL_free frees them), and the cffi binding's
# BIO_new, BIO_s_mem, BIO_get_mem_data and SSL_set_bio (which frees the BIOs it replaces); and
# mitmproxy's TLSLayer.receive_handshake_data returning (True, None) once the handshake is done and
# what it produced (tickets, the first bytes of data) has been read out of the BIOs.


def fresh_bios(conn: SSL.Connection) -> bool:
    """Give an in-memory pyOpenSSL connection two new (empty) memory BIOs, when nothing is pending in
    either. A memory BIO keeps the largest buffer it ever needed: after a handshake that is the
    whole server flight (certificate chain) on one side and the ClientHello on the other, ~3 KB per
    connection that nothing uses again while a Ping is held."""
    lib, ffi = SSL._lib, SSL._ffi  # type: ignore[attr-defined]
    into, out = conn._into_ssl, conn._from_ssl  # type: ignore[attr-defined]
    if into is None or out is None or lib.BIO_get_mem_data(into, ffi.NULL) or lib.BIO_get_mem_data(out, ffi.NULL):
        return False
    new_into, new_out = lib.BIO_new(lib.BIO_s_mem()), lib.BIO_new(lib.BIO_s_mem())
    if new_into == ffi.NULL or new_out == ffi.NULL:
        for b in (new_into, new_out):
            if b != ffi.NULL:
                lib.BIO_free(b)
        return False
    lib.SSL_set_bio(conn._ssl, new_into, new_out)  # type: ignore[attr-defined]
    conn._into_ssl, conn._from_ssl = new_into, new_out  # type: ignore[attr-defined]
    return True


def _fresh_bios_after_handshake() -> None:
    cls = tls_layers.TLSLayer
    original = cls.receive_handshake_data
    if getattr(original, "_easgate", False):
        return

    def receive_handshake_data(self, data):
        done = yield from original(self, data)
        if done[0] and getattr(self, "tls", None) is not None:
            fresh_bios(self.tls)
        return done

    receive_handshake_data._easgate = True  # type: ignore[attr-defined]
    cls.receive_handshake_data = receive_handshake_data


# -- reading options --------------------------------------------------------------------------
# Relies on: optmanager._Option.current() returning copy.deepcopy of `value`, or of `_default` when
# `value` is `optmanager.unset` (the `default` property deep-copies too), and OptManager.__getattr__
# calling it on every `ctx.options.x` (mitmproxy 12.3.1; digests checked by tests/test_mitmcompat.py).

_IMMUTABLE = frozenset({str, int, bool, float, bytes, type(None)})


def _options_without_copies() -> None:
    """Every `ctx.options.x` read deep-copies the value (twice while it is the default): 21 reads,
    40 deep copies per new connection, ~3% of its CPU. A str, int, bool, float, bytes or None can't
    be changed through the copy, so it is returned as is; anything else is still copied."""
    cls = optmanager._Option
    if getattr(cls.current, "_easgate", False):
        return
    original = cls.current

    def current(self):
        v = self._default if self.value is optmanager.unset else self.value
        return v if type(v) in _IMMUTABLE else original(self)

    current._easgate = True  # type: ignore[attr-defined]
    current.__wrapped__ = original  # type: ignore[attr-defined]
    cls.current = current  # type: ignore[method-assign]


def _client_handshake_failure_reason() -> None:
    """mitmproxy 12.3.1 explains any failed client handshake as "The client may not trust the
    proxy's certificate": for a gateway that rejected the client's certificate, that points the
    operator at the wrong certificate. When the SSL connection's app data says why the handshake
    failed (a `handshake_failure` string, see tls.CertRejected), that line is logged instead."""
    cls = getattr(tls_layers, "ClientTLSLayer", None)
    original = getattr(cls, "on_handshake_error", None)
    if original is None or getattr(original, "_easgate", False):
        return

    def on_handshake_error(self, err: str):
        data = self.tls.get_app_data() if getattr(self, "tls", None) is not None else None
        why = getattr(data, "handshake_failure", None)
        gen = original(self, err)
        try:
            cmd = next(gen)
            while True:
                if why and isinstance(cmd, commands.Log) and cmd.message.startswith("Client TLS handshake failed"):
                    cmd = commands.Log(f"Client TLS handshake failed: {why}", cmd.level)
                    why = None
                cmd = gen.send((yield cmd))
        except StopIteration as e:
            return e.value

    on_handshake_error._easgate = True  # type: ignore[attr-defined]
    cls.on_handshake_error = on_handshake_error


def verify_error_string(errno: int) -> str:
    """OpenSSL's text for an X509 verify error (`certificate has expired`); pyOpenSSL exposes no
    public name for it (relies on: OpenSSL._util.lib.X509_verify_cert_error_string)."""
    try:
        return _ossl_ffi.string(_ossl_lib.X509_verify_cert_error_string(errno)).decode("ascii", "replace")
    except Exception:
        return f"OpenSSL verify error {errno}"


def _http1_error_pages() -> None:
    """mitmproxy 12.3.1 answers a request it could not forward with an HTML page that carries
    `Server: mitmproxy 12.3.1` and the internal error, e.g. "Connect call failed ('10.0.0.5', 443)":
    what runs the gateway and the addresses behind it, told to anyone on the Internet. The client
    gets the status and its reason phrase only; the detail is in the gateway's log (the upstream
    pools' error hook) and on the flow. A 4xx about the client's own request keeps its message."""
    if getattr(getattr(_http1, "make_error_response", None), "_easgate", False):
        return

    def make_error_response(status_code: int, message: str = "") -> bytes:
        reason = status_codes.RESPONSES.get(status_code, "Error")
        text = f"{status_code} {reason}\n"
        if 400 <= status_code < 500 and message:
            text += f"{message}\n"
        resp = http.Response.make(status_code, text.encode("utf-8", "replace"),
                                  http.Headers(Connection="close", Content_Type="text/plain; charset=utf-8"))
        return http1.assemble_response(resp)

    make_error_response._easgate = True  # type: ignore[attr-defined]
    _http1.make_error_response = make_error_response


# Relies on: _http1.make_body_reader building every chunked body's reader as the module global
# `ChunkedReader()` (h11's), and Http1Connection.read_body turning an h11.ProtocolError raised by
# the reader into CloseConnection + ReceiveProtocolError, while an EndOfMessage with headers
# (trailer fields) raises NotImplementedError there.
TRAILERS_REFUSED = "HTTP trailers are not implemented yet."


def _http1_request_trailers() -> None:
    """mitmproxy 12.3.1: a chunked HTTP/1 message with trailer fields raises NotImplementedError
    inside the HTTP/1 layer; the client is never answered and waits until its connection's idle
    timeout (an hour on a gateway). Make the chunked reader raise the protocol error that
    mitmproxy answers for any other malformed body: the connection is closed at once.

    Only chunked bodies get the checking reader (Content-Length bodies cannot carry trailers): no
    per-event wrapper around read_body on every request."""
    original = getattr(_http1, "ChunkedReader", None)
    if original is None or getattr(original, "_easgate", False):
        return

    class ChunkedReader(original):  # type: ignore[misc, valid-type]
        _easgate = True

        def __call__(self, buf):
            event = super().__call__(buf)
            if type(event) is h11.EndOfMessage and event.headers:
                raise h11.RemoteProtocolError(TRAILERS_REFUSED)
            return event

    _http1.ChunkedReader = ChunkedReader


# -- HTTP/1 request heads ---------------------------------------------------------------------
# Relies on: _http1.Http1Server.read_headers(self, event) cutting each request head from self.buf
# (h11's ReceiveBuffer.maybe_extract_lines: up to the first LF [CR] LF, HEAD_END) on a DataReceived,
# with self.conn, self.state and self.done; and HttpStream.state_wait_for_request_headers sending
# `100 Continue` (SendHttp(ResponseHeaders(status 100))) right after HttpRequestHeadersHook, then
# leaving the body to state_consume_request_body, with send_response(), check_killed() and
# SendHttp/DropStream to finish a stream.

HEAD_END = re.compile(rb"\n\r?\n")
_screen: Callable[[bytes, tuple | None], bytes | None] | None = None


def screen_http1_heads(screen: Callable[[bytes, tuple | None], bytes | None]) -> None:
    """Before mitmproxy's HTTP/1 server parses a request head, call `screen(buffer, peername)`; when
    it returns bytes, send them to the client and close the connection: nothing else on it is read."""
    global _screen
    _screen = screen
    cls = _http1.Http1Server
    original = cls.read_headers
    if getattr(original, "_easgate", False):
        return

    def read_headers(self, event):
        while True:
            check = _screen
            if check is not None and isinstance(event, events.DataReceived) and self.buf:
                answer = check(bytes(self.buf), self.conn.peername)
                if answer is not None:
                    yield commands.SendData(self.conn, answer)
                    yield commands.CloseConnection(self.conn)
                    self.state = self.done
                    return
            before = len(self.buf)
            yield from original(self, event)
            # mitmproxy 12.3 consumes one empty line before a request line, then waits for more
            # bytes even when the request is already buffered (the client waits forever): go on.
            if not (isinstance(event, events.DataReceived) and self.state == self.read_headers
                    and 0 < len(self.buf) < before):
                return
            event = events.DataReceived(self.conn, b"")

    read_headers._easgate = True  # type: ignore[attr-defined]
    cls.read_headers = read_headers


def answer_before_continue() -> None:
    """mitmproxy 12.3 sends `100 Continue` after requestheaders even when an addon already set the
    response: the client then uploads its whole body to be told no. Send that response at once
    instead, without the 100, and close the connection (a body sent anyway is not read). Requests
    that arrive without an Expect header (no addon of the gateway adds one) skip the check."""
    cls = http_layers.HttpStream
    original = cls.state_wait_for_request_headers
    if getattr(original, "_easgate", False):
        return

    def state_wait_for_request_headers(self, event):
        if "expect" not in getattr(getattr(event, "request", None), "headers", ()):
            # No Expect header, no 100 Continue to hold back: mitmproxy's own generator, delegated
            # to in C instead of every command passing through the loop below.
            return (yield from original(self, event))
        gen = original(self, event)
        held = False
        reply = None
        try:
            while True:
                cmd = gen.send(reply)
                if (isinstance(cmd, http_layers.SendHttp) and isinstance(cmd.event, ResponseHeaders)
                        and cmd.event.response.status_code == 100 and self.flow.response is not None):
                    held, reply = True, None
                    continue
                reply = yield cmd
        except StopIteration as stop:
            result = stop.value
        if not held:
            return result
        resp = self.flow.response
        resp.headers["Connection"] = "close"
        self.client_state = self.state_errored  # whatever the client still sends is dropped
        resp.timestamp_start = time.time()
        yield HttpResponseHeadersHook(self.flow)
        if (yield from self.check_killed(True)):
            return None
        yield from self.send_response()  # the response hook, the head and the body
        self.flow.live = False
        yield http_layers.SendHttp(ResponseEndOfMessage(self.stream_id), self.context.client)
        yield http_layers.SendHttp(
            ResponseProtocolError(self.stream_id, "answered before 100 Continue", ErrorCode.KILL),
            self.context.client)
        yield http_layers.DropStream(self.stream_id)
        return None

    state_wait_for_request_headers._easgate = True  # type: ignore[attr-defined]
    cls.state_wait_for_request_headers = state_wait_for_request_headers


# -- answering a held request -----------------------------------------------------------------
# Relies on: HttpStream.handle_protocol_error(event) being where the ResponseProtocolError of an
# upstream connection that closed before answering reaches the stream (Http1Client turns the
# ConnectionClosed into one), with self.flow, self.client_state (state_done once the whole request
# was sent upstream) and self.server_state (state_wait_for_response_headers until the upstream's
# head arrives); and send_response(), which runs the response hook, sends the head and body and,
# the request being done, flow_done()'s ResponseEndOfMessage. Aborting the upstream transport: abort().

_held_answers: dict[str, http.Response] = {}  # flow id -> the answer to send when its upstream closes


def answer_held(flow: http.HTTPFlow, response: http.Response) -> bool:
    """Answer a request the upstream holds (a Ping) with `response` instead of the upstream's answer:
    its upstream connection is reset now, and where mitmproxy would then send the client an error
    page it sends `response` (with `Connection: close`). False, and nothing done, when that cannot
    be: the client already has response bytes, or there is no upstream connection to close."""
    if flow.response is not None or not flow.live or not flow.server_conn.connected:
        return False
    _held_answers[flow.id] = response
    if not abort(flow.client_conn, flow.server_conn):
        _held_answers.pop(flow.id, None)
        return False
    return True


def withdraw_held_answer(flow: http.HTTPFlow) -> bool:
    """Forget the answer waiting for this flow's upstream to close; True if there was one (the
    upstream answered first, or the flow ended otherwise)."""
    return _held_answers.pop(flow.id, None) is not None


def _answer_held_requests() -> None:
    cls = http_layers.HttpStream
    original = cls.handle_protocol_error
    if getattr(original, "_easgate", False):
        return

    def handle_protocol_error(self, event):
        flow = getattr(self, "flow", None)
        response = _held_answers.pop(flow.id, None) if flow is not None and isinstance(
            event, ResponseProtocolError) else None
        if (response is None or flow.response is not None or self.client_state != self.state_done
                or self.server_state != self.state_wait_for_response_headers):
            return (yield from original(self, event))
        response.headers["Connection"] = "close"
        response.timestamp_start = time.time()
        flow.response = response
        yield HttpResponseHeadersHook(flow)
        if (yield from self.check_killed(True)):
            return None
        yield from self.send_response()  # the response hook, head, body, end of message; then closed
        return None

    handle_protocol_error._easgate = True  # type: ignore[attr-defined]
    cls.handle_protocol_error = handle_protocol_error


# -- hooks without a task per hook -----------------------------------------------------------
# Relies on: server.ConnectionHandler.server_event as in mitmproxy 12.3.1 (its source is checked by
# tests/test_mitmcompat.py: the dispatch below is a copy of it), hook_task (the hook, then
# HookCompleted for a blocking one) and ProxyConnectionHandler.handle_hook (the lifecycle event with
# the watchdog disarmed, then waiting for an intercepted flow's resume).


def run_hooks_inline() -> None:
    """Run each hook a connection's layers start right where mitmproxy would spawn a task for it,
    when the master's addon manager can (`addons.start_hook(hook)`: runs the hook's functions now
    and returns None when all is done, or what is left to await). A blocking hook's HookCompleted
    is then handled in the same pass, under the same lock.

    Why: mitmproxy spawns a task per hook (13 per connection: client_connected, next_layer x2,
    tls_clienthello, tls_start_client, ... client_disconnected), and its HookCompleted waits for the
    event lock the spawning pass holds, i.e. one more loop iteration per hook. With the eager task
    factory a hook's functions already ran at that point: only when they ran is unchanged, the task,
    lock wait and loop turn are gone. A hook whose functions await (an authorization callout, a
    revocation check) or whose flow is intercepted still goes through a task, as before."""
    cls = server.ConnectionHandler
    if getattr(cls.server_event, "_easgate", False):
        return
    original = cls.server_event

    async def server_event(self, event: events.Event) -> None:
        start_hook = getattr(getattr(getattr(self, "master", None), "addons", None), "start_hook", None)
        if start_hook is None:
            return await original(self, event)
        async with self._server_event_lock:
            queue = collections.deque((event,))
            while queue:
                event = queue.popleft()
                self.timeout_watchdog.register_activity()
                try:
                    for command in self.layer.handle_event(event):
                        if isinstance(command, commands.StartHook):
                            rest = start_hook(command)
                            if rest is not None:
                                asyncio_utils.create_task(_finish_hook(self, command, rest),
                                                          name=f"handle_hook({command.name})", keep_ref=True,
                                                          client=self.client.peername)
                            elif command.blocking:
                                queue.append(events.HookCompleted(command))
                        else:
                            _dispatch(self, command)
                except Exception:
                    self.log("mitmproxy has crashed!", logging.ERROR, exc_info=True)

    server_event._easgate = True  # type: ignore[attr-defined]
    server_event.__wrapped__ = original  # type: ignore[attr-defined]  (what tests/test_mitmcompat.py checks)
    cls.server_event = server_event  # type: ignore[method-assign]


async def _finish_hook(handler, hook: commands.StartHook, rest) -> None:
    with handler.timeout_watchdog.disarm():
        await rest
    if hook.blocking:
        await handler.server_event(events.HookCompleted(hook))


def _dispatch(self, command: commands.Command) -> None:
    """ConnectionHandler.server_event's handling of every command but StartHook (mitmproxy 12.3.1)."""
    if isinstance(command, commands.OpenConnection):
        assert command.connection not in self.transports
        handler = asyncio_utils.create_task(
            self.open_connection(command), name=f"server connection handler {command.connection.address}",
            keep_ref=False, client=self.client.peername)
        self.transports[command.connection] = server.ConnectionIO(handler=handler)
    elif isinstance(command, commands.RequestWakeup):
        task = asyncio_utils.create_task(self.wakeup(command), name=f"wakeup timer ({command.delay:.1f}s)",
                                         keep_ref=False, client=self.client.peername)
        assert task is not None
        self.wakeup_timer.add(task)
    elif isinstance(command, commands.ConnectionCommand) and command.connection not in self.transports:
        pass  # The connection has already been closed.
    elif isinstance(command, commands.SendData):
        writer = self.transports[command.connection].writer
        assert writer
        if not writer.is_closing():
            writer.write(command.data)
    elif isinstance(command, commands.CloseTcpConnection):
        self.close_connection(command.connection, command.half_close)
    elif isinstance(command, commands.CloseConnection):
        self.close_connection(command.connection, False)
    elif isinstance(command, commands.Log):
        self.log(command.message, command.level)
    else:
        raise RuntimeError(f"Unexpected command: {command}")


# -- a connection's own tasks ------------------------------------------------------------------
# Relies on: server.ConnectionHandler.handle_client and handle_connection as in mitmproxy 12.3.1 (their
# sources are checked by tests/test_mitmcompat.py: the two below are copies of them), ConnectionHandler
# making its watchdog as `TimeoutWatchdog(timeout, self.on_timeout)` from server.py's globals, and the
# watchdog's interface the rest of mitmproxy uses: register_activity() and disarm().


class TimerWatchdog:
    """mitmproxy's TimeoutWatchdog on one loop timer instead of a task that sleeps in a loop.

    Why: the task, its coroutines, the Event it waits on and its sleep were ~1.5 KB per connection
    for as long as the connection lives, an hour for a held ActiveSync Ping. Same behaviour: after
    `timeout` seconds without activity the callback runs (as a task, as before); `disarm()` (a hook
    running) holds the timeout off and counts as activity when it ends. Unlike the original, a
    timeout that falls due while disarmed waits for the disarm to end instead of firing."""

    __slots__ = ("timeout", "callback", "last_activity", "blocker", "_timer", "_running")

    def __init__(self, timeout: float, callback: Callable) -> None:
        self.timeout = timeout
        self.callback = callback
        self.last_activity = time.time()
        self.blocker = 0
        self._timer: asyncio.TimerHandle | None = None
        self._running = False

    def register_activity(self) -> None:
        self.last_activity = time.time()

    def start(self) -> None:
        self._running = True
        self._arm(self.timeout)

    def stop(self) -> None:
        self._running = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, delay: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(max(delay, 0.0), self._check)

    def _check(self) -> None:
        self._timer = None
        if not self._running or self.blocker:
            return  # stopped; or disarmed: re-armed when the disarm ends
        left = self.last_activity + self.timeout - time.time()
        if left > 0:
            self._arm(left)
            return
        self._running = False
        asyncio_utils.create_task(self.callback(), name="timeout watchdog", keep_ref=True)

    @contextlib.contextmanager
    def disarm(self):
        self.blocker += 1
        try:
            yield
        finally:
            self.blocker -= 1
            if self.blocker == 0:
                self.register_activity()
                if self._running and self._timer is None:
                    self._arm(self.timeout)


def _wake(waiter: asyncio.Future, _task: asyncio.Task) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _set_task_name(task: asyncio.Task, *, name: str, client: tuple | None = None) -> None:
    """asyncio_utils.set_task_debug_info without the two attributes (creation time, client address)
    that give every task of every connection a __dict__ (~370 bytes per connection): only
    mitmproxy's SIGUSR1 task dump prints them, and it still prints each task's name and line."""
    task.set_name(name)


def lean_connections() -> None:
    """A connection's own tasks, lighter (the lean master's): the watchdog a timer (TimerWatchdog),
    the client handler waiting for its connection handler on one future instead of asyncio.wait
    (a set, two coroutines and a future), the connection handler not keeping the last chunk it read
    while it waits for the next (up to 64 KB; a held Ping's request or tickets), and tasks without
    debug attributes. ~4 KB less per held Ping, the same behaviour otherwise."""
    cls = server.ConnectionHandler
    if getattr(cls.handle_client, "_easgate", False):
        return
    original_client, original_connection = cls.handle_client, cls.handle_connection
    server.TimeoutWatchdog = TimerWatchdog  # type: ignore[misc]  (ConnectionHandler.__init__ makes one)
    asyncio_utils.set_task_debug_info = _set_task_name

    async def handle_client(self) -> None:  # mitmproxy 12.3.1's, marked where it differs
        asyncio_utils.set_current_task_debug_info(name="client handler", client=self.client.peername)
        self.timeout_watchdog.start()  # differs: no watchdog task

        self.log("client connect")
        await self.handle_hook(server_hooks.ClientConnectedHook(self.client))
        if self.client.error:
            self.log("client kill connection")
            writer = self.transports.pop(self.client).writer
            assert writer
            writer.close()
        else:
            await self.server_event(events.Start())
            handler = asyncio_utils.create_task(
                self.handle_connection(self.client), name="client connection handler", keep_ref=False,
                client=self.client.peername)
            self.transports[self.client].handler = handler
            if not handler.done():  # differs: one future, not asyncio.wait([handler])
                waiter = asyncio.get_running_loop().create_future()
                wake = functools.partial(_wake, waiter)
                handler.add_done_callback(wake)
                try:
                    await waiter
                finally:
                    handler.remove_done_callback(wake)
            if not handler.cancelled() and (e := handler.exception()):
                self.log(f"connection handler has crashed: {e}", logging.ERROR, exc_info=(type(e), e, e.__traceback__))

        self.timeout_watchdog.stop()  # differs: instead of cancelling the watchdog task
        while self.wakeup_timer:
            timer = self.wakeup_timer.pop()
            timer.cancel()

        self.log("client disconnect")
        self.client.timestamp_end = time.time()
        await self.handle_hook(server_hooks.ClientDisconnectedHook(self.client))

        if self.transports:
            self.log("closing transports...", logging.DEBUG)
            for io in self.transports.values():
                if io.handler:
                    io.handler.cancel("client disconnected")
            await asyncio.wait([x.handler for x in self.transports.values() if x.handler])
            self.log("transports closed!", logging.DEBUG)

    async def handle_connection(self, connection_: connection.Connection) -> None:  # mitmproxy 12.3.1's
        cancelled = None
        reader = self.transports[connection_].reader
        assert reader
        while True:
            try:
                data = await reader.read(65535)
                if not data:
                    raise OSError("Connection closed by peer.")
            except OSError:
                break
            except asyncio.CancelledError as e:
                cancelled = e
                break

            await self.server_event(events.DataReceived(connection_, data))
            del data  # differs: not kept while waiting for the next chunk

            try:
                await self.drain_writers()
            except asyncio.CancelledError as e:
                cancelled = e
                break

        if cancelled is None and connection_.transport_protocol == "tcp":
            connection_.state &= ~connection.ConnectionState.CAN_READ
        else:
            connection_.state = connection.ConnectionState.CLOSED

        await self.server_event(events.ConnectionClosed(connection_))

        if connection_.state is connection.ConnectionState.CAN_WRITE:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError as e:
                cancelled = e

        try:
            writer = self.transports[connection_].writer
            assert writer
            writer.close()
        except OSError:
            pass
        self.transports.pop(connection_)

        if cancelled:
            raise cancelled

    for f, orig in ((handle_client, original_client), (handle_connection, original_connection)):
        f._easgate = True  # type: ignore[attr-defined]
        f.__wrapped__ = orig  # type: ignore[attr-defined]  (what tests/test_mitmcompat.py checks)
    cls.handle_client = handle_client  # type: ignore[method-assign]
    cls.handle_connection = handle_connection  # type: ignore[method-assign]


# -- connections ------------------------------------------------------------------------------
# Relies on: Proxyserver.connections (client id -> ConnectionHandler), ConnectionHandler.transports
# (Connection -> ConnectionIO with .handler, the connect task, and .writer, an asyncio StreamWriter).


def _io(client: connection.Client, conn: connection.Connection):
    ps = ctx.master.addons.get("proxyserver")
    handler = ps.connections.get(client.id) if ps else None
    return handler.transports.get(conn) if handler else None


def abort(client: connection.Client, conn: connection.Connection | None = None) -> bool:
    """Reset `conn` (default: the client connection itself) of `client`'s connection handler now,
    without a graceful close. False if it is gone or already closing."""
    io = _io(client, conn or client)
    transport = getattr(getattr(io, "writer", None), "transport", None)
    if transport is None or transport.is_closing():
        return False
    transport.abort()
    return True


def cancel_connect(client: connection.Client, server: connection.Server, why: str = "") -> bool:
    """Cancel mitmproxy's task that is still connecting to `server` (mitmproxy then answers the
    client with a 502, and `server.error` reads `why`). False if there is no such task or it has
    finished."""
    io = _io(client, server)
    task: asyncio.Task | None = getattr(io, "handler", None)
    if task is None or task.done():
        return False
    task.cancel(why or None)
    return True


# Relies on: ConnectionHandler.open_connection setting `server.error = str(e)` for a CancelledError
# of the connect (its message, or "connection cancelled" without one), and ConnectionHandler.
# handle_client cancelling the connects of a client that went away with "client disconnected".
CANCELLED_CONNECT_ERRORS = frozenset({"client disconnected", "connection cancelled"})


def connect_was_cancelled(error: str) -> bool:
    """Whether a server connection's error says its connect was cancelled (the client went away, the
    gateway is stopping) rather than failed (refused, unreachable, reset)."""
    return error in CANCELLED_CONNECT_ERRORS


# -- upstream TLS -----------------------------------------------------------------------------
# Relies on: pyOpenSSL's SSL._lib (the cffi OpenSSL binding), Connection._ssl, SSL._openssl_assert,
# and mitmproxy's tlsconfig.DEFAULT_HOSTFLAGS: the same calls mitmproxy's own tls_start_server makes.


def verify_upstream_name(conn: SSL.Connection, sni: str) -> None:
    """Make OpenSSL check the upstream certificate against `sni` (a host name, or an IP address
    against the certificate's IP SANs), as mitmproxy does: no partial wildcards, no CN fallback.
    Sends `sni` as the TLS server name unless it is an IP address (RFC 6066)."""
    param = SSL._lib.SSL_get0_param(conn._ssl)  # type: ignore[attr-defined]
    SSL._lib.X509_VERIFY_PARAM_set_hostflags(param, DEFAULT_HOSTFLAGS)  # type: ignore[attr-defined]
    try:
        ip = ipaddress.ip_address(sni).packed
    except ValueError:
        name = sni.encode("idna")
        conn.set_tlsext_host_name(name)
        ok = SSL._lib.X509_VERIFY_PARAM_set1_host(param, name, len(name))  # type: ignore[attr-defined]
    else:
        ok = SSL._lib.X509_VERIFY_PARAM_set1_ip(param, ip, len(ip))  # type: ignore[attr-defined]
    SSL._openssl_assert(ok == 1)  # type: ignore[attr-defined]


def session_reused(conn: SSL.Connection) -> bool:
    """Whether the handshake resumed the session set with set_session (SSL_session_reused; pyOpenSSL
    has set_session and get_session but not this)."""
    return bool(SSL._lib.SSL_session_reused(conn._ssl))  # type: ignore[attr-defined]


def session_pointer(conn: SSL.Connection) -> object:
    """Which SSL_SESSION the connection holds right now (SSL_get_session: an address, no reference
    kept). A TLS 1.3 client gets a new one for each session ticket it receives. Relies on:
    pyOpenSSL's Session keeping its SSL_SESSION in `_session`."""
    return SSL._lib.SSL_get_session(conn._ssl)  # type: ignore[attr-defined]


def holds_session(conn: SSL.Connection, mark: object) -> bool:
    """Whether `conn` still holds the session `mark` names: a pyOpenSSL Session (it holds a
    reference, so its address is not reused meanwhile) or an address from session_pointer (which,
    once that session is freed, a later one may get)."""
    return session_pointer(conn) == (mark._session if isinstance(mark, SSL.Session) else mark)  # type: ignore[attr-defined]


# Relies on: TLSLayer.receive_data reading every TLS record an established connection receives
# (after the handshake, and, right after the TlsEstablished hook, what arrived with the handshake's
# last flight): a TLS 1.3 server's session tickets come through it; and ServerTLSLayer, the upstream
# side, inheriting it, with the connection in .conn and the pyOpenSSL connection in .tls.
_upstream_read: Callable[[connection.Server, SSL.Connection], None] | None = None


def on_upstream_read(callback: Callable[[connection.Server, SSL.Connection], None] | None) -> None:
    """Call `callback(server, ssl_conn)` after each read of an established upstream TLS connection
    (one process, one callback: the gateway's UpstreamPools). mitmproxy has no hook for records
    that carry no data, and a TLS 1.3 server's session tickets are such records."""
    global _upstream_read
    _upstream_read = callback
    cls = tls_layers.ServerTLSLayer
    if getattr(cls.__dict__.get("receive_data"), "_easgate", False):
        return
    original = cls.receive_data

    def receive_data(self, data: bytes):
        yield from original(self, data)
        if _upstream_read is not None and self.tls is not None:
            _upstream_read(self.conn, self.tls)

    receive_data._easgate = True  # type: ignore[attr-defined]
    cls.receive_data = receive_data  # type: ignore[method-assign]


def release_buffers(conn: SSL.Connection) -> None:
    """SSL_MODE_RELEASE_BUFFERS on one connection (pyOpenSSL has it per context only). Before the
    handshake: OpenSSL 3.2+ gives a record layer the mode it has when the layer is made."""
    SSL._lib.SSL_set_mode(conn._ssl, SSL.MODE_RELEASE_BUFFERS)  # type: ignore[attr-defined]


# OpenSSL 3.5+'s default groups (ssl/t1_lib.c DEFAULT_GROUP_LIST), in the same order and tuples, with
# the key share (`*`) on X25519 only instead of on X25519MLKEM768 and X25519. Relies on: the cffi
# binding's SSL_set1_curves_list (SSL_set1_groups_list) and OpenSSL >= 3.5's group list syntax.
ONE_KEY_SHARE_GROUPS = b"?X25519MLKEM768 / ?*X25519:?secp256r1 / ?X448:?secp384r1:?secp521r1 / ?ffdhe2048:?ffdhe3072"


def one_key_share(conn: SSL.Connection) -> bool:
    """Send one key share (X25519) in this client connection's ClientHello, still offering every
    default group, X25519MLKEM768 first. OpenSSL keeps the private half of each key share it sent
    for the life of the connection: the ML-KEM-768 one is 7.7 KB, for an hour on a held Ping's
    upstream. An upstream that prefers X25519MLKEM768 still gets it (after a HelloRetryRequest, one
    round trip); one that does not (Exchange on Schannel, OpenSSL before 3.5) never uses it anyway.
    False, and the defaults kept, where this OpenSSL does not know the syntax (before 3.5) or the
    binding lacks the call (cryptography 46 does; mitmproxy 12 accepts 42 to 50)."""
    set_groups = getattr(SSL._lib, "SSL_set1_curves_list", None)  # type: ignore[attr-defined]
    if set_groups is None:
        return False
    if set_groups(conn._ssl, ONE_KEY_SHARE_GROUPS) == 1:
        return True
    SSL._lib.ERR_clear_error()  # type: ignore[attr-defined]
    return False


# -- the listener -----------------------------------------------------------------------------
# Relies on: mode_servers.ReverseInstance.listen(host, port) returning a list of asyncio servers,
# and .handle_stream(reader, writer) as the connection callback.


def patch_reverse_listener(reuse_port: bool, backlog: int) -> None:
    """Bind mitmproxy's reverse-proxy listener (TCP) with `backlog` and, if asked, SO_REUSEPORT.
    Port 0 is left to mitmproxy (it picks a port and calls listen again with it)."""
    cls = mode_servers.ReverseInstance
    orig = getattr(cls, "_easgate_orig_listen", None) or cls.listen
    cls._easgate_orig_listen = orig  # type: ignore[attr-defined]

    async def listen(self, host: str, port: int):
        if self.mode.transport_protocol != "tcp" or port == 0:
            return await orig(self, host, port)
        server = await asyncio.start_server(self.handle_stream, host, port, backlog=backlog,
                                            reuse_port=True if reuse_port else None)
        return [server]

    cls.listen = listen  # type: ignore[method-assign]


# -- TLS session ticket keys ------------------------------------------------------------------
# Relies on: pyOpenSSL's OpenSSL being the one linked statically into cryptography's
# `_rust` extension (cryptography >= 42), whose ELF symbol table is kept (the wheel is not
# stripped): `SSL_CTX_ctrl` is there as a local function. The cffi binding exposes neither
# SSL_CTX_ctrl nor SSL_CTX_set_tlsext_ticket_keys nor the ticket key callback, so easgate finds
# SSL_CTX_ctrl's address from that symbol table (relative to the exported PyInit__rust) and calls
# it with SSL_CTRL_SET_TLSEXT_TICKET_KEYS: OpenSSL's own documented way of setting the key
# (16 bytes name, 32 bytes HMAC secret, 32 bytes AES key). Checked before every use: the length
# query must answer 80 and a set key must read back the same.

SSL_CTRL_GET_TLSEXT_TICKET_KEYS = 58
SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
TICKET_KEY_LEN = 80
_ticket_ctrl: object = None  # None: not looked up yet; False: unavailable


def _elf_functions(path: str, names: set[str]) -> dict[str, int]:
    """Address (st_value) of each named function in an ELF64 little-endian file's symbol tables."""
    out: dict[str, int] = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:6] != b"\x7fELF\x02\x01":
            return out
        (shoff,) = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
        secs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
        wanted = {n.encode() for n in names}
        for _name, sh_type, _f, _a, off, size, link, _i, _al, entsize in secs:
            if sh_type not in (2, 11) or not entsize:  # SHT_SYMTAB, SHT_DYNSYM
                continue
            stroff = secs[link][4]
            for i in range(size // entsize):
                st_name, st_info, _o, _s, st_value, _z = struct.unpack_from("<IBBHQQ", data, off + i * entsize)
                if st_info & 0xF != 2 or not st_value:  # STT_FUNC, defined
                    continue
                end = data.find(b"\0", stroff + st_name)
                n = data[stroff + st_name:end]
                if n in wanted:
                    out[n.decode()] = st_value
    return out


def _ticket_key_ctrl():
    """SSL_CTX_ctrl as a cffi function pointer, or None when it can't be found and checked."""
    global _ticket_ctrl
    if _ticket_ctrl is None:
        _ticket_ctrl = False
        try:
            syms = _elf_functions(_rust.__file__, {"SSL_CTX_ctrl", "PyInit__rust"})
            if {"SSL_CTX_ctrl", "PyInit__rust"} <= syms.keys():
                base = ctypes.cast(ctypes.CDLL(_rust.__file__).PyInit__rust, ctypes.c_void_p).value - syms["PyInit__rust"]
                fn = SSL._ffi.cast("long (*)(SSL_CTX *, int, long, void *)",  # type: ignore[attr-defined]
                                   base + syms["SSL_CTX_ctrl"])
                probe = SSL.Context(SSL.TLS_SERVER_METHOD)
                if fn(probe._context, SSL_CTRL_GET_TLSEXT_TICKET_KEYS, 0, SSL._ffi.NULL) == TICKET_KEY_LEN:  # type: ignore[attr-defined]
                    _ticket_ctrl = fn
        except Exception as e:  # pragma: no cover - depends on the installed wheel
            logger.debug(f"easgate: SSL_CTX_ctrl not found: {e}")
    return _ticket_ctrl or None


def ticket_keys_settable() -> bool:
    return _ticket_key_ctrl() is not None


def set_ticket_key(ctx: SSL.Context, key: bytes) -> bool:
    """Make `ctx` encrypt and decrypt TLS session tickets (TLS 1.2 and 1.3) with `key` (80 bytes),
    so that every process holding the same key resumes every other's sessions. False (nothing
    changed) when this OpenSSL build does not let easgate set it."""
    if len(key) != TICKET_KEY_LEN:
        raise ValueError(f"a session ticket key is {TICKET_KEY_LEN} bytes, not {len(key)}")
    fn = _ticket_key_ctrl()
    if fn is None:
        return False
    ffi = SSL._ffi  # type: ignore[attr-defined]
    buf = ffi.new("unsigned char[]", key)
    if fn(ctx._context, SSL_CTRL_SET_TLSEXT_TICKET_KEYS, TICKET_KEY_LEN, buf) != 1:
        return False
    return get_ticket_key(ctx) == key


def get_ticket_key(ctx: SSL.Context) -> bytes | None:
    fn = _ticket_key_ctrl()
    if fn is None:
        return None
    ffi = SSL._ffi  # type: ignore[attr-defined]
    out = ffi.new(f"unsigned char[{TICKET_KEY_LEN}]")
    if fn(ctx._context, SSL_CTRL_GET_TLSEXT_TICKET_KEYS, TICKET_KEY_LEN, out) != 1:
        return None
    return bytes(out)
