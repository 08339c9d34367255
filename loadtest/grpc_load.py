"""gRPC load: open-loop ``ModelInfer`` at a constant rate into HDR histograms, and saturation.

``python -m loadtest.grpc_load open --target HOST:PORT --rate R --duration S [--warmup S]``
``python -m loadtest.grpc_load saturate --target HOST:PORT --concurrency N --duration S``

Each prints one JSON object on stdout (histograms HDR-encoded). ghz is not available here, so
this is a small ``grpc.aio`` client with the same rules as the REST generator (``openloop.py``):

- open loop: request ``i`` is due at ``t0 + i / rate`` whatever happened before, and its latency
  is measured from that due time (or from its actual send, if the loop's timer fired early),
  so a stall shows up as latency, not as fewer requests (no coordinated omission). The warmup
  is discarded; latencies of OK answers go into the same ``HdrHistogram`` (microseconds, 3
  significant digits) as the REST points, into an ``openloop.Run``; any other status is an
  error, counted by its code name;
- saturation: closed loop, ``--concurrency`` callers each sending its next request as soon as
  the last one is answered, for ``--duration`` seconds (the ``wrk -c32`` of gRPC): OK req/s.

The request is serialized once (``tritonclient.grpc``'s ``service_pb2``) and sent as raw bytes
over one channel (one HTTP/2 connection, as tritonclient uses), answers are not parsed. The
benchmark runs it in its own process (``run_open`` / ``run_saturate``): grpc's core brings its
own threads, and its CPU is then the generator's alone (reported as ``client_cpu_s``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import resource
import struct
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from hdrh.histogram import HdrHistogram
from tritonclient.grpc import service_pb2

from .openloop import Run, Saturation, paced

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
SMALL_VALUES = (0.5, -1.0, 2.0, 0.25, 1.5, -0.75, 3.0, 0.0)
"""The REST ``small`` scenario's 1x8 FP32 input (``mirror_overhead.REQUEST_BODY``)."""
MAX_BYTES = 64 * 1024 * 1024


def infer_request(model: str = "loadtest", input_name: str = "INPUT0") -> bytes:
    """A small ``ModelInferRequest``: one 1x8 FP32 input in ``raw_input_contents``, as
    tritonclient sends it (``light_ref``/``light_cand`` take ``x`` of shape [-1, 8])."""
    request = service_pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name=input_name, datatype="FP32")
    tensor.shape.extend([1, len(SMALL_VALUES)])
    request.raw_input_contents.append(struct.pack(f"<{len(SMALL_VALUES)}f", *SMALL_VALUES))
    return bytes(request.SerializeToString())


def _channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        target,
        options=[
            ("grpc.max_send_message_length", MAX_BYTES),
            ("grpc.max_receive_message_length", MAX_BYTES),
        ],
    )


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def open_loop(
    target: str,
    request: bytes,
    rate: float,
    duration_s: float,
    warmup_s: float = 2.0,
    timeout_s: float = 10.0,
) -> Run:
    """Send ``rate`` ModelInfer calls/s for warmup + duration s; measure the last ``duration``."""
    run = Run(rate, duration_s)
    n_warm = round(rate * warmup_s)
    n_total = n_warm + round(rate * duration_s)
    async with _channel(target) as channel:
        infer = channel.unary_unary(MODEL_INFER)
        await asyncio.wait_for(channel.channel_ready(), timeout_s)

        async def one(i: int, due: float) -> None:
            sent = time.perf_counter()
            try:
                await infer(request, timeout=timeout_s)
            except grpc.aio.AioRpcError as exc:
                if i >= n_warm:
                    run.errors[exc.code().name] += 1
                return
            if i >= n_warm:
                run.record(due, sent)

        await paced(run, n_total, one, timeout_s)
    return run


@dataclass
class Closed:
    """A closed-loop run: OK answers and errors over ``duration_s``."""

    ok: int
    errors: Counter[str]
    duration_s: float
    concurrency: int

    @property
    def requests_per_s(self) -> float:
        return self.ok / self.duration_s if self.duration_s else 0.0


async def saturate(
    target: str, request: bytes, concurrency: int, duration_s: float, timeout_s: float = 10.0
) -> Closed:
    """``concurrency`` callers back to back for ``duration_s``: what the target sustains."""
    errors: Counter[str] = Counter()
    ok = 0
    async with _channel(target) as channel:
        infer = channel.unary_unary(MODEL_INFER)
        await asyncio.wait_for(channel.channel_ready(), timeout_s)
        end = time.perf_counter() + duration_s

        async def caller() -> None:
            nonlocal ok
            while time.perf_counter() < end:
                try:
                    await infer(request, timeout=timeout_s)
                    ok += 1
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] += 1

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return Closed(ok, errors, elapsed, concurrency)


