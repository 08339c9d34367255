"""``shadowproxy serve``: run both planes until SIGINT/SIGTERM, then drain and stop.

``serve --workers N`` runs N such processes on the same ports (SO_REUSEPORT: the kernel spreads
connections over them), so the live path can use more than one core. They share one Redis:
``buffer.redis_url``, or the embedded Redis that the parent starts once and hands to every
worker. Each worker is a whole proxy with its own mirror worker, metrics and circuit breakers;
``/metrics`` on the shared admin port shows whichever worker took the connection.

A worker that dies is reported and started again, so one crash does not halve capacity for good.
A worker that dies within ``CRASH_LOOP_S`` of its start (a port taken, a broken upstream URL)
would only die again: then every worker is stopped and ``serve`` exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import signal
import time
from multiprocessing.connection import wait as wait_any
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from aiohttp.http_exceptions import HttpProcessingError
from pydantic import SecretStr

from .app import ProxyRunner
from .buffer.embedded import EmbeddedRedis, running_url, start_embedded
from .errors import ConfigError
from .reload import plan_reload
from .settings import Settings, load_settings

log = logging.getLogger("shadowproxy")

CRASH_LOOP_S = 10.0
"""A worker that dies sooner than this after its start is not restarted (see the module doc)."""
STOP_GRACE_S = 30.0
"""How long stopping workers may drain their mirrors before they are killed."""


def install_event_loop_policy() -> None:
    """uvloop where it is installed: a faster loop for the live path."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class QuietBadRequests(logging.Filter):
    """aiohttp logs every malformed request it answers 400 at ERROR, with a traceback: a
    hostile client could fill the logs at the rate it sends. The client has its 400; the log
    gets one line, at most once a second, with how many were answered since."""

    def __init__(self, every_s: float = 1.0) -> None:
        super().__init__()
        self._every = every_s
        self._last = 0.0
        self._quiet = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        now = time.monotonic()
        if now - self._last < self._every:
            self._quiet += 1
            return False
        record.msg, record.args = (
            "malformed request answered %s: %s (%d more since)",
            (
                exc.code,
                exc.message,
                self._quiet,
            ),
        )
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        self._last, self._quiet = now, 0
        return True


