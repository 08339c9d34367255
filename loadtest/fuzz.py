"""Fuzz the fast lane's head parser and the V2 codecs for minutes: ``python -m loadtest.fuzz``.

``python -m loadtest.fuzz --minutes 3`` runs a proxy in this process (fast lane on, a candidate
mirrored in-process, an embedded Redis) in front of two ``loadtest.fake_backend`` apps, and
alternates two hypothesis runs until the time is up:

- **heads**: request heads built from parts (methods, targets, versions, header lines, line
  ends) or mutated from valid requests (bytes flipped, CR/LF and framing headers inserted,
  slices cut or doubled), each sent on a fresh connection to the data port, which is then
  half-closed. What must hold: an answer below 500 or a close, never a hang (``--hang-s``),
  nothing logged at ERROR by the proxy, and a normal request answered 200 after every case.
- **codecs**: V2 bodies built from JSON parts (outputs of any datatype, shape and data,
  binary parts, header lengths, gzip/deflate) or mangled, through ``decode_infer_response``,
  ``parse_request_header`` and ``unsafe_to_mirror``: they return, or raise ``MalformedMessage``
  (``TooLarge`` included), and nothing else.

It prints the counts of each outcome, and on a failure the smallest input hypothesis found, and
exits 1. ``tests/proxy/test_fuzz.py`` runs the same checks for a few seconds in the suite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import logging
import random
import re
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from aiohttp import web
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from proxy.codec import (
    HEADER_LENGTH,
    MalformedMessage,
    TooLarge,
    decode_infer_response,
    parse_request_header,
    unsafe_to_mirror,
)

# --- heads ------------------------------------------------------------------------------------

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


# --- codecs -----------------------------------------------------------------------------------

_DATATYPES = ["BOOL", "BYTES", "BF16", "FP16", "FP32", "FP64", "INT8", "INT64", "UINT8", "UINT64"]
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
_OUTPUT = st.fixed_dictionaries(
    {},
    optional={
        "name": st.text(max_size=4) | _JSON,
        "datatype": st.sampled_from(_DATATYPES) | _JSON,
        "shape": st.lists(st.integers(-2, 5) | st.just(2**40), max_size=3) | _JSON,
        "data": st.lists(st.integers(-300, 300) | st.floats() | st.text(max_size=3), max_size=8)
        | _JSON,
        "parameters": st.fixed_dictionaries(
            {}, optional={"binary_data_size": st.integers(-1, 64), "shared_memory_region": _JSON}
        )
        | _JSON,
    },
)
_MESSAGE = st.fixed_dictionaries(
    {},
    optional={
        "outputs": st.lists(_OUTPUT, max_size=4) | _JSON,
        "inputs": st.lists(_OUTPUT, max_size=3) | _JSON,
        "model_name": _JSON,
        "model_version": _JSON,
        "id": _JSON,
        "parameters": st.fixed_dictionaries(
            {}, optional={"sequence_id": _JSON, "sequence_start": _JSON}
        )
        | _JSON,
    },
)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """A V2-like body and its headers: JSON from parts, maybe a binary tail, maybe compressed,
    maybe mangled; or plain random bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200)), {}
    header = json.dumps(draw(_MESSAGE)).encode()
    tail = draw(st.binary(max_size=64))
    headers: dict[str, str] = {}
    if tail:
        length = draw(st.just(len(header)) | st.integers(-2, len(header) + len(tail) + 2))
        headers[HEADER_LENGTH] = draw(st.just(str(length)) | st.text(max_size=4))
    raw = header + tail
    coding = draw(st.sampled_from(["", "", "gzip", "deflate", "br", "identity", " GZIP "]))
    if coding.strip().lower() == "gzip":
        raw = gzip.compress(raw)
    elif coding == "deflate":
        raw = zlib.compress(raw)
    if coding:
        headers["Content-Encoding"] = coding
    if draw(st.booleans()):
        raw = mutate(raw, draw(st.randoms(use_true_random=False)))
    return raw, headers


