"""A minimal gRPC V2 backend: ``ModelInfer`` answered with one fixed, pre-serialized answer.

``python -m loadtest.grpc_backend --port P [--processes N]``: a ``grpc.aio`` server speaking
Triton's ``inference.GRPCInferenceService`` as raw bytes (no protobuf work per call):

- ``ModelInfer``: the same ``ModelInferResponse`` bytes whatever the request said (one 1x8 FP32
  output ``OUTPUT0`` in ``raw_output_contents``, the values of ``fake_backend.OUTPUT_VALUES``);
- ``ServerLive``, ``ServerReady``, ``ModelReady``: live/ready true, so health checks pass;
- ``/loadtest.Stats/Get``: the number of ``ModelInfer`` calls answered, summed over processes
  (ASCII digits), so the benchmark can see what a candidate actually received;
- anything else: ``UNIMPLEMENTED``.

With ``--processes N`` (N > 1) it runs N server processes on the same port (``SO_REUSEPORT``: the
kernel spreads connections over them) so that one Python process is not what limits a
saturation run; each client connection still lands on one process. It exits when its parent dies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import multiprocessing.sharedctypes
import os
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import grpc
import grpc.aio
from tritonclient.grpc import service_pb2

from .fake_backend import OUTPUT_VALUES
from .procs import Processes

SERVICE = "/inference.GRPCInferenceService/"
MODEL_INFER = SERVICE + "ModelInfer"
STATS = "/loadtest.Stats/Get"
MAX_BYTES = 64 * 1024 * 1024


def infer_response(model: str = "loadtest") -> bytes:
    """The fixed ``ModelInferResponse``: what a small V2 model answers to the small request."""
    response = service_pb2.ModelInferResponse(model_name=model, model_version="1")
    output = response.outputs.add(name="OUTPUT0", datatype="FP32")
    output.shape.extend([1, len(OUTPUT_VALUES)])
    response.raw_output_contents.append(struct.pack(f"<{len(OUTPUT_VALUES)}f", *OUTPUT_VALUES))
    return bytes(response.SerializeToString())


FIXED = {
    MODEL_INFER: infer_response(),
    SERVICE + "ServerLive": service_pb2.ServerLiveResponse(live=True).SerializeToString(),
    SERVICE + "ServerReady": service_pb2.ServerReadyResponse(ready=True).SerializeToString(),
    SERVICE + "ModelReady": service_pb2.ModelReadyResponse(ready=True).SerializeToString(),
}


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, counts: Any, slot: int) -> None:
        self._counts, self._slot = counts, slot

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        method = handler_call_details.method
        if method == MODEL_INFER:
            return grpc.unary_unary_rpc_method_handler(self._infer)
        if method == STATS:
            return grpc.unary_unary_rpc_method_handler(self._stats)
        answer = FIXED.get(method)
        if answer is None:
            return None  # grpc answers UNIMPLEMENTED
        return grpc.unary_unary_rpc_method_handler(partial(_fixed, answer))

    async def _infer(self, request: bytes, context: Any) -> bytes:
        self._counts[self._slot] += 1  # each process has its own slot: no lock needed
        return FIXED[MODEL_INFER]

    async def _stats(self, request: bytes, context: Any) -> bytes:
        return str(sum(self._counts)).encode()


async def _fixed(answer: bytes, request: bytes, context: Any) -> bytes:
    return answer


async def serve(host: str, port: int, counts: Any, slot: int, reuse_port: bool) -> None:
    options = [
        ("grpc.max_send_message_length", MAX_BYTES),
        ("grpc.max_receive_message_length", MAX_BYTES),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((_Handler(counts, slot),))
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"grpc_backend: cannot bind {host}:{port}")
    await server.start()
    parent = os.getppid()
    while True:  # exit with the parent (the benchmark, or the first process)
        await asyncio.sleep(1.0)
        if os.getppid() != parent:
            break
    await server.stop(0)


def _run(host: str, port: int, counts: Any, slot: int, reuse_port: bool) -> None:
    # asyncio's own loop: grpc.aio's support for uvloop is experimental.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(host, port, counts, slot, reuse_port))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.grpc_backend", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--processes", type=int, default=1, help="server processes (REUSEPORT)")
    args = parser.parse_args(argv)
    n = max(1, args.processes)
    # Spawned, not forked: grpc's core must not be inherited across fork.
    ctx = multiprocessing.get_context("spawn")
    counts = ctx.Array("q", n, lock=False)
    workers = [
        ctx.Process(target=_run, args=(args.host, args.port, counts, i, True), daemon=True)
        for i in range(1, n)
    ]
    for worker in workers:
        worker.start()
    _run(args.host, args.port, counts, 0, n > 1)
    for worker in workers:
        worker.terminate()
        worker.join(5)


def start_grpc_backend(
    procs: Processes, name: str, port: int, processes: int = 1
) -> subprocess.Popen[bytes]:
    """Start the backend on 127.0.0.1:``port`` as a child of ``procs`` (not waited for)."""
    args = [sys.executable, "-m", "loadtest.grpc_backend", "--port", str(port)]
    return procs.start(name, [*args, "--processes", str(processes)])


async def wait_grpc_ready(
    target: str, proc: subprocess.Popen[bytes] | None = None, timeout_s: float = 30.0
) -> None:
    """Poll ``ServerReady`` on ``target`` (host:port) until it says ready; fail early if
    ``proc`` exits. Raises ``procs.SetupError``."""
    from .procs import SetupError

    request = service_pb2.ServerReadyRequest().SerializeToString()
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(target) as channel:
        ready = channel.unary_unary(SERVICE + "ServerReady")
        while True:
            if proc is not None and proc.poll() is not None:
                raise SetupError(f"{target}: the server exited with {proc.returncode}")
            with contextlib.suppress(grpc.aio.AioRpcError):
                raw = await ready(request, timeout=1.0)
                if service_pb2.ServerReadyResponse.FromString(raw).ready:
                    return
            if time.monotonic() > deadline:
                raise SetupError(f"{target}: gRPC ServerReady not true in {timeout_s:.0f}s")
            await asyncio.sleep(0.1)


async def infer_count(target: str) -> int | None:
    """``ModelInfer`` calls the backend on ``target`` answered, or None if it cannot say."""
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            return int(await channel.unary_unary(STATS)(b"", timeout=2.0))
        except (grpc.aio.AioRpcError, ValueError):
            return None


if __name__ == "__main__":
    main()
