"""Three real vLLMs of the tiny Llama: the reference (fp32), a candidate (bf16 of the same
weights: a real precision change) and a twin (fp32 again, the noise floor).

Used by ``shadowproxy demo --llm`` and by the suite's session fixture (``tests/vllm_fixture.py``).
The model directory is written once per machine by ``deploy/lib/shadowdemo/tiny_llama.py`` (in
a subprocess of this venv: torch's thread setting and the training's memory stay out of the
caller) and cached by its content key. All three serve it under one name, so a request body
copied from the reference is valid for the others unchanged.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from ..vllmserver import VllmServer, VllmStartError

REPO = Path(__file__).resolve().parents[2]
MODEL_CACHE = REPO / ".state" / "tiny-llama"
MODEL_NAME = "tiny-llama"
READY_TIMEOUT_S = 420.0
# Writing the model the first time on a machine: ~20 s of training on one core, more when busy.
MODEL_TIMEOUT_S = 180.0


@dataclass
class VllmServers:
    """`reference.base_url` etc. is where an OpenAI client points."""

    model_dir: Path
    model_name: str
    reference: VllmServer
    candidate: VllmServer
    twin: VllmServer
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds: writing (or finding) the model, each server's start to ready, all of them."""

    def all(self) -> tuple[VllmServer, VllmServer, VllmServer]:
        return self.reference, self.candidate, self.twin

    def stop(self) -> None:
        for server in self.all():
            server.stop()


def tiny_llama_dir(cache: Path = MODEL_CACHE) -> Path:
    """The cached model directory, written first if missing; raises ``VllmStartError``."""
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
    except subprocess.TimeoutExpired as exc:
        raise VllmStartError(f"writing the tiny Llama took over {MODEL_TIMEOUT_S:.0f}s") from exc
    if done.returncode != 0:
        raise VllmStartError(f"writing the tiny Llama failed:\n{done.stderr[-3000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def _ready_and_warm(server: VllmServer) -> None:
    server.wait_ready(READY_TIMEOUT_S)
    server.warm_up()  # the first call's extra seconds are paid here, not by a copy or a test


def start_servers(model_dir: Path, workdir: Path) -> VllmServers:
    """Start the three side by side and wait for all; on any failure none is left running."""
    servers = VllmServers(
        model_dir=model_dir,
        model_name=MODEL_NAME,
        reference=VllmServer(model_dir, MODEL_NAME, "float32", workdir=workdir / "reference"),
        candidate=VllmServer(model_dir, MODEL_NAME, "bfloat16", workdir=workdir / "candidate"),
        twin=VllmServer(model_dir, MODEL_NAME, "float32", workdir=workdir / "twin"),
    )
    names = ("reference", "candidate", "twin")
    began = time.monotonic()
    # One thread each, so each server's ready time is its own, not the slowest one's.
    pool = ThreadPoolExecutor(3)
    try:
        for server in servers.all():
            server.start()
        waits = [pool.submit(_ready_and_warm, s) for s in servers.all()]
        done, _ = wait(waits, return_when=FIRST_EXCEPTION)
        for finished in done:
            finished.result()  # the first failure, raised here
    except BaseException:
        servers.stop()  # ends the other waits at once (their process has exited)
        raise
    finally:
        pool.shutdown(wait=True)
    servers.timings.update({n: s.ready_after_s for n, s in zip(names, servers.all(), strict=True)})
    servers.timings["all"] = time.monotonic() - began
    return servers