# ----------------------------------------------------------------------------------------------
# As a process: the benchmark's side spawns it and reads its JSON.


def _encode(hist: HdrHistogram) -> str:
    return base64.b64encode(hist.encode()).decode()


def _decode(text: str) -> HdrHistogram:
    return HdrHistogram.decode(base64.b64decode(text))


def run_to_json(run: Run, cpu_s: float) -> dict[str, Any]:
    return {
        "rate": run.rate,
        "duration_s": run.duration_s,
        "sent": run.sent,
        "errors": dict(run.errors),
        "latency": _encode(run.latency),
        "send_lag": _encode(run.send_lag),
        "client_cpu_s": cpu_s,
    }


def run_from_json(data: dict[str, Any]) -> Run:
    run = Run(float(data["rate"]), float(data["duration_s"]))
    run.sent = int(data["sent"])
    run.errors.update(data["errors"])
    if data["latency"]:
        run.latency.add(_decode(data["latency"]))
        run.send_lag.add(_decode(data["send_lag"]))
    return run


@dataclass
class GrpcSaturation(Saturation):
    client_cores: float = 0.0
    """CPU the generator itself used over the run (1.0 = one core): near 1, it is the limit."""


class LoadError(RuntimeError):
    """The generator process failed (its stderr's tail is in the message)."""


async def _child(args: Sequence[str], timeout_s: float) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loadtest.grpc_load",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise LoadError(f"grpc_load {' '.join(args)} exited {proc.returncode}: {err[-800:]!r}")
    result: dict[str, Any] = json.loads(out)
    return result


async def run_open(
    target: str, rate: float, duration_s: float, warmup_s: float, request: str = "small"
) -> tuple[Run, float]:
    """``open_loop`` in its own process (``python -m loadtest.grpc_load open``): the run, and
    the CPU seconds the generator used."""
    args = ["open", "--target", target, "--rate", f"{rate:g}", "--duration", f"{duration_s:g}"]
    args += ["--warmup", f"{warmup_s:g}", "--request", request]
    data = await _child(args, warmup_s + duration_s + 60)
    return run_from_json(data), float(data["client_cpu_s"])


async def run_saturate(
    target: str, duration_s: float, concurrency: int = 32, request: str = "small"
) -> GrpcSaturation:
    """``saturate`` in its own process; req/s, errors, and the generator's own CPU."""
    args = ["saturate", "--target", target, "--concurrency", str(concurrency)]
    args += ["--duration", f"{duration_s:g}", "--request", request]
    data = await _child(args, duration_s + 60)
    cores = data["client_cpu_s"] / data["duration_s"] if data["duration_s"] else 0.0
    return GrpcSaturation(
        float(data["requests_per_s"]),
        sum(data["errors"].values()),
        f"grpc.aio c{concurrency}",
        cores,
    )


REQUESTS = {
    "small": lambda: infer_request(),
    "light": lambda: infer_request("light_ref", "x"),
}
"""What ``--request`` names: the fast backends' model, or the light Triton pair's reference."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.grpc_load", description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode in ("open", "saturate"):
        p = sub.add_parser(mode)
        p.add_argument("--target", required=True, help="host:port")
        p.add_argument("--duration", type=float, default=10.0)
        p.add_argument("--request", choices=sorted(REQUESTS), default="small")
        if mode == "open":
            p.add_argument("--rate", type=float, required=True)
            p.add_argument("--warmup", type=float, default=2.0)
        else:
            p.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    request = REQUESTS[args.request]()
    cpu0 = _cpu_s()
    # uvloop where installed, as the bench's own loop: asyncio's timers woke the open loop
    # ~0.8 ms late at the median here, uvloop's ~0.5 ms (grpc.aio runs on either).
    loop_factory = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        if args.mode == "open":
            run = runner.run(open_loop(args.target, request, args.rate, args.duration, args.warmup))
        else:
            closed = runner.run(saturate(args.target, request, args.concurrency, args.duration))
    if args.mode == "open":
        print(json.dumps(run_to_json(run, _cpu_s() - cpu0)))
    else:
        out = {
            "requests_per_s": closed.requests_per_s,
            "ok": closed.ok,
            "errors": dict(closed.errors),
            "duration_s": closed.duration_s,
            "concurrency": closed.concurrency,
            "client_cpu_s": _cpu_s() - cpu0,
        }
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
