"""The session's real vLLM servers: one tiny Llama, served as reference, candidate and twin.

- reference: float32, what the live path answers with;
- candidate: bfloat16 of the same weights, a real precision-changed candidate;
- twin: float32 again, for the noise floor (same weights, same dtype, another process).

The model and the three servers are ``proxy.demo.vllm_trio``'s, as ``shadowproxy demo --llm``
starts them: all three serve the model under one name, MODEL_NAME.

Start-up: the three start side by side and share the 2 cores: all ready in ~55 s on a quiet
machine, 90-110 s beside other test runs (mostly imports: each server is an API server, an
engine core and a worker, ~2.3 GB together), so READY_TIMEOUT_S leaves room well beyond that.
Tests that use the fixture mark themselves with `VLLM_TIMEOUT` (pytest-timeout counts fixture
setup, and conftest widens the bound only for Triton's fixture).

Under CI (CI=true) a missing vLLM venv fails the test; elsewhere it skips with how to build it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from proxy.demo.vllm_trio import (
    MODEL_NAME,
    MODEL_TIMEOUT_S,
    READY_TIMEOUT_S,
    VllmServers,
    start_servers,
    tiny_llama_dir,
)
from proxy.vllmserver import VllmNotInstalled, VllmStartError, find_vllm

__all__ = ["MODEL_NAME", "VllmServers", "vllm_servers"]
# On top of pytest's usual 300 s: the test that starts the servers pays for their start-up.
VLLM_TIMEOUT = pytest.mark.timeout(READY_TIMEOUT_S + MODEL_TIMEOUT_S + 300)


def _require_vllm() -> None:
    from tests.conftest import IN_CI  # here, not at the top: conftest imports this module

    try:
        find_vllm()
    except VllmNotInstalled as exc:
        if IN_CI:
            pytest.fail(f"vLLM is required under CI: {exc}")
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def vllm_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServers]:
    _require_vllm()
    began = time.monotonic()
    try:
        model_dir = tiny_llama_dir()
    except VllmStartError as exc:
        pytest.fail(str(exc))
    model_s = time.monotonic() - began
    servers = start_servers(model_dir, tmp_path_factory.mktemp("vllm"))
    servers.timings["model"] = model_s
    try:
        yield servers
    finally:
        servers.stop()
