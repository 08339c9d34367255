"""The review worker: the admin plane's heavy reads, in a process of their own.

Listing and sorting thousands of samples, the time series and decoding tensors for the plots
cost tens of milliseconds of CPU each; on the live process's event loop that time would come out
of live latency. The admin app keeps access control (tokens, sessions, CSRF, rate limits) and
the cheap routes, and forwards these GETs, once authorised, to
``python -m proxy.review.admin_worker``: a child at normal CPU priority (not the compare
workers' idle priority, or the review page would starve under load) that serves the same
handlers over a unix socket in a private 0700 directory, reading the same Redis.

The child starts on the first such request (most proxies, and every test, never need it), and a
child that died is started again by the next one; while it starts, requests wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from ..keys import DATA_APP
from ..settings import Settings
from ..wire import child_main, read_frame, spawn_child, write_frame
from . import admin, builds_api

log = logging.getLogger("shadowproxy.admin_worker")

START_TIMEOUT_S = 30.0
# Set by this process's own server for the answer it sends (framing, hop by hop).
NOT_FORWARDED = frozenset({"content-length", "transfer-encoding", "connection", "date", "server"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def offloaded_routes() -> list[tuple[str, Handler]]:
    """The admin GET routes the review worker serves (the same handlers, in its process)."""
    return [
        ("/api/samples", admin.list_samples),
        ("/api/samples/{id}", admin.get_sample),
        ("/api/samples/{id}/tensors", admin.get_tensors),
        ("/api/timeseries", admin.timeseries),
        ("/api/builds", builds_api.list_builds),
        ("/api/builds/diff", builds_api.diff_builds),
        ("/api/builds/{id}", builds_api.get_build),
    ]


class AdminWorker:
    """The admin app's handle on its review worker (owned by the admin app's cleanup context)."""

    def __init__(self, settings_of: Callable[[], Settings]) -> None:
        self._settings_of = settings_of
        """The settings the child gets, read when it starts (the Redis URL is known by then)."""
        self._handlers: set[Handler] = {handler for _, handler in offloaded_routes()}
        self._dir: Path | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._link: asyncio.StreamWriter | None = None
        self._session: aiohttp.ClientSession | None = None
        self._starting: asyncio.Task[None] | None = None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Runs inside the auth middleware: only authorised requests reach the worker."""
        if request.method == "GET" and request.match_info.handler in self._handlers:
            return await self.forward(request)
        return await handler(request)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    async def forward(self, request: web.Request) -> web.Response:
        try:
            session = await self._ready()
            async with session.get(
                f"http://review-worker{request.rel_url}",
                headers={"Accept-Encoding": request.headers.get("Accept-Encoding", "identity")},
            ) as answer:
                body = await answer.read()
                headers = CIMultiDict(
                    (k, v) for k, v in answer.headers.items() if k.lower() not in NOT_FORWARDED
                )
                headers["X-Review-Worker"] = str(self.pid)
                return web.Response(status=answer.status, body=body, headers=headers)
        except (aiohttp.ClientError, OSError, RuntimeError, TimeoutError) as exc:
            log.warning("review worker unavailable (%s); it starts again on the next request", exc)
            await self._stop_process()
            return web.json_response(
                {"error": f"review worker unavailable, try again: {exc}"}, status=503
            )

    async def _ready(self) -> aiohttp.ClientSession:
        if self._session is None or self.pid is None:
            if self._starting is None or self._starting.done():
                self._starting = asyncio.get_running_loop().create_task(self._start())
            # shield: a client that goes away must not cancel a start other requests wait on.
            await asyncio.shield(self._starting)
        assert self._session is not None
        return self._session

    async def _start(self) -> None:
        await self._stop_process()
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="shadowproxy-admin-"))  # 0700 by mkdtemp
        socket_path = self._dir / "review.sock"
        socket_path.unlink(missing_ok=True)  # a dead child's
        proc, reader, writer = await spawn_child("proxy.review.admin_worker")
        self._proc, self._link = proc, writer
        write_frame(writer, (self._settings_of(), str(socket_path)))
        try:
            ready = await asyncio.wait_for(read_frame(reader), timeout=START_TIMEOUT_S)
        except (asyncio.IncompleteReadError, TimeoutError) as exc:
            raise RuntimeError("the review worker did not start; see its log") from exc
        if ready != ("ready",):
            raise RuntimeError(f"the review worker failed to start: {ready!r}")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(socket_path)),
                timeout=aiohttp.ClientTimeout(total=120),
                auto_decompress=False,
            )
        log.info("review worker started (pid %s)", proc.pid)

    async def _stop_process(self) -> None:
        proc, link = self._proc, self._link
        self._proc = self._link = None
        if link is not None:
            link.close()  # the child exits when its link closes
        if proc is not None and proc.returncode is None:
            try:
                await asyncio.wait_for(proc.wait(), timeout=5)
            except TimeoutError:
                proc.kill()
                await proc.wait()

    async def close(self) -> None:
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
            with contextlib.suppress(BaseException):
                await self._starting
        await self._stop_process()
        if self._session is not None:
            await self._session.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


# Here, not in keys.py: this module imports admin, which imports keys.
ADMIN_WORKER = web.AppKey("admin_worker", AdminWorker)


async def _serve(fd: int) -> None:
    from ..app import build_review_app

    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))
    settings, path = await read_frame(reader)
    data = build_review_app(settings)
    runner = web.AppRunner(data, handle_signals=False, access_log=None)
    await runner.setup()  # the store and its Redis client
    app = web.Application()
    app[DATA_APP] = data
    for path_pattern, handler in offloaded_routes():
        app.router.add_get(path_pattern, handler)
    site_runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await site_runner.setup()
    site = web.UnixSite(site_runner, path)
    await site.start()
    os.chmod(path, 0o600)
    write_frame(writer, ("ready",))
    try:
        # The live process holds the other end: when it closes (or dies), this process ends.
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.read()
    finally:
        await site_runner.cleanup()
        await runner.cleanup()
        writer.close()


if __name__ == "__main__":
    child_main(_serve)
