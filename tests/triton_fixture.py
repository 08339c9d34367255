"""The session's real Triton server: deploy/models, every demo model, CPU Python backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.tritonserver import TritonServer

MODEL_REPOSITORY = Path(__file__).resolve().parents[1] / "deploy" / "models"
DEMO_MODELS = (
    "minilm_fp32",
    "minilm_fp32_twin",
    "minilm_int8",
    "minilm_bf16",
    "minilm_traced",
    "topic_teacher",
    "topic_student",
    # numpy only, ready in a second or two: for coverage tests and benchmarks.
    "light_ref",
    "light_cand",
    # Decoupled LMs for Triton's generate extension: a tiny transformer trained once per cache
    # key (the first stub trains for a few seconds, the others load its weights).
    "lm_fp32",
    "lm_int8",
    "lm_bf16",
    "lm_fp32_twin",
)
# Eleven torch stubs (MiniLM and the tiny LMs) load on a shared 2-core machine: ~2 minutes when the
# machine is busy, so leave room well beyond that.
READY_TIMEOUT_S = 420.0


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    server = TritonServer(
        MODEL_REPOSITORY, workdir=tmp_path_factory.mktemp("triton"), models=DEMO_MODELS
    )
    server.start()
    try:
        server.wait_ready(READY_TIMEOUT_S)
        yield server
    finally:
        server.stop()
