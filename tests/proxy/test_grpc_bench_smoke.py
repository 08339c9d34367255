"""The gRPC bench's pieces work together: the open-loop generator against the fixed-answer
backend gets an OK answer to every call and records every one in its histogram, in-process
and as the process the bench runs; NGINX's ``grpc_pass`` with ``mirror`` in front of the static
NGINX gRPC backend answers every call and copies each one to the candidate."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tritonclient.grpc import service_pb2

from loadtest.grpc_backend import infer_count, start_grpc_backend, wait_grpc_ready
from loadtest.grpc_load import infer_request, open_loop, run_open, run_saturate
from loadtest.grpc_nginx import nginx_requests, start_grpc_nginx, start_static_grpc
from loadtest.nginx import nginx_binary
from loadtest.procs import Processes, free_port
from tests.conftest import wait_until

RATE, SECONDS = 50.0, 1.0


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    (tmp_path / "logs").mkdir()
    procs = Processes(tmp_path / "logs")
    try:
        yield procs
    finally:
        procs.stop_all()


async def test_open_loop_against_the_fixed_backend_gets_every_answer(procs: Processes) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    proc = start_grpc_backend(procs, "grpc-backend", port, processes=2)
    await wait_grpc_ready(target, proc)

    run = await open_loop(target, infer_request(), RATE, SECONDS, warmup_s=0.2)
    assert not run.errors, run.errors
    assert run.sent == round(RATE * 0.2) + round(RATE * SECONDS)
    assert run.ok == round(RATE * SECONDS)  # the measured calls, each in the histogram
    assert run.latency.get_total_count() == 50
    assert 0 < (run.ms(50) or 0) < 1000

    # The same through the generator's own process, as the bench runs it.
    child, cpu_s = await run_open(target, RATE, SECONDS, 0.0)
    assert not child.errors and child.ok == 50 and cpu_s > 0
    assert await infer_count(target) == run.sent + child.sent

    sat = await run_saturate(target, 0.5, concurrency=4)
    assert sat.requests_per_s > 0 and sat.errors == 0


def test_the_fixed_answer_is_a_model_infer_response() -> None:
    from loadtest.grpc_backend import FIXED, MODEL_INFER

    answer = service_pb2.ModelInferResponse.FromString(FIXED[MODEL_INFER])
    assert answer.model_name == "loadtest" and list(answer.outputs[0].shape) == [1, 8]
    assert len(answer.raw_output_contents[0]) == 32
    request = service_pb2.ModelInferRequest.FromString(infer_request("light_ref", "x"))
    assert request.model_name == "light_ref" and request.inputs[0].name == "x"


@pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed")
async def test_nginx_grpc_pass_mirrors_every_call_as_model_infer(
    procs: Processes, tmp_path: Path
) -> None:
    """Static NGINX reference; the candidate is the Python backend, which counts ModelInfer
    calls only: a copy sent to the wrong ``:path`` (``/mirror``) would not count."""
    import aiohttp

    ref, status, cand, front = (free_port() for _ in range(4))
    work = tmp_path / "work"
    start_static_grpc(procs, "ref", work / "ref", ref, status)
    cand_proc = start_grpc_backend(procs, "cand", cand)
    proxy = start_grpc_nginx(
        procs, "front", work / "front", front, f"127.0.0.1:{ref}", f"127.0.0.1:{cand}"
    )
    await wait_grpc_ready(f"127.0.0.1:{cand}", cand_proc)
    await wait_grpc_ready(f"127.0.0.1:{front}", proxy)
    async with aiohttp.ClientSession() as control:
        before = await nginx_requests(control, f"http://127.0.0.1:{status}/status")
        run = await open_loop(f"127.0.0.1:{front}", infer_request(), RATE, SECONDS, 0.0)
        after = await nginx_requests(control, f"http://127.0.0.1:{status}/status")
    assert not run.errors and run.ok == 50, run.errors
    assert before is not None and after is not None
    # The static reference answered each (the second status read counts itself) ...
    assert after - before - 1 == 50
    # ... and each was copied to the candidate as a ModelInfer (a mirror subrequest may end
    # just after its live call).
    await wait_until(lambda: _count_is(f"127.0.0.1:{cand}", 50), what="every copy at the candidate")


async def _count_is(target: str, n: int) -> bool:
    return await infer_count(target) == n
