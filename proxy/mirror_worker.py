"""The mirror worker process (``python -m proxy.mirror_worker FD``), started by ``MirrorLink``.

It runs the same ``MirrorScheduler`` as in-process mirroring, with its own telemetry, sample
store client, compare threads and shadow session, at the lowest CPU priority (SCHED_IDLE on
Linux, else nice +19): when CPU is short, the live path gets it first. It exits when the live
process closes the socket or asks it to (after draining in-flight copies).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time

from aiohttp import web
from multidict import CIMultiDict
from opentelemetry.trace import SpanContext, TraceFlags

from .analysis import Exchange
from .guards import Pacer, stop_task
from .keys import MIRROR, TELEMETRY
from .mirror import MirrorRequest, MirrorScheduler
from .mirror_link import read_frame, route_from_wire, write_frame
from .serve import install_event_loop_policy, tune_gc
from .settings import Settings

log = logging.getLogger("shadowproxy.mirror_worker")


async def run(fd: int) -> None:
    from .app import build_worker_app

    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))
    settings: Settings = await read_frame(reader)
    app = build_worker_app(settings)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    scheduler = app[MIRROR]
    assert isinstance(scheduler, MirrorScheduler)
    scheduler.limit_cpu(settings.proxy.mirror_cpu_budget)
    tune_gc()
    write_frame(writer, ("ready",))
    loop = asyncio.get_running_loop()
    pending: dict[int, asyncio.Future[Exchange | None]] = {}
    received = [0]
    pacing = loop.create_task(_pace(writer, scheduler, received))
    try:
        while True:
            try:
                msg = await read_frame(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            kind = msg[0]
            if kind == "req":
                _, seq, route, query, headers, body, received_at, span, served_by, tag = msg
                received[0] += 1
                future: asyncio.Future[Exchange | None] = loop.create_future()
                pending[seq] = future
                live_span = (
                    SpanContext(span[0], span[1], is_remote=True, trace_flags=TraceFlags(span[2]))
                    if span
                    else None
                )
                scheduler.offer(
                    MirrorRequest(
                        route_from_wire(route),
                        query,
                        CIMultiDict(headers),
                        body,
                        received_at,
                        live_span,
                        future,
                        served_by=served_by,
                        canary=tag,
                    )
                )
            elif kind == "ref":
                _, seq, x = msg
                future_ref = pending.pop(seq, None)
                if future_ref is not None and not future_ref.done():
                    exchange = (
                        None if x is None else Exchange(x[0], x[1], CIMultiDict(x[2]), x[3], x[4])
                    )
                    future_ref.set_result(exchange)
            elif kind == "skip":
                app[TELEMETRY].skipped(msg[1])
            elif kind == "snap":
                snap = await scheduler.snapshot(include_tally=True)
                snap["prometheus"] = app[TELEMETRY].prometheus_text().decode()
                snap["received"] = received[0]
                snap["worker"] = f"pid {os.getpid()}"
                write_frame(writer, ("snap", msg[1], snap))
            elif kind == "close":
                break
    finally:
        await stop_task(pacing)
        for future in pending.values():
            if not future.done():
                future.set_result(None)
        await runner.cleanup()  # drains the scheduler, then closes sessions, store, telemetry
        writer.close()


async def _pace(
    writer: asyncio.StreamWriter, scheduler: MirrorScheduler, received: list[int]
) -> None:
    """Tell the live side, each window, how many copies a second this process can take."""
    pacer = Pacer()
    last: float | None = None
    while True:
        await asyncio.sleep(pacer.window_s)
        rate = pacer.rate(scheduler.taken, scheduler.shed, received[0])
        if rate is not None or last is not None:
            write_frame(writer, ("pace", rate, None))
        last = rate


def main() -> None:
    # Ctrl-C reaches the whole process group: the live process decides when this one stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(19)
    with contextlib.suppress(OSError, AttributeError):
        # Linux: run only on CPU nobody else wants. At nice +19 the worker still took its share
        # of a busy host and showed in live p99; SCHED_IDLE yields at once to any other task.
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    install_event_loop_policy()
    started = time.monotonic()
    asyncio.run(run(int(sys.argv[1])))
    log.debug("mirror worker ran %.0fs", time.monotonic() - started)


if __name__ == "__main__":
    main()
