"""The head side of ``loadtest.fuzz``: request bytes for the fast lane, and what must hold.

Heads are built from parts (methods, targets, versions, header lines, line ends) or mutated from
valid requests; each goes to the data port on a fresh connection, which is half-closed unless an
answer comes at once. It must get an answer below 500 or a close, never hang; nothing may be
logged at ERROR by the proxy, and a normal request must be answered 200 after every case.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

_PATIENCE_S = 0.05

_INFER_BODY = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1]}]}'
GOOD_INFER = (
    b"POST /v2/models/m/infer HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n" % len(_INFER_BODY) + _INFER_BODY
)
SEEDS = (
    GOOD_INFER,
    b"GET /v2/health/ready HTTP/1.1\r\nHost: p\r\n\r\n",
    b"GET /v2/models/m/config HTTP/1.1\r\nHost: p\r\nX-Request-Id: abc\r\n\r\n",
    b"POST /v2/models/m/infer HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'5\r\n{"a":\r\n2\r\n1}\r\n0\r\n\r\n',
    GOOD_INFER.replace(b"HTTP/1.1", b"HTTP/1.0"),
    b"PUT /v2/repository/models/m/load HTTP/1.1\r\nHost: p\r\nContent-Length: 2\r\n\r\n{}",
    GOOD_INFER + b"GET /v2/health/ready HTTP/1.1\r\nHost: p\r\n\r\n",
)
_TOKENS = (
    *(b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"\n\n", b"\x00", b" ", b"\t", b":", b"\xff", b"\x7f"),
    *(b"Content-Length: 7\r\n", b"Content-Length: -1\r\n", b"Content-Length: 99999999999\r\n"),
    *(b"Transfer-Encoding: chunked\r\n", b"Connection: close\r\n", b"Expect: 100-continue\r\n"),
    *(b"Upgrade: websocket\r\n", b"HTTP/1.1", b"HTTP/1.0", b"GET /v2", b"POST /v2/models/m/infer"),
    b"X-Long: " + b"a" * 70_000 + b"\r\n",
)


def mutate(raw: bytes, rng: random.Random) -> bytes:
    """``raw`` with one to four random edits."""
    data = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        at = rng.randint(0, len(data))
        how = rng.randrange(6)
        if how == 0 and data:
            data[min(at, len(data) - 1)] = rng.randrange(256)
        elif how == 1:
            data[at:at] = rng.choice(_TOKENS)
        elif how == 2:
            del data[at : at + rng.randint(1, 8)]
        elif how == 3:
            data[at:at] = data[at : at + rng.randint(1, 40)]
        elif how == 4:
            lines = [m.start() for m in re.finditer(rb"\r\n", data)]
            if lines:
                del data[rng.choice(lines)]  # one CRLF becomes a bare LF
        else:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return bytes(data)


def _head(
    method: bytes,
    target: bytes,
    version: bytes,
    fields: list[tuple[bytes, bytes]],
    end: bytes,
    body: bytes,
    length: int | None,
) -> bytes:
    lines = [method + b" " + target + b" " + version]
    lines += [name + b": " + value for name, value in fields]
    if length is not None:
        lines.append(b"Content-Length: %d" % length)
    return end.join(lines) + end + end + body


_NAMES = st.sampled_from(
    (
        *(b"Host", b"Content-Type", b"Content-Length", b"Transfer-Encoding", b"Connection"),
        *(b"Expect", b"Content-Encoding", b"X-Request-Id", b"traceparent", b"X y", b"", b"\x80"),
    )
) | st.binary(min_size=1, max_size=12)
_VALUES = st.sampled_from(
    (
        *(b"p", b"chunked", b"close", b"keep-alive", b"100-continue", b"gzip", b"1", b"-1"),
        *(b"x\x00", b" ", b"a" * 9000, b"identity, chunked", b"0x10", b"\xe9t\xe9"),
    )
) | st.binary(max_size=16)


def heads() -> st.SearchStrategy[bytes]:
    """Request bytes: built from parts, or a valid request mutated."""
    built = st.builds(
        _head,
        st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"get", b"P\x00ST", b""]),
        st.sampled_from(
            (
                *(b"/v2/models/m/infer", b"/v2/health/ready", b"/v2/models/m", b"/v2", b"*"),
                *(b"/v2/models/m/infer?x=1#f", b"/v2/models/%00/infer", b"http://h/v2"),
                b"/v2/\xff",
            )
        )
        | st.binary(max_size=24),
        st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 ", b""]),
        st.lists(st.tuples(_NAMES, _VALUES), max_size=6),
        st.sampled_from([b"\r\n"] * 8 + [b"\n", b"\r", b"\r\r\n", b"\n\r"]),
        st.sampled_from([b"", _INFER_BODY, b"{}", b"0\r\n\r\n"]) | st.binary(max_size=64),
        st.none() | st.integers(0, 80) | st.integers(-(2**70), 2**70),
    )
    mutated = st.builds(mutate, st.sampled_from(SEEDS), st.randoms(use_true_random=False))
    return built | mutated


async def probe(port: int, raw: bytes, hang_s: float) -> str:
    """Send ``raw`` on a fresh connection, and half-close it unless an answer comes at once; the
    first answer's status class, ``closed`` or ``reset``. Raises AssertionError on a 5xx, a
    non-HTTP answer or a hang."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(raw)
            await writer.drain()
        try:
            try:
                # A moment for an answer before the half-close: on EOF aiohttp closes at once,
                # even before it has answered a malformed head 400.
                async with asyncio.timeout(_PATIENCE_S):
                    line = await reader.readline()
            except TimeoutError:
                with contextlib.suppress(ConnectionError):
                    writer.write_eof()  # what is missing never comes: the server must end it
                async with asyncio.timeout(hang_s):
                    line = await reader.readline()
        except TimeoutError:
            raise AssertionError(f"no answer and no close within {hang_s}s") from None
        except ConnectionError:
            return "reset"
    finally:
        writer.close()
    if not line:
        return "closed"
    status = re.match(rb"HTTP/\d\.\d (\d{3}) ", line)  # aiohttp answers HTTP/0.9 as 0.9
    assert status is not None, f"not an HTTP status line: {line!r}"
    code = int(status[1])
    assert code < 500, f"answered {line!r}"
    return f"{code // 100}xx"


