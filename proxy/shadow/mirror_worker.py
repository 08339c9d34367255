"""The mirror process (``python -m proxy.shadow.mirror_worker FD``), started by ``MirrorLink``.

It is the shadow side's I/O stage: it takes the copies the live process ships, queues them
(bounded in bytes and age), sends them to the candidates, times their answers, pairs them with
the reference's, and hands the pairs to its compare workers (``compare_link``), which run at
idle CPU priority. This process itself runs at the live path's priority: a candidate's answer
is timed here, and a process the host starves would time the host rather than the candidate.
What it costs per copy is kept small (pooled HTTP/1.1 calls, no spans without an exporter),
so that priority does not come out of the live path. It exits when the live process closes the
socket or asks it to (after draining its queue and its compare workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from aiohttp import web
from multidict import CIMultiDict
from opentelemetry.trace import SpanContext, TraceFlags

from ..keys import MIRROR, TELEMETRY
from ..serve import tune_gc
from ..settings import Settings
from ..telemetry import merge_prometheus_text
from ..wire import child_main, exchange_from_wire, read_frame, route_from_wire, write_frame
from .analysis import Exchange
from .guards import Pacer, stop_task
from .mirror import MirrorScheduler
from .mirror_api import MirrorRequest

log = logging.getLogger("shadowproxy.mirror_worker")


async def run(fd: int) -> None:
    from ..app import build_mirror_app

    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))
    settings: Settings = await read_frame(reader)
    app = build_mirror_app(settings)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    scheduler = app[MIRROR]
    assert isinstance(scheduler, MirrorScheduler)
    tune_gc()
    write_frame(writer, ("ready",))
    loop = asyncio.get_running_loop()
    pending: dict[int, asyncio.Future[Exchange | None]] = {}
    received = [0]
    pacing = loop.create_task(_pace(writer, scheduler, received))
    snapshots: set[asyncio.Task[None]] = set()
    try:
        while True:
            try:
                msg = await read_frame(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            kind = msg[0]
            if kind == "req":
                received[0] += 1
                _offer(scheduler, msg, pending, loop.create_future)
            elif kind == "ref":
                _, seq, x = msg
                future_ref = pending.pop(seq, None)
                if future_ref is not None and not future_ref.done():
                    future_ref.set_result(exchange_from_wire(x))
            elif kind == "skip":
                app[TELEMETRY].skipped(msg[1])
            elif kind == "progress":
                snap = await scheduler.progress(include_tally=True)
                snap["received"] = received[0]
                write_frame(writer, ("snap", msg[1], snap))
            elif kind == "snap":
                # In a task of its own: it waits on the compare workers, and copies and
                # reference answers must not wait behind it.
                task = loop.create_task(_snapshot(app, scheduler, writer, msg[1], received[0]))
                snapshots.add(task)
                task.add_done_callback(snapshots.discard)
            elif kind == "close":
                break
    finally:
        await stop_task(pacing)
        await asyncio.gather(*snapshots, return_exceptions=True)
        for future in pending.values():
            if not future.done():
                future.set_result(None)
        await runner.cleanup()  # drains the scheduler and compare workers, then the rest
        # The fate of every copy this process took: a process retired by a reload reports it
        # here, so the live process's coverage still counts each copy once.
        with contextlib.suppress(ConnectionError):
            write_frame(writer, ("final", 0, await scheduler.progress(include_tally=True)))
            await writer.drain()
        writer.close()


async def _snapshot(
    app: web.Application,
    scheduler: MirrorScheduler,
    writer: asyncio.StreamWriter,
    qid: int,
    received: int,
) -> None:
    snap = await scheduler.snapshot(include_tally=True)
    texts = [app[TELEMETRY].prometheus_text().decode(), snap["prometheus"]]
    snap["prometheus"] = merge_prometheus_text(texts)
    snap["received"] = received
    snap["worker"] = f"pid {os.getpid()}"
    write_frame(writer, ("snap", qid, snap))


def _offer(
    scheduler: MirrorScheduler,
    msg: tuple[Any, ...],
    pending: dict[int, asyncio.Future[Exchange | None]],
    new_future: Callable[[], asyncio.Future[Exchange | None]],
) -> None:
    _, seq, route, query, headers, body, received_at, span, served_by, tag = msg
    future = new_future()
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


async def _pace(
    writer: asyncio.StreamWriter, scheduler: MirrorScheduler, received: list[int]
) -> None:
    """Tell the live side, each window, how many copies a second this process can take.

    Only while the queue's own bounds drop copies (it is full, or its copies grow stale): then
    copies beyond what the shadow side managed would certainly be dropped here, and refusing
    them in the live process costs neither process anything.
    """
    pacer = Pacer()
    last: float | None = None
    while True:
        await asyncio.sleep(pacer.window_s)
        rate = pacer.rate(scheduler.taken, scheduler.shed, received[0])
        if rate is not None or last is not None:
            write_frame(writer, ("pace", rate, None))
        last = rate


def main() -> None:
    child_main(run)


if __name__ == "__main__":
    main()
