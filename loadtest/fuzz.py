"""Fuzz the fast lane's head parser and the V2 codecs for minutes: ``python -m loadtest.fuzz``.

``python -m loadtest.fuzz --minutes 3`` runs a proxy in this process (fast lane on, a candidate
mirrored in-process, an embedded Redis) in front of two ``loadtest.fake_backend`` apps, and
alternates two hypothesis runs until the time is up:

- **heads**: request heads built from parts (methods, targets, versions, header lines, line
  ends) or mutated from valid requests (bytes flipped, CR/LF and framing headers inserted,
  slices cut or doubled), each sent on a fresh connection to the data port, half-closed unless
  an answer comes at once. What must hold: an answer below 500 or a close, never a hang
  (``--hang-s``), nothing logged at ERROR by the proxy, and a normal request answered 200 after
  every case.
- **codecs**: V2 bodies built from JSON parts (outputs of any datatype, shape and data,
  binary parts, header lengths, gzip/deflate) or mangled, through ``decode_infer_response``,
  ``parse_request_header`` and ``unsafe_to_mirror``: they return, or raise ``MalformedMessage``
  (``TooLarge`` included), and nothing else.

The strategies and checks are in ``loadtest.fuzz_heads`` and ``loadtest.fuzz_codecs``. It
prints the counts of each outcome, and on a failure the smallest input hypothesis found, and
exits 1. ``tests/proxy/test_fuzz.py`` runs the same checks for a few seconds in the suite.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from loadtest.fuzz_codecs import fuzz_codecs
from loadtest.fuzz_heads import ErrorLog, fuzz_heads


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
