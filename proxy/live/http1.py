"""HTTP/1.1 on the wire for the fast lane: which request heads it takes, and answers as bytes.

Parsing is llhttp's (``httptools``), the parser behind uvicorn: strict, and fast enough that a
head costs a few microseconds. Anything unusual (another HTTP version, Transfer-Encoding, Expect,
Upgrade, a doubled or malformed length, a head llhttp refuses) is not taken: aiohttp's server
serves it, with its own answers for what is malformed.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from http import HTTPStatus

import httptools
from multidict import CIMultiDict

from ..errors import UpstreamError
from ..protocols.v2_rest.routes import MIRRORED, Route, RouteKind, classify
from ..settings import Settings
from .forwarding import HOP_BY_HOP

# What every request the fast lane takes starts with: infer and generate calls, OpenAI-compatible
# calls, and reads (health, metadata).
_PREFIXES = (b"POST /v2/models/", b"GET /v2", b"POST /v1/")
_RESPONSE_DROP = frozenset(n.encode() for n in (*HOP_BY_HOP, "content-length"))


@dataclass(slots=True)
class Head:
    """A parsed request head the fast lane may serve."""

    method: str
    target: str
    route: Route
    headers: CIMultiDict[str]
    content_length: int
    keep_alive: bool


class _HeadParser:
    """httptools callbacks for one request head."""

    __slots__ = ("headers", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[str, str]] = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))


def may_be_fast(buf: bytes | bytearray) -> bool:
    """Whether a request starting with ``buf`` can still turn out to be one for the fast lane."""
    return any(buf[: len(p)] == p[: len(buf)] for p in _PREFIXES)


def head_end(buf: bytes | bytearray, start: int = 0) -> int:
    """Where the head in ``buf`` ends (just past its blank line), or -1 if it has not yet.

    A blank line is found whichever line ends a client used (CRLF, or a bare LF, which is then
    refused: see ``parse_head``), so a head is never waited on past its end. ``start`` skips
    what an earlier call already searched, so a head sent one byte at a time costs linear time.
    """
    start = max(0, start - 2)
    lf_lf = buf.find(b"\n\n", start)
    lf_crlf = buf.find(b"\n\r\n", start)
    if lf_lf < 0:
        return -1 if lf_crlf < 0 else lf_crlf + 3
    if lf_crlf < 0 or lf_lf < lf_crlf:
        return lf_lf + 2
    return lf_crlf + 3


def _bare_cr_or_lf(raw: bytes) -> bool:
    """Whether any CR or LF in ``raw`` is not part of a CRLF (RFC 9112 2.2: a request smuggling
    vector). llhttp refuses them too; this does not depend on the version installed."""
    pairs = raw.count(b"\r\n")
    return raw.count(b"\n") != pairs or raw.count(b"\r") != pairs


def parse_head(raw: bytes, settings: Settings, max_body: int) -> Head | None:
    """The head if the fast lane may serve this request, else None (aiohttp will)."""
    if not raw.startswith(_PREFIXES) or _bare_cr_or_lf(raw):
        return None  # aiohttp's strict parser answers a bare CR or LF with a 400
    fields = _HeadParser()
    parser = httptools.HttpRequestParser(fields)
    try:
        parser.feed_data(raw)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return None  # aiohttp answers it with its own 400
    if parser.get_http_version() != "1.1" or parser.should_upgrade():
        return None
    headers = CIMultiDict(fields.headers)
    if "Transfer-Encoding" in headers or "Expect" in headers:
        return None
    method = parser.get_method().decode("latin-1")
    lengths = headers.getall("Content-Length", [])
    if method == "GET":
        length, kind = 0, RouteKind.READ
        if lengths:
            return None  # a GET with a body: unusual enough for aiohttp
    elif len(lengths) == 1 and lengths[0].isdigit() and int(lengths[0]) <= max_body:
        length, kind = int(lengths[0]), RouteKind.INFER
    else:
        return None
    target = fields.url.decode("latin-1")
    route = classify(method, target)
    if kind is RouteKind.INFER and route.kind in MIRRORED:
        kind = route.kind  # infer, generate, OpenAI: every POST the fast lane takes
    if route.kind is not kind:
        return None
    # Requests in a canary split go to aiohttp's path, which holds the split; an OpenAI call
    # names its model in the body, so none is taken here while a canary runs.
    if settings.canary_serves(route.model or "") or (
        route.kind is RouteKind.OPENAI and settings.canary is not None
    ):
        return None
    return Head(method, target, route, headers, length, parser.should_keep_alive())


def error_bytes(err: UpstreamError, close: bool) -> bytes:
    return refusal(err.status, str(err), close)


def refusal(status: int, detail: str, close: bool = True) -> bytes:
    """An answer in the V2 error shape (``{"error": ...}``), from the proxy itself."""
    body = json.dumps({"error": detail}).encode()
    return render(status, b"", [(b"Content-Type", b"application/json; charset=utf-8")], body, close)


def render(
    status: int, reason: bytes, headers: list[tuple[bytes, bytes]], body: bytes, close: bool
) -> bytes:
    """The answer as the client gets it, framed by its length (as aiohttp frames a whole one)."""
    return response_head(status, reason, headers, b"%d" % len(body), close) + body


def response_head(
    status: int,
    reason: bytes,
    headers: list[tuple[bytes, bytes]],
    length: bytes | None,
    close: bool,
) -> bytes:
    """An answer's head: end-to-end headers, framed by ``length``, or chunked when None."""
    drop = _RESPONSE_DROP
    named = [v for n, v in headers if n.lower() == b"connection"]
    if named:
        drop = drop | {t.strip().lower() for v in named for t in v.split(b",")}
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason or reason_phrase(status))]
    lines.extend(b"%s: %s\r\n" % (n, v) for n, v in headers if n.lower() not in drop)
    if length is None:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    else:
        lines.append(b"Content-Length: %s\r\n" % length.strip())
    if close:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def reason_phrase(status: int) -> bytes:
    with contextlib.suppress(ValueError):
        return HTTPStatus(status).phrase.encode()
    return b""
