"""Open-loop load at a constant arrival rate, into HDR histograms; closed-loop saturation by wrk.

Open loop: request ``i`` is due at ``t0 + i / rate`` whatever happened before, and its latency
is measured from that due time, so a stall in the server (or in this generator) shows up as
latency, not as fewer requests (no coordinated omission). Latencies go into an HDR histogram
(``hdrhistogram``, microseconds, 3 significant digits), so p99.9 is as exact as p50.

The client is a minimal HTTP/1.1 one on keep-alive connections, not aiohttp: at 1000 requests/s
on two shared cores, aiohttp's client cost about as much CPU as the proxy under test, and every
core the generator takes is one the servers under test do not get. Requests are pre-built bytes;
answers are read by ``Content-Length`` or chunked encoding and discarded.

Scenarios (what is sent): ``small`` (a 1x8 FP32 V2 JSON request), ``tensor`` (a 1 MiB FP32 tensor
in Triton's binary-data extension), ``mix`` (19 small to 1 tensor).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from hdrh.histogram import HdrHistogram

from .mirror_overhead import REQUEST_BODY as SMALL_JSON

TENSOR_BYTES = 1024 * 1024
MAX_US = 120_000_000
PERCENTILES = (50.0, 99.0, 99.9)
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[ \t]*chunked", re.IGNORECASE)
_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)


@dataclass(frozen=True)
class Payload:
    content_type: str
    body: bytes
    extra: tuple[tuple[str, str], ...] = ()


def tensor_payload() -> Payload:
    """1 MiB of FP32 in Triton's binary-data extension: a JSON header, then the raw bytes."""
    values = np.random.default_rng(0).standard_normal(TENSOR_BYTES // 4, dtype=np.float32)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "datatype": "FP32",
                    "shape": [1, values.size],
                    "parameters": {"binary_data_size": TENSOR_BYTES},
                }
            ]
        },
        separators=(",", ":"),
    ).encode()
    return Payload(
        "application/octet-stream",
        header + values.tobytes(),
        (("Inference-Header-Content-Length", str(len(header))),),
    )


def scenario(name: str) -> list[Payload]:
    """The payloads of a scenario, sent in turn (request ``i`` gets ``payloads[i % len]``)."""
    small = Payload("application/json", SMALL_JSON)
    if name == "small":
        return [small]
    if name == "tensor":
        return [tensor_payload()]
    if name == "mix":
        return [small] * 19 + [tensor_payload()]
    raise ValueError(f"unknown scenario {name!r}: small, tensor or mix")


def build_request(url: str, payload: Payload) -> bytes:
    """The whole HTTP/1.1 request, once: sending it is then a single buffer write."""
    parts = urlsplit(url)
    lines = [
        f"POST {parts.path or '/'} HTTP/1.1",
        f"Host: {parts.netloc}",
        f"Content-Type: {payload.content_type}",
        f"Content-Length: {len(payload.body)}",
        *(f"{k}: {v}" for k, v in payload.extra),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload.body


class Pool:
    """Keep-alive connections to one host; a new one opens whenever all are busy."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._all: list[asyncio.StreamWriter] = []

    async def send(self, request: bytes) -> int:
        """Send ``request``, read the whole answer; return its status."""
        if self._idle:
            reader, writer = self._idle.pop()
        else:
            reader, writer = await asyncio.open_connection(self._host, self._port, limit=2**20)
            self._all.append(writer)
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = _CONTENT_LENGTH.search(head)
        if length:
            await reader.readexactly(int(length.group(1)))
        elif _CHUNKED.search(head):
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                await reader.readexactly(size + 2)
            await reader.readuntil(b"\r\n")
        if _CLOSE.search(head):
            writer.close()
        else:
            self._idle.append((reader, writer))
        return status

    async def close(self) -> None:
        for writer in self._all:
            writer.close()
        for writer in self._all:
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        self._all.clear()
        self._idle.clear()


def histogram() -> HdrHistogram:
    return HdrHistogram(1, MAX_US, 3)


@dataclass
class Run:
    """One open-loop run: latency from the due time (status 200 only), over the measured window."""

    rate: float
    duration_s: float
    latency: HdrHistogram = field(default_factory=histogram)
    send_lag: HdrHistogram = field(default_factory=histogram)
    """How late the generator sent each request: its own share of ``latency``."""
    errors: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    """Requests started, warmup included: what the proxy was asked to mirror."""

    @property
    def ok(self) -> int:
        return int(self.latency.get_total_count())

    def ms(self, percentile: float) -> float | None:
        if not self.ok:
            return None
        return float(self.latency.get_value_at_percentile(percentile)) / 1000.0

    def figures(self) -> dict[str, float | None]:
        out = {f"p{p:g}": self.ms(p) for p in PERCENTILES}
        out["max"] = self.latency.get_max_value() / 1000.0 if self.ok else None
        return out

    def record(self, due: float, sent: float) -> None:
        """One answer, now, to the request due at ``due`` and sent at ``sent``.

        The loop's timers may fire up to a millisecond early (uvloop's resolution): a request
        sent before its due time is timed from its actual send. Timing it from the due time
        (as this did, with max) recorded a fast answer to an early send as 1 us: a third of
        `direct`'s answers at 1000 req/s, which pulled every p50 down."""
        start = min(due, sent)
        self.latency.record_value(max(1, round((time.perf_counter() - start) * 1e6)))
        self.send_lag.record_value(max(1, round((sent - due) * 1e6)))

    def cdf(self) -> tuple[list[float], list[float]]:
        """(latency ms, cumulative share) at each recorded value, for plotting."""
        xs, ys = [], []
        for item in self.latency.get_recorded_iterator():
            xs.append(item.value_iterated_to / 1000.0)
            ys.append(item.total_count_to_this_value / self.ok)
        return xs, ys