def tune_gc() -> None:
    """Keep garbage collection from pausing the live path (measured, see loadtest/README.md).

    Every mirrored request leaves short-lived objects behind, and with the default thresholds
    the collector ran ~13 times a second with 5-15 ms pauses, plus long full collections that
    walked every object allocated at start-up. Freezing the start-up heap takes it out of all
    future collections; a larger first-generation threshold makes the remaining ones rare.
    With a 200 ms candidate at 150 req/s this took live p99 from 149 ms to 8 ms (6 ms unmirrored).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 50)


async def serve(
    settings: Settings, *, reuse_port: bool = False, config_path: Path | None = None
) -> None:
    """Run until SIGINT/SIGTERM: stop accepting (HTTP and gRPC), let live requests in flight
    finish (gRPC calls within ``proxy.drain_timeout_s``), drain the mirror queue (the same
    timeout), write out what is batched or spooled, return.
    SIGHUP reloads ``config_path`` (see ``reload``)."""
    if settings.admin.token is None:
        raise ConfigError("admin.token: required by serve (the admin plane needs a token)")
    runner = ProxyRunner(settings, reuse_port=reuse_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()
    if config_path is not None:

        def on_hup() -> None:
            task = loop.create_task(_reload(runner, config_path))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
    await runner.start()
    logging.getLogger("aiohttp.server").addFilter(QuietBadRequests())
    tune_gc()
    log.info(
        "shadowproxy: pid %d: data plane on %s:%d -> reference %s (%s); admin on %s:%d; "
        "candidates: %s",
        os.getpid(),
        settings.listen.host,
        runner.data_port,
        settings.reference.name,
        settings.reference.url,
        settings.admin.host,
        runner.admin_port,
        ", ".join(c.name for c in settings.candidates) or "none",
    )
    if runner.grpc_port is not None:
        log.info(
            "shadowproxy: pid %d: gRPC on %s:%d -> reference %s (%s)",
            os.getpid(),
            settings.listen.host,
            runner.grpc_port,
            settings.reference.name,
            settings.reference.grpc_url,
        )
    try:
        await stop.wait()
    finally:
        log.info("shadowproxy: pid %d stopping (draining mirrors)", os.getpid())
        await asyncio.gather(*reloads, return_exceptions=True)
        await runner.stop()


def _load_for_reload(path: Path, running: Settings) -> Settings:
    """The config file as a reload sees it. ``serve --workers`` hands its workers the URL of the
    embedded Redis it started; a file that still omits ``buffer.redis_url`` means that one."""
    new = load_settings(path)
    url = running.buffer.redis_url
    if (
        new.buffer.redis_url is None
        and url is not None
        and running_url(new.buffer.state_dir) == url.get_secret_value()
    ):
        new = new.model_copy(update={"buffer": new.buffer.model_copy(update={"redis_url": url})})
    return new


async def _reload(runner: ProxyRunner, path: Path) -> None:
    try:
        new = await asyncio.to_thread(_load_for_reload, path, runner.settings)
    except ConfigError as exc:
        log.error("shadowproxy: SIGHUP: %s; still running the previous config", exc)
        return
    plan = await runner.reload(new)
    log.info(
        "shadowproxy: pid %d reloaded %s: applied %s",
        os.getpid(),
        path,
        ", ".join(plan.applied) or "nothing (no change)",
    )
    if plan.need_restart:
        log.warning(
            "shadowproxy: SIGHUP: changed but kept until a restart: %s",
            ", ".join(plan.need_restart),
        )


def _worker_main(settings: Settings, config_path: Path | None) -> None:
    # Until this worker's loop installs its own handlers, a stop signal ends it at once (the
    # parent's handlers, inherited by the fork, would only set a flag nobody reads here), and
    # a reload signal is ignored (its default action would end it).
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        asyncio.run(serve(settings, reuse_port=True, config_path=config_path))
    except ConfigError as exc:
        log.error("shadowproxy: worker %d: %s", os.getpid(), exc)
        raise SystemExit(2) from exc


def _check_workers(settings: Settings, workers: int) -> None:
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if settings.admin.token is None:
        raise ConfigError("admin.token: required by serve (the admin plane needs a token)")
    ports = (
        ("listen.port", settings.listen.port),
        ("listen.grpc_port", settings.listen.grpc_port),
        ("admin.port", settings.admin.port),
    )
    for name, port in ports:
        if port == 0:
            # Each worker would bind a different free port: there would be no shared port.
            raise ConfigError(f"{name}: 0 (any free port) cannot be shared by --workers")


class _Workers:
    """The worker processes, started by fork so each gets the parent's settings as they are."""

    def __init__(self, settings: Settings, count: int, config_path: Path | None) -> None:
        self.settings = settings
        """What a worker started from now on gets (a reload updates it)."""
        self._config_path = config_path
        self._count = count
        self._ctx = multiprocessing.get_context("fork")
        self.procs: dict[int, tuple[BaseProcess, float]] = {}
        """Sentinel -> (process, monotonic start time)."""

    def start_one(self) -> None:
        proc = self._ctx.Process(
            target=_worker_main, args=(self.settings, self._config_path), name="shadowproxy"
        )
        proc.start()
        self.procs[proc.sentinel] = (proc, time.monotonic())

    def start_all(self) -> None:
        while len(self.procs) < self._count:
            self.start_one()

    def reap(self, sentinels: list[int]) -> bool:
        """Handle workers that exited; False when one died too soon to be restarted."""
        keep_going = True
        for sentinel in sentinels:
            proc, started = self.procs.pop(sentinel)
            proc.join()
            lived = time.monotonic() - started
            log.error(
                "shadowproxy: worker %d exited with %s after %.1f s", proc.pid, proc.exitcode, lived
            )
            if lived < CRASH_LOOP_S:
                keep_going = False
        return keep_going

    def signal_all(self, signum: int) -> None:
        for proc, _ in self.procs.values():
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signum)

    def reload(self) -> None:
        """Each worker reloads the config file itself; workers started later get it too."""
        if self._config_path is None:
            return
        try:
            new = _load_for_reload(self._config_path, self.settings)
        except ConfigError as exc:
            log.error("shadowproxy: SIGHUP: %s; still running the previous config", exc)
            return
        self.settings = plan_reload(self.settings, new).settings
        self.signal_all(signal.SIGHUP)

    def stop_all(self) -> None:
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc, _ in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.error("shadowproxy: worker %d did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.join()
        self.procs.clear()


def _shared_redis(settings: Settings) -> tuple[Settings, EmbeddedRedis | None]:
    """Settings that name one Redis for every worker, and the embedded one started for them."""
    if settings.buffer.redis_url is not None:
        return settings, None
    embedded = start_embedded(settings.buffer.state_dir)
    buffer = settings.buffer.model_copy(update={"redis_url": SecretStr(embedded.url)})
    return settings.model_copy(update={"buffer": buffer}), embedded


def serve_workers(settings: Settings, workers: int, config_path: Path | None = None) -> int:
    """Run ``workers`` proxy processes on the same ports (SO_REUSEPORT), sharing one Redis.

    Returns the exit status: 0 after SIGINT/SIGTERM stopped every worker, 1 when a worker kept
    dying (see the module doc).
    """
    _check_workers(settings, workers)
    stopping = reloading = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping, reloading
        if signum == signal.SIGHUP:
            reloading = True
        else:
            stopping = True

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, on_signal) for s in signals}
    settings, embedded = _shared_redis(settings)
    pool = _Workers(settings, workers, config_path)
    status = 0
    try:
        pool.start_all()
        log.info(
            "shadowproxy: %d workers on %s:%d (pids %s)",
            workers,
            settings.listen.host,
            settings.listen.port,
            ", ".join(str(p.pid) for p, _ in pool.procs.values()),
        )
        while not stopping:
            # A short timeout so a signal that arrives while waiting is seen promptly.
            dead = [int(s) for s in wait_any(list(pool.procs), timeout=0.5)]  # type: ignore[arg-type]
            if reloading and not stopping:
                reloading = False
                pool.reload()
            if not dead or stopping:
                continue
            if not pool.reap(dead):
                log.error("shadowproxy: a worker died right after its start; stopping all")
                status = 1
                break
            pool.start_all()
    finally:
        log.info("shadowproxy: stopping %d workers (each drains its mirrors)", len(pool.procs))
        pool.stop_all()
        if embedded is not None:
            embedded.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status