def check_codecs(body: bytes, headers: dict[str, str]) -> tuple[str, str]:
    """The outcome of decoding ``body`` as an answer and as a request; anything raised other
    than ``MalformedMessage`` escapes (a bug)."""
    cap = 1024 * 1024
    try:
        decode_infer_response(body, headers, max_inflated_bytes=cap, max_outputs=8)
        answer = "ok"
    except TooLarge:
        answer = "too_large"
    except MalformedMessage:
        answer = "malformed"
    try:
        unsafe = unsafe_to_mirror(parse_request_header(body, headers, max_inflated_bytes=cap))
        request = "ok" if unsafe is None else unsafe
    except TooLarge:
        request = "too_large"
    except MalformedMessage:
        request = "malformed"
    return answer, request


def fuzz_codecs(examples: int, counts: Counter[str]) -> None:
    @settings(max_examples=examples, deadline=None, database=None)
    @given(case=bodies())
    def case(case: tuple[bytes, dict[str, str]]) -> None:
        answer, request = check_codecs(*case)
        counts[f"answer {answer}"] += 1
        counts[f"request {request}"] += 1

    case()


# --- the long run -----------------------------------------------------------------------------


class _Proxy:
    """A proxy (fast lane on, mirroring in-process) and two fake backends, on an event loop of
    their own in a thread, so hypothesis can drive clients from this one."""

    def __init__(self, state: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._state = state
        self._cleanups: list[Callable[[], Any]] = []
        self.port = 0

    def __enter__(self) -> _Proxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(120)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(120)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)

    async def _backend(self) -> str:
        from loadtest.fake_backend import make_app

        runner = web.AppRunner(make_app(0.0, True), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._cleanups.append(runner.cleanup)
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    async def _start(self) -> None:
        from proxy.app import ProxyRunner
        from proxy.buffer.embedded import EmbeddedRedis
        from proxy.settings import settings_from_mapping

        redis = EmbeddedRedis(self._state)
        redis.start()
        self._cleanups.append(redis.stop)
        ref, cand = await self._backend(), await self._backend()
        config = {
            "listen": {"host": "127.0.0.1", "port": 0},
            "admin": {"host": "127.0.0.1", "port": 0, "token": "fuzz-admin-token-0123456789"},
            "reference": {"name": "ref", "url": ref, "timeout_s": 10},
            "candidates": [{"name": "c", "url": cand}],
            "buffer": {"redis_url": redis.url},
            "proxy": {
                "mirror_process": False,
                "shed_lag_ms": 0,
                "head_timeout_s": 1.0,
                "idle_timeout_s": 2.0,
            },
        }
        runner = ProxyRunner(settings_from_mapping(config))
        await runner.start()
        self._cleanups.append(runner.stop)
        self.port = runner.data_port

    async def _stop(self) -> None:
        for cleanup in reversed(self._cleanups):
            result = cleanup()
            if asyncio.iscoroutine(result):
                await result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.fuzz", description=__doc__)
    parser.add_argument("--minutes", type=float, default=3.0, help="how long to fuzz")
    parser.add_argument("--batch", type=int, default=200, help="examples per hypothesis run")
    parser.add_argument("--hang-s", type=float, default=10.0, help="an answer later is a hang")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # its warnings (each refused head) would flood
    counts: Counter[str] = Counter()
    deadline = time.monotonic() + args.minutes * 60
    rounds = 0
    with (
        tempfile.TemporaryDirectory() as state,
        _Proxy(Path(state)) as proxy,
        ErrorLog().installed() as errors,
    ):
        try:
            while time.monotonic() < deadline:
                fuzz_heads(proxy.loop, proxy.port, args.batch, counts, errors, args.hang_s)
                fuzz_codecs(args.batch * 5, counts)
                rounds += 1
                print(f"round {rounds}: {sum(counts.values())} outcomes", flush=True)
        except Exception as exc:
            print(f"FAILED after {rounds} rounds: {type(exc).__name__}: {exc}")
            for note in getattr(exc, "__notes__", ()):  # hypothesis: the smallest input found
                print(f"  {note}")
            _print(counts)
            return 1
    _print(counts)
    return 0


def _print(counts: Counter[str]) -> None:
    width = max((len(k) for k in counts), default=0)
    for key, n in sorted(counts.items()):
        print(f"  {key:<{width}}  {n}")


if __name__ == "__main__":
    raise SystemExit(main())
