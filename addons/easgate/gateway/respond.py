"""Answering or dropping a request from a hook, whether or not mitmproxy streams its body."""

from __future__ import annotations

import asyncio

from mitmproxy import ctx, http
from mitmproxy import flow as mflow
from mitmproxy.utils import human

from . import mitmcompat


def answer(flow: http.HTTPFlow, response: http.Response) -> None:
    """Answer a request from requestheaders, or close it when mitmproxy streams its body.

    mitmproxy can't answer a request whose body it streams (`stream_large_bodies`): "Can't set a
    response and enable streaming at the same time" (docs/design-notes.md). Such a request, or one whose
    body may grow past the threshold (chunked), is killed instead: the client sees the connection
    close, and nothing reaches the upstream either way.
    """
    if flow.request.stream or _may_stream(flow.request):
        drop(flow)
        return
    flow.response = response


def drop(flow: http.HTTPFlow) -> None:
    """Kill the flow and reset the client connection (NetScaler's responder DROP).

    `flow.kill()` alone leaves a client that is still sending a body with an open socket nobody
    reads, until the client's own timeout; aborting the transport answers it with a reset now.
    """
    if not flow.killable:  # a flow read from a file (offline replay): record the outcome only
        flow.error = mflow.Error(mflow.Error.KILLED_MESSAGE)
        return
    flow.kill()
    asyncio.get_running_loop().call_soon(mitmcompat.abort, flow.client_conn)


def _may_stream(req: http.Request) -> bool:
    limit = ctx.options.stream_large_bodies if "stream_large_bodies" in ctx.options else None
    if not limit:
        return False
    length = req.headers.get("content-length")
    if length is None:
        return "chunked" in req.headers.get("transfer-encoding", "").lower()
    return not length.isdigit() or int(length) > (human.parse_size(limit) or 0)
