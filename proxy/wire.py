"""Frames between the proxy's own processes: length-prefixed pickles with out-of-band bodies.

The live process, the mirror process and the compare workers talk over private socketpairs made
by their parent (trusted peers). Bodies travel out of band (pickle protocol 5): the pickle refers
to them, and their bytes follow it unpickled and uncopied; pickling a 1 MiB body in band cost
about 1 ms of the live loop. Slotted dataclasses travel as plain tuples: pickling one cost 11 us,
the tuple 2 us.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from multidict import CIMultiDict

from .protocols.v2_rest.routes import Route, RouteKind
from .redact import strip_headers
from .shadow.analysis import Exchange


def frame(message: Any) -> list[bytes | memoryview]:
    """Chunks of one frame: sizes (pickle, buffer count, each buffer), the pickle, the buffers.

    ``PickleBuffer`` objects in ``message`` (see ``out_of_band``) are not copied into the pickle:
    their memory is written after it as is.
    """
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    sizes = [len(data), len(raws), *(r.nbytes for r in raws)]
    return [b"".join(n.to_bytes(4, "big") for n in sizes), data, *raws]


def frame_size(chunks: list[bytes | memoryview]) -> int:
    return sum(len(c) if isinstance(c, bytes) else c.nbytes for c in chunks)


def out_of_band(body: bytes) -> pickle.PickleBuffer:
    return pickle.PickleBuffer(body)


def write_frame(writer: asyncio.StreamWriter, message: Any) -> None:
    writer.writelines(frame(message))


async def read_frame(reader: asyncio.StreamReader) -> Any:
    head = await reader.readexactly(8)
    size, count = int.from_bytes(head[:4], "big"), int.from_bytes(head[4:], "big")
    # The buffer lengths and the pickle in one read: a frame is read in 2 + buffers calls.
    rest = await reader.readexactly(4 * count + size)
    data = memoryview(rest)[4 * count :]
    buffers = [
        await reader.readexactly(int.from_bytes(rest[i : i + 4], "big"))
        for i in range(0, 4 * count, 4)
    ]
    return pickle.loads(data, buffers=buffers)


def route_to_wire(route: Route) -> tuple[str, str | None, str | None, str]:
    return route.kind.value, route.model, route.version, route.suffix


_KINDS = {kind.value: kind for kind in RouteKind}


def route_from_wire(wire: tuple[str, str | None, str | None, str]) -> Route:
    return Route(_KINDS[wire[0]], wire[1], wire[2], wire[3])


def exchange_to_wire(x: Exchange | None) -> tuple[Any, ...] | None:
    """An answer for another process: no comparison needs its cookies or credentials."""
    if x is None:
        return None
    return (
        x.upstream,
        x.status,
        strip_headers(x.headers.items()),
        out_of_band(x.body),
        x.latency_s,
        x.timeline,
        x.complete,
    )


def exchange_from_wire(x: tuple[Any, ...] | None) -> Exchange | None:
    if x is None:
        return None
    return Exchange(x[0], x[1], CIMultiDict(x[2]), x[3], x[4], x[5], x[6])


async def spawn_child(
    module: str,
) -> tuple[asyncio.subprocess.Process, asyncio.StreamReader, asyncio.StreamWriter]:
    """Start ``python -m module FD`` with one end of a private socketpair as FD; the other end."""
    parent, child = socket.socketpair()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        str(child.fileno()),
        pass_fds=(child.fileno(),),
        stdin=asyncio.subprocess.DEVNULL,
    )
    child.close()
    reader, writer = await asyncio.open_connection(sock=parent)
    return proc, reader, writer


def child_main(run: Callable[[int], Coroutine[Any, Any, None]]) -> None:
    """The entry point of a child process started by ``spawn_child``."""
    from .serve import install_event_loop_policy

    # Ctrl-C reaches the whole process group: the parent decides when this one stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    install_event_loop_policy()
    asyncio.run(run(int(sys.argv[1])))