async def still_serves(port: int, hang_s: float) -> None:
    """A normal infer request on a fresh connection is answered 200."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(GOOD_INFER)
        async with asyncio.timeout(hang_s):
            line = await reader.readline()
    finally:
        writer.close()
    assert line.startswith(b"HTTP/1.1 200 "), f"a normal request got {line!r}"


class ErrorLog(logging.Handler):
    """What the proxy logged at ERROR or above (a crash inside it is logged, not raised).

    aiohttp's server logs each malformed request it answers 400 at ERROR too (``aiohttp.server``,
    with the parser's exception): that is its answer working, not a crash, and is not counted."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("shadowproxy"):
            self.messages.append(f"{record.name}: {record.getMessage()}")

    @contextlib.contextmanager
    def installed(self) -> Iterator[ErrorLog]:
        root = logging.getLogger()
        root.addHandler(self)
        try:
            yield self
        finally:
            root.removeHandler(self)


def fuzz_heads(
    loop: asyncio.AbstractEventLoop,
    port: int,
    examples: int,
    counts: Counter[str],
    errors: ErrorLog,
    hang_s: float = 10.0,
) -> None:
    """One hypothesis run of ``examples`` heads against the proxy on ``port``, whose event loop
    ``loop`` runs in another thread. Raises on the first failure (after shrinking it)."""

    def run(coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, loop)
        return future.result(hang_s * 3)

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate, Phase.shrink],
    )
    @given(raw=heads())
    def case(raw: bytes) -> None:
        counts[f"head {run(probe(port, raw, hang_s))}"] += 1
        run(still_serves(port, hang_s))
        assert not errors.messages, f"the proxy logged: {errors.messages}"

    case()
