"""A generated hostile corpus of raw HTTP/1 requests for the differential test.

Every request carries `case=<id>` in its User-Agent (the audit log records it, the upstream models
read it), so what an upstream read is matched to the decision the gateway wrote for that request.
A smuggled inner request carries `case=<id>-inner`.
"""

from __future__ import annotations

import base64
import random
from dataclasses import dataclass, field
from urllib.parse import quote

from .models import encode_binary

AS = "/Microsoft-Server-ActiveSync"
HOST = "mail.example.test"
# (user, DeviceId, DeviceType): the policy allows the first two, and nothing else
ALLOWED = [("CONTOSO\\alice", "ApplALLOWED001", "iPhone"), ("bob@contoso.com", "AndrALLOWED002", "Android")]
DENIED = [("CONTOSO\\mallory", "ApplEVIL0666", "iPhone"), ("CONTOSO\\alice", "ApplEVIL0667", "iPhone")]
CMDS = {"Sync": 0, "FolderSync": 9, "Ping": 18, "Provision": 20, "SendMail": 1}


@dataclass
class Case:
    id: str
    data: bytes
    kind: str
    hostile: bool = False  # the strict reading must refuse it (400/414/431, connection closed)
    tags: list[str] = field(default_factory=list)
    cert: str | None = None  # a device certificate the client presents (the gateway inserts NSClientCert for it)


