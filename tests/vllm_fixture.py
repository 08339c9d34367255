"""The session's real vLLM servers: one tiny Llama, served as reference, candidate and twin.

- reference: float32, what the live path answers with;
- candidate: bfloat16 of the same weights, a real precision-changed candidate;
- twin: float32 again, for the noise floor (same weights, same dtype, another process).

The model directory is written once per machine by deploy/lib/shadowdemo/tiny_llama.py (in a
subprocess of this venv) and cached under .state/tiny-llama by its content key. All three
servers serve it under one name, MODEL_NAME, so a request body copied from the reference is
valid for the candidate and the twin unchanged.

Start-up: the three start side by side and share the 2 cores: all ready in ~55 s on a quiet
machine, 90-110 s beside other test runs (mostly imports: each server is an API server, an
engine core and a worker, ~2.3 GB together), so READY_TIMEOUT_S leaves room well beyond that.
Tests that use the fixture mark themselves with `VLLM_TIMEOUT` (pytest-timeout counts fixture
setup, and conftest widens the bound only for Triton's fixture).

Under CI (CI=true) a missing vLLM venv fails the test; elsewhere it skips with how to build it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from proxy.vllmserver import VllmNotInstalled, VllmServer, find_vllm

REPO = Path(__file__).resolve().parents[1]
MODEL_CACHE = REPO / ".state" / "tiny-llama"
MODEL_NAME = "tiny-llama"
READY_TIMEOUT_S = 420.0
# Writing the model the first time on a machine: ~20 s of training on one core, more when busy.
MODEL_TIMEOUT_S = 180.0
# On top of pytest's usual 300 s: the test that starts the servers pays for their start-up.
VLLM_TIMEOUT = pytest.mark.timeout(READY_TIMEOUT_S + MODEL_TIMEOUT_S + 300)


@dataclass
class VllmServers:
    """What the fixture yields. `reference.base_url` etc. is where an OpenAI client points."""

    model_dir: Path
    model_name: str
    reference: VllmServer
    candidate: VllmServer
    twin: VllmServer
    # Seconds: writing (or finding) the model, each server's start to ready, all of them.
    timings: dict[str, float] = field(default_factory=dict)


def tiny_llama_dir(cache: Path = MODEL_CACHE) -> Path:
    """The cached model directory, written first if missing (a subprocess: torch's thread
    setting and the training's memory stay out of the test process)."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "deploy" / "lib"))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "shadowdemo.tiny_llama", str(cache)],
            env=env,
            capture_output=True,
            text=True,
            timeout=MODEL_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"writing the tiny Llama took over {MODEL_TIMEOUT_S:.0f}s")
    if done.returncode != 0:
        pytest.fail(f"writing the tiny Llama failed:\n{done.stderr[-3000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def _require_vllm() -> None:
    from tests.conftest import IN_CI  # here, not at the top: conftest imports this module

    try:
        find_vllm()
    except VllmNotInstalled as exc:
        if IN_CI:
            pytest.fail(f"vLLM is required under CI: {exc}")
        pytest.skip(str(exc))


def _ready_and_warm(server: VllmServer) -> None:
    server.wait_ready(READY_TIMEOUT_S)
    server.warm_up()  # the first call's extra seconds are paid here, not by a test


def start_servers(model_dir: Path, workdir: Path) -> VllmServers:
    """Start the three side by side and wait for all; on any failure none is left running."""
    servers = VllmServers(
        model_dir=model_dir,
        model_name=MODEL_NAME,
        reference=VllmServer(model_dir, MODEL_NAME, "float32", workdir=workdir / "reference"),
        candidate=VllmServer(model_dir, MODEL_NAME, "bfloat16", workdir=workdir / "candidate"),
        twin=VllmServer(model_dir, MODEL_NAME, "float32", workdir=workdir / "twin"),
    )
    everyone = {
        "reference": servers.reference,
        "candidate": servers.candidate,
        "twin": servers.twin,
    }
    began = time.monotonic()
    # One thread each, so each server's ready time is its own, not the slowest one's.
    pool = ThreadPoolExecutor(len(everyone))
    try:
        for server in everyone.values():
            server.start()
        waits = [pool.submit(_ready_and_warm, s) for s in everyone.values()]
        done, _ = wait(waits, return_when=FIRST_EXCEPTION)
        for finished in done:
            finished.result()  # the first failure, raised here
    except BaseException:
        # Stopping them ends the other waits at once (their process has exited).
        for server in everyone.values():
            server.stop()
        raise
    finally:
        pool.shutdown(wait=True)
    servers.timings.update({name: s.ready_after_s for name, s in everyone.items()})
    servers.timings["all"] = time.monotonic() - began
    return servers


@pytest.fixture(scope="session")
def vllm_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServers]:
    _require_vllm()
    began = time.monotonic()
    model_dir = tiny_llama_dir()
    model_s = time.monotonic() - began
    servers = start_servers(model_dir, tmp_path_factory.mktemp("vllm"))
    servers.timings["model"] = model_s
    try:
        yield servers
    finally:
        for server in (servers.reference, servers.candidate, servers.twin):
            server.stop()
