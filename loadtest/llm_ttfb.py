"""Time to the first SSE event, direct and through shadowproxy: the LLM streaming figure.

``python -m loadtest.llm_ttfb [--streams 200] [--rounds 3] [--delay-ms 2] [--out DIR]``

Setup, named in the report: the reference and the candidate are ``loadtest.llm_backend``
(deterministic OpenAI-compatible SSE, 16 events 2 ms apart by default), each in a process of
its own; the proxies are ``python -m proxy serve`` processes: ``shadowproxy-no-mirror`` (no
candidate) and ``shadowproxy`` (every stream mirrored to the candidate and compared). The client
is one raw keep-alive HTTP/1.1 connection per target, one stream at a time: it sends a chat
completion with ``"stream": true`` and times, from just before the write, the arrival of the
first whole ``data:`` event, then reads the stream to its end.

Targets are measured in interleaved rounds (each round starts one target later), so drift of
the host hits all alike; the report gives per-round p50/p90 and the added p50 over direct
(median of the rounds, with their spread), and for ``shadowproxy`` the streams compared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httptools
import numpy as np
import yaml

from .mirror_overhead import proxy_config, scrape
from .procs import Processes, SetupError, free_port, wait_http_ok

_BODY = json.dumps(
    {
        "model": "bench",
        "messages": [{"role": "user", "content": "time to first token"}],
        "stream": True,
    }
).encode()
TARGETS = ("direct", "shadowproxy-no-mirror", "shadowproxy")


class _Stream:
    """httptools callbacks for one streamed answer on a kept-alive connection."""

    def __init__(self) -> None:
        self.body = bytearray()
        self.first_at: float | None = None
        self.done = asyncio.get_running_loop().create_future()
        self.status = 0

    def on_body(self, data: bytes) -> None:
        self.body += data
        if self.first_at is None and b"\n\n" in self.body:
            self.first_at = time.perf_counter()

    def on_message_complete(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class Client:
    """One keep-alive connection; streams one at a time."""

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def stream(self) -> float:
        """Seconds from the request's write to its first whole event."""
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        assert self._reader is not None
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {self._host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(_BODY)}\r\n\r\n"
        ).encode()
        state = _Stream()
        parser = httptools.HttpResponseParser(state)
        started = time.perf_counter()
        self._writer.write(head + _BODY)
        while not state.done.done():
            data = await self._reader.read(65536)
            if not data:
                raise SetupError("the connection closed mid-stream")
            parser.feed_data(data)
        if parser.get_status_code() != 200 or state.first_at is None:
            raise SetupError(f"answer {parser.get_status_code()}: {bytes(state.body[:200])!r}")
        return state.first_at - started

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            await self._writer.wait_closed()


async def _start_backend(
    procs: Processes, session: aiohttp.ClientSession, name: str, delay_ms: float
) -> str:
    port = free_port()
    args = [sys.executable, "-m", "loadtest.llm_backend", "--port", str(port)]
    proc = procs.start(name, [*args, "--delay-ms", str(delay_ms)])
    url = f"http://127.0.0.1:{port}"
    await wait_http_ok(session, [f"{url}/v2/health/ready"], proc, procs.log_dir / f"{name}.log")
    return url


async def _start_proxy(
    procs: Processes,
    session: aiohttp.ClientSession,
    name: str,
    reference: str,
    candidate: str | None,
    tmp: Path,
    token: str,
) -> tuple[int, str]:
    data_port, admin_port = free_port(), free_port()
    cand = {"name": "cand", "url": candidate, "sample_rate": 1.0} if candidate else None
    config = proxy_config(data_port, admin_port, token, reference, tmp / name, cand)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = procs.start(name, [sys.executable, "-m", "proxy", "serve", "--config", str(path)])
    log = procs.log_dir / f"{name}.log"
    await wait_http_ok(session, [f"http://127.0.0.1:{data_port}/v2/health/ready"], proc, log)
    return data_port, f"http://127.0.0.1:{admin_port}"


async def measure(args: argparse.Namespace, procs: Processes, tmp: Path) -> dict[str, Any]:
    token = secrets.token_urlsafe(16)
    async with aiohttp.ClientSession() as session:
        ref = await _start_backend(procs, session, "llm-reference", args.delay_ms)
        cand = await _start_backend(procs, session, "llm-candidate", args.delay_ms)
        ports = {"direct": int(ref.rsplit(":", 1)[1])}
        ports["shadowproxy-no-mirror"], _ = await _start_proxy(
            procs, session, "shadowproxy-no-mirror", ref, None, tmp, token
        )
        ports["shadowproxy"], admin = await _start_proxy(
            procs, session, "shadowproxy", ref, cand, tmp, token
        )
        clients = {t: Client("127.0.0.1", ports[t]) for t in TARGETS}
        for client in clients.values():  # connections open, caches warm
            for _ in range(20):
                await client.stream()
        rounds: list[dict[str, list[float]]] = []
        for r in range(args.rounds):
            order = TARGETS[r % len(TARGETS) :] + TARGETS[: r % len(TARGETS)]
            samples: dict[str, list[float]] = {t: [] for t in TARGETS}
            for target in order:
                for _ in range(args.streams):
                    samples[target].append(await clients[target].stream())
            rounds.append(samples)
        for client in clients.values():
            await client.close()
        await asyncio.sleep(1.0)  # the last copies compared
        metrics = await scrape(session, admin, token)
    return {"rounds": rounds, "compared": metrics["mirror"].get("compared", 0)}


def report(args: argparse.Namespace, result: dict[str, Any]) -> str:
    lines = [
        f"LLM streams: time to first event, {args.streams} streams x {args.rounds} rounds"
        f" per target, 16 events {args.delay_ms:g} ms apart (loadtest.llm_backend);"
        " one keep-alive connection per target, one stream at a time",
        f"{'target':<24}{'p50 ms (rounds)':>34}{'p90 ms':>10}{'added p50 ms':>30}",
    ]
    p50 = {t: [float(np.percentile(r[t], 50)) * 1e3 for r in result["rounds"]] for t in TARGETS}
    for t in TARGETS:
        p90 = statistics.median(float(np.percentile(r[t], 90)) * 1e3 for r in result["rounds"])
        added = [p - d for p, d in zip(p50[t], p50["direct"], strict=True)]
        added_text = (
            f"{statistics.median(added):+.3f} ({min(added):+.3f}..{max(added):+.3f})"
            if t != "direct"
            else "-"
        )
        rounds = " ".join(f"{v:.3f}" for v in p50[t])
        lines.append(f"{t:<24}{rounds:>34}{p90:>10.3f}{added_text:>30}")
    sent = args.streams * args.rounds + 20
    lines.append(f"shadowproxy compared {result['compared']} of {sent} streams mirrored")
    return "\n".join(lines)


async def run_llm(bench: Any) -> None:
    """``make bench``'s LLM section (``--only llm``): the same figures, with the bench's
    ``--rounds``, printed and kept with its notes."""
    args = argparse.Namespace(streams=200, rounds=bench.args.rounds, delay_ms=2.0)
    bench.say(f"[{time.strftime('%H:%M:%S')}] LLM streams: time to first event")
    text = report(args, await measure(args, bench.procs, bench.work))
    bench.say(text)
    bench.results.notes.append(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--delay-ms", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="shadowproxy-llm-bench-") as tmp:
        procs = Processes(Path(tmp))
        try:
            result = asyncio.run(measure(args, procs, Path(tmp)))
        except SetupError as exc:
            print(f"llm bench: {exc}", file=sys.stderr)
            return 1
        finally:
            procs.stop_all()
    text = report(args, result)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "llm_ttfb.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