def basic(user: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:pw".encode()).decode()


def plain_query(cmd: str, ident: tuple[str, str, str], rng: random.Random | None = None, variant: str = "plain") -> str:
    user, dev, typ = ident
    names = {"Cmd": cmd, "User": user, "DeviceId": dev, "DeviceType": typ}
    if variant == "lower-names":
        names = {k.lower(): v for k, v in names.items()}
    elif variant == "upper-names":
        names = {k.upper(): v for k, v in names.items()}
    items = list(names.items())
    if rng is not None and variant == "shuffled":
        rng.shuffle(items)
    enc = (lambda v: "".join(f"%{b:02X}" for b in v.encode())) if variant == "all-escaped" else (lambda v: quote(v, safe=""))
    return "&".join(f"{k}={enc(v)}" for k, v in items)


def base64_query(cmd: str, ident: tuple[str, str, str], with_user: bool = True) -> str:
    user, dev, typ = ident
    return quote(encode_binary(CMDS[cmd], dev, typ, user if with_user else None), safe="")


def request(cid: str, method: str = "POST", target: str | None = None, headers: list[tuple[str, str]] | None = None,
            body: bytes = b"", ident: tuple[str, str, str] = ALLOWED[0], version: str = "HTTP/1.1",
            close: bool = True, cl: bool = True) -> bytes:
    """One well-formed request (the corpus mutates the bytes afterwards)."""
    target = target if target is not None else f"{AS}?{plain_query('Sync', ident)}"
    hs = [("Host", HOST), ("User-Agent", f"Apple-iPhone/1 case={cid}"), ("Authorization", basic(ident[0])),
          ("MS-ASProtocolVersion", "14.1")]
    hs += headers or []
    if cl and (body or method in ("POST", "PUT")):
        hs.append(("Content-Length", str(len(body))))
    if close:
        hs.append(("Connection", "close"))
    head = f"{method} {target} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hs) + "\r\n"
    return head.encode("latin-1") + body


def _smuggle(cid: str, outer_method: str, outer_ident, inner_ident, fold: bytes) -> bytes:
    """A folded `Transfer-Encoding: chunked` next to Content-Length: the gateway (Content-Length)
    sees one request whose body is '0 CRLF CRLF' plus a second request; an upstream that splits the
    folded line and prefers Transfer-Encoding reads that second request on its own."""
    inner = request(f"{cid}-inner", "POST", ident=inner_ident, body=b"", close=True)
    body = b"0\r\n\r\n" + inner
    outer = request(cid, outer_method, ident=outer_ident, close=False, cl=False,
                    target=f"{AS}?{plain_query('Sync', outer_ident)}" if outer_method != "OPTIONS" else AS)
    head, _, _ = outer.partition(b"\r\n\r\n")
    return head + b"\r\nContent-Length: %d\r\nX-Pad: x\r\n" % len(body) + fold + b"Transfer-Encoding: chunked\r\n\r\n" + body


def hostile_cases(p: str = "") -> list[Case]:
    """The issue's findings and the strict reading's rules, one case each (all must be refused)."""
    A, D = ALLOWED[0], DENIED[0]
    c: list[Case] = []

    def add(cid: str, data: bytes, kind: str) -> None:
        c.append(Case(p + cid, data, kind, hostile=True, tags=[p + cid, f"{p}{cid}-inner"]))

    add("fold-cert", request(p + "fold-cert", "GET", "/enroll/x", headers=[("X-A", "a\r\n NSClientCert: FORGED")]),
        "obs-fold forging NSClientCert (MDM)")
    add("fold-cert-as", request(p + "fold-cert-as", "POST", headers=[("X-A", "a\r\n\tNSClientCert: FORGED")], ident=A),
        "obs-fold forging NSClientCert (ActiveSync, tab)")
    add("smuggle-te", _smuggle(p + "smuggle-te", "POST", A, D, b" "), "folded Transfer-Encoding smuggling a denied device")
    add("smuggle-te-tab", _smuggle(p + "smuggle-te-tab", "POST", A, D, b"\t"), "the same folded with a tab")
    add("smuggle-options", _smuggle(p + "smuggle-options", "OPTIONS", A, D, b" "), "the same behind OPTIONS")
    add("fold-auth", request(p + "fold-auth", "POST", ident=A, headers=[("X-A", f"a\r\n Authorization: {basic(D[0])}")]),
        "folded second Authorization")
    add("crlf-fold", b"\r\n" + request(p + "crlf-fold", "GET", "/enroll/x", headers=[("X-A", "a\r\n NSClientCert: F")]),
        "an empty line, then obs-fold")
    add("cr-value", request(p + "cr-value", "GET", "/enroll/x", headers=[("X-A", "a\rNSClientCert: FORGED")]),
        "bare CR in a header value")
    add("nul-value", request(p + "nul-value", "POST", ident=A, headers=[("X-A", "a\x00b")]), "NUL in a header value")
    add("ctl-value", request(p + "ctl-value", "POST", ident=A, headers=[("X-A", "a\x0bb")]), "VT in a header value")
    add("del-value", request(p + "del-value", "POST", ident=A, headers=[("X-A", "a\x7fb")]), "DEL in a header value")
    add("nul-path", request(p + "nul-path", "GET", "/enroll/a\x00b"), "NUL in the path")
    add("cr-path", request(p + "cr-path", "GET", "/enroll/a\r"), "bare CR ending the path")
    add("nul-path-as", request(p + "nul-path-as", "POST", f"{AS}\x00?{plain_query('Sync', A)}", ident=A),
        "NUL in the ActiveSync path")
    add("http2", request(p + "http2", "POST", ident=A, version="HTTP/2.0"), "HTTP/2.0 in an HTTP/1 request line")
    add("http12", request(p + "http12", "GET", "/enroll/x", version="HTTP/1.2"), "HTTP/1.2")
    add("http09", request(p + "http09", "GET", "/enroll/x", version="HTTP/0.9"), "HTTP/0.9")
    add("method-nontoken", request(p + "method-nontoken", "G@T", "/enroll/x"), "non-token method")
    add("method-nontoken-as", request(p + "method-nontoken-as", "PO(ST", ident=A), "non-token method, ActiveSync")
    add("bare-lf", request(p + "bare-lf", "GET", "/enroll/x").replace(b"\r\n", b"\n"), "bare LF line ends")
    add("bare-lf-one", request(p + "bare-lf-one", "POST", ident=A).replace(b"\r\nX-", b"\nX-", 1).replace(
        b"\r\nUser-Agent", b"\nUser-Agent"), "one bare LF line end")
    add("name-space", request(p + "name-space", "GET", "/enroll/x", headers=[("X-A ", "b")]), "space before the colon")
    add("name-nontoken", request(p + "name-nontoken", "GET", "/enroll/x", headers=[("X(A)", "b")]), "non-token name")
    add("cl-cl-equal", request(p + "cl-cl-equal", "POST", ident=A, body=b"abcd", headers=[("Content-Length", "4")]),
        "two equal Content-Lengths")
    add("cl-cl-diff", request(p + "cl-cl-diff", "POST", ident=A, body=b"abcd", headers=[("Content-Length", "2")]),
        "two different Content-Lengths")
    add("cl-te", request(p + "cl-te", "POST", ident=A, body=b"0\r\n\r\n", headers=[("Transfer-Encoding", "chunked")]),
        "Content-Length and Transfer-Encoding")
    for i, te in enumerate(["Chunked", "gzip, chunked", "chunked, chunked", "identity", "x-chunked"]):
        add(f"te-{i}", request(p + f"te-{i}", "POST", ident=A, cl=False, body=b"0\r\n\r\n",
                               headers=[("Transfer-Encoding", te)]), f"Transfer-Encoding {te!r}")
    add("te-http10", request(p + "te-http10", "POST", ident=A, cl=False, body=b"0\r\n\r\n", version="HTTP/1.0",
                         headers=[("Transfer-Encoding", "chunked")]), "Transfer-Encoding in HTTP/1.0")
    add("cl-underscore", request(p + "cl-underscore", "POST", ident=A, body=b"abcd", headers=[("Content_Length", "0")]),
        "Content_Length")
    add("cl-plus", request(p + "cl-plus", "POST", ident=A, cl=False, body=b"abcd", headers=[("Content-Length", "+4")]),
        "Content-Length +4")
    add("big-head", request(p + "big-head", "GET", "/enroll/x", headers=[("X-Big", "a" * 5000)]), "head over the limit")
    add("many-headers", request(p + "many-headers", "GET", "/enroll/x", headers=[(f"X-{i}", "a") for i in range(40)]),
        "too many header fields")
    add("long-target", request(p + "long-target", "GET", "/enroll/" + "a" * 1500), "request-target over the limit")
    return c


def pipelined_cases(p: str = "") -> list[Case]:
    """A refused request ends the connection: nothing pipelined after it is read or forwarded."""
    A, D = ALLOWED[0], DENIED[0]
    out = []
    bad = request(p + "pipe-bad", "POST", ident=A, close=False, headers=[("X-A", "a\r\n NSClientCert: FORGED")])
    after = request(p + "pipe-after", "POST", ident=A, close=True)
    out.append(Case(p + "pipe-bad", bad + after, "refused request then an allowed one pipelined", hostile=True,
                    tags=[p + "pipe-bad", p + "pipe-after"]))
    first = request(p + "pipe-ok1", "POST", ident=A, close=False)
    denied = request(p + "pipe-denied", "POST", ident=D, close=False)
    last = request(p + "pipe-ok2", "POST", ident=ALLOWED[1], close=True)
    out.append(Case(p + "pipe-mixed", first + denied + last, "allowed, denied, allowed pipelined",
                    tags=[p + "pipe-ok1", p + "pipe-denied", p + "pipe-ok2"]))
    return out


def generated_cases(seed: int, n: int, p: str = "") -> list[Case]:
    """Case, encoding and query-form variants of well-formed and hostile requests, mixed at random."""
    rng = random.Random(seed)
    out = []
    mutations = ["none"] * 10 + ["fold-cert", "fold-te", "cr-cert", "nul", "bare-lf", "dup-cl", "te-upper",
                 "http2", "options-lower", "method-lower", "expect", "lf-fold-auth"]
    for i in range(n):
        cid = f"{p}g{i:03d}"
        ident = rng.choice(ALLOWED + DENIED)
        cmd = rng.choice(list(CMDS))
        form = rng.choice(["plain", "shuffled", "lower-names", "upper-names", "all-escaped", "base64", "base64-nouser"])
        if form.startswith("base64"):
            q = base64_query(cmd, ident, with_user=form == "base64")
        else:
            q = plain_query(cmd, ident, rng, form)
        path = rng.choice([AS, AS, AS, AS.lower(), AS + "/", "/microsoft-server-activesync", "/" + AS.upper()[1:],
                           "/enroll", "/zdm/cxf/checkin"])
        method = rng.choice(["POST", "POST", "GET", "OPTIONS"])
        m = rng.choice(mutations)
        body = bytes(rng.randrange(0, 40)) if method == "POST" else b""
        extra: list[tuple[str, str]] = []
        hostile = m not in ("none", "expect")
        if m == "options-lower":
            method = rng.choice(["options", "Options"])
        elif m == "method-lower":
            method = rng.choice(["post", "Post"])
        elif m == "expect":
            extra.append(("Expect", "100-continue"))
        elif m == "fold-cert":
            extra.append(("X-A", "a\r\n NSClientCert: FORGED"))
        elif m == "cr-cert":
            extra.append(("X-A", "a\rNSClientCert: FORGED"))
        elif m == "nul":
            extra.append(("X-A", "a\x00"))
        elif m == "dup-cl":
            extra += [("Content-Length", str(len(body)))] * 2
        elif m == "http2":
            pass
        elif m == "lf-fold-auth":
            extra.append(("X-A", f"a\n Authorization: {basic(rng.choice(DENIED)[0])}"))
        if m == "fold-te":
            data = _smuggle(cid, method if method != "GET" else "POST", ident, rng.choice(DENIED), b" ")
        elif m == "te-upper":
            data = request(cid, "POST", f"{path}?{q}", extra + [("Transfer-Encoding", "Chunked")], b"0\r\n\r\n",
                           ident, cl=False)
        else:
            data = request(cid, method, f"{path}?{q}", extra, body, ident,
                           version="HTTP/2.0" if m == "http2" else rng.choice(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0"]),
                           cl=m != "dup-cl" and not (m == "expect" and not body))
            if m == "bare-lf":
                data = data.replace(b"\r\n", b"\n")
        cert = "device-iphone" if rng.random() < 0.25 else None
        out.append(Case(cid, data, m, hostile=hostile, tags=[cid, f"{cid}-inner"], cert=cert))
    return out