async def open_loop(
    url: str,
    payloads: Sequence[Payload],
    rate: float,
    duration_s: float,
    warmup_s: float = 2.0,
    timeout_s: float = 10.0,
) -> Run:
    """Send ``rate`` requests/s for warmup + duration seconds; measure the last ``duration``."""
    requests = [build_request(url, p) for p in payloads]
    pool = Pool(url)
    run = Run(rate, duration_s)
    n_warm = round(rate * warmup_s)
    n_total = n_warm + round(rate * duration_s)

    async def one(i: int, due: float) -> None:
        sent = time.perf_counter()
        try:
            status = await asyncio.wait_for(pool.send(requests[i % len(requests)]), timeout_s)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            if i >= n_warm:
                run.errors[type(exc).__name__] += 1
            return
        if i < n_warm:
            return
        if status != 200:
            run.errors[str(status)] += 1
            return
        run.record(due, sent)

    try:
        await paced(run, n_total, one, timeout_s)
    finally:
        await pool.close()
    return run


async def paced(
    run: Run, n_total: int, one: Callable[[int, float], Awaitable[None]], timeout_s: float
) -> None:
    """Start ``one(i, due)`` for i in 0..n_total at ``run.rate`` a second, each at its due time
    whatever happened before (open loop); wait for the last answers up to ``timeout_s``, then
    cancel what is left."""
    tasks: set[asyncio.Task[None]] = set()
    t0 = time.perf_counter() + 0.02
    try:
        for i in range(n_total):
            due = t0 + i / run.rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(i, due))
            run.sent += 1
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s + 1)
    finally:
        for task in tasks:
            task.cancel()


@dataclass
class Saturation:
    requests_per_s: float
    errors: int
    tool: str


def wrk_saturation(
    url: str, payload: Payload, duration_s: float, connections: int = 32
) -> Saturation | None:
    """Closed-loop throughput by ``wrk`` (one thread), or None where wrk is not installed."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    headers = "".join(
        f'wrk.headers["{k}"] = "{v}"\n'
        for k, v in (("Content-Type", payload.content_type), *payload.extra)
    )
    with tempfile.TemporaryDirectory(prefix="shadowproxy-wrk-") as tmp:
        script, body = Path(tmp) / "post.lua", Path(tmp) / "body.bin"
        body.write_bytes(payload.body)
        script.write_text(
            'wrk.method = "POST"\n'
            f'local f = io.open("{body}", "rb")\nwrk.body = f:read("*all")\nf:close()\n{headers}'
        )
        out = subprocess.run(
            [wrk, "-t1", f"-c{connections}", f"-d{duration_s:g}s", "-s", str(script), url],
            capture_output=True,
            text=True,
            timeout=duration_s + 30,
            check=False,
        ).stdout
    rps = re.search(r"Requests/sec:\s*([\d.]+)", out)
    bad = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    failed = re.search(r"Socket errors:.*?read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(bad.group(1)) if bad else 0
    if failed:
        errors += sum(int(g) for g in failed.groups())
    return Saturation(float(rps.group(1)) if rps else 0.0, errors, "wrk")
