"""``shadowproxy demo --canary``: two rollouts on the real Triton demo models, and their decisions.

The reference is MiniLM fp32. First the traced model (the same weights, TorchScript) is rolled
out: it should promote through every step. Then int8 (dynamic quantization) under a tight cosine
gate: it should roll back at the first step with enough evidence. A noise-floor twin answers the
same requests, so the paired gate runs too. The schedule is accelerated for a demo (steps held for
``min_samples`` compared requests and a few seconds, evaluated twice a second) and the latency
gate is loose (3x + 1 s), because every model shares the same two CPU cores here. Shadow calls
are timed in the mirror process, at the live path's own CPU priority, so a busy host slows both
sides alike (only comparing runs at idle priority).
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..app import ProxyRunner
from ..canary.commands import render_decision, render_gates
from ..canary.state import RolloutState
from ..settings import Settings, settings_from_mapping
from ..tritonserver import TritonServer
from .corpus import sentences
from .runner import DEMO_COMPARISONS, EMBEDDER, model_repository

ROLLOUTS = (
    ("traced", "minilm_traced", "TorchScript-traced, same weights: expected to promote"),
    ("int8", "minilm_int8", "int8 dynamic quantization, tight cosine gate: expected to roll back"),
)
CANARY_MODELS = (EMBEDDER, "minilm_fp32_twin", "minilm_traced", "minilm_int8")


def canary_settings(
    triton_url: str,
    candidate: str,
    served_as: str,
    buffer: dict[str, Any],
    token: str,
    *,
    min_samples: int = 60,
    min_duration_s: float = 2.0,
) -> Settings:
    """An accelerated rollout of ``candidate`` (serving the embedder as ``served_as``)."""
    return settings_from_mapping(
        {
            "listen": {"host": "127.0.0.1", "port": 0},
            "admin": {"host": "127.0.0.1", "port": 0, "token": token},
            "reference": {"name": "fp32", "url": triton_url, "timeout_s": 60},
            "candidates": [
                {
                    "name": candidate,
                    "url": triton_url,
                    "timeout_s": 60,
                    "model_map": {EMBEDDER: served_as},
                    "models": [EMBEDDER],
                },
                {
                    "name": "noise-floor",
                    "url": triton_url,
                    "timeout_s": 60,
                    "model_map": {EMBEDDER: "minilm_fp32_twin"},
                    "models": [EMBEDDER],
                    "noise_floor": True,
                },
            ],
            "buffer": buffer,
            "comparisons": DEMO_COMPARISONS,
            "canary": {
                "candidate": candidate,
                "id": f"demo-{candidate}-{secrets.token_hex(3)}",
                "steps": [1, 5, 25, 50, 100],
                "min_samples": min_samples,
                "min_duration_s": min_duration_s,
                "interval_s": 0.5,
                "sticky_header": "X-User",
                "response_header": "X-Served-By",
                "gates": {
                    "max_flagged_rate": 0.05,
                    "max_error_rate_increase": 0.05,
                    # Loose on purpose: every model and the proxy share two CPU cores here.
                    "max_latency_p99_ratio": 3.0,
                    "latency_slack_ms": 1000,
                },
            },
            # Every copy compared (the demo wants evidence fast); serve keeps the guards on.
            "proxy": {"shed_lag_ms": 0, "mirror_cpu_budget": 0},
        },
        "<canary demo defaults>",
    )


async def _embed(port: int, start: int, n: int, corpus: list[str], concurrency: int = 4) -> int:
    """``n`` embedding requests from distinct users; returns how many failed."""
    import tritonclient.http.aio as httpclient

    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}", conn_timeout=120.0)
    gate = asyncio.Semaphore(concurrency)
    rng = random.Random(start)
    failed = 0

    async def one(i: int) -> None:
        nonlocal failed
        batch = rng.sample(corpus, rng.randint(1, 4))
        text = httpclient.InferInput("text", [len(batch)], "BYTES")
        text.set_data_from_numpy(np.array([s.encode() for s in batch], dtype=np.object_))
        async with gate:
            try:
                await client.infer(EMBEDDER, [text], headers={"X-User": f"user-{i}"})
            except Exception:
                failed += 1

    try:
        await asyncio.gather(*(one(i) for i in range(start, start + n)))
    finally:
        await client.close()
    return failed


async def warm_up(triton_url: str, rounds: int = 4) -> None:
    """A few direct requests to each model first, as a deployment's readiness check would: a
    traced model's first calls are slow (TorchScript profiles and optimizes them), and the
    latency gate would otherwise judge start-up rather than serving."""
    import tritonclient.http.aio as httpclient

    client = httpclient.InferenceServerClient(url=triton_url.split("//", 1)[1])
    try:
        for model in CANARY_MODELS:
            for k in range(rounds):
                text = httpclient.InferInput("text", [k + 1], "BYTES")
                text.set_data_from_numpy(np.array([b"warm up"] * (k + 1), dtype=np.object_))
                await client.infer(model, [text])
    finally:
        await client.close()


async def run_rollout(
    settings: Settings, *, max_requests: int = 3000, batch: int = 24
) -> tuple[RolloutState | None, list[dict[str, Any]], int]:
    """Serve traffic through a proxy running this rollout until it ends (or the requests run
    out). Returns the final state, the decision log and how many client requests failed."""
    corpus = sentences(600, seed=11)
    runner = ProxyRunner(settings)
    await runner.start()
    failed = sent = 0
    try:
        state = await runner.canary.store.read()
        while sent < max_requests and (state is None or state.active):
            failed += await _embed(runner.data_port, sent, batch, corpus)
            sent += batch
            state = await runner.canary.store.read()
        await runner.drained(60)
        return await runner.canary.store.read(), await runner.canary.store.decisions(1000), failed
    finally:
        await runner.stop()


def print_decisions(decisions: list[dict[str, Any]]) -> None:
    for d in decisions:
        print("  " + render_decision(d))
        if d["gates"] and d["outcome"] != "waiting":  # a wait's reason already says what for
            print("\n".join(render_gates(d["gates"], indent="      ")))


async def run_canary_demo(state_dir: Path) -> int:
    started = time.monotonic()
    await asyncio.to_thread(state_dir.mkdir, parents=True, exist_ok=True)
    print("[canary] starting Triton on the CPU with MiniLM fp32, its twin, traced and int8 ...")
    triton = TritonServer(model_repository(), workdir=state_dir / "triton", models=CANARY_MODELS)
    ok = True
    try:
        await asyncio.to_thread(triton.start)
        await asyncio.to_thread(triton.wait_ready, 300.0)
        print(f"[canary] Triton ready ({time.monotonic() - started:.0f}s); warming the models up")
        await warm_up(triton.url)
        token = secrets.token_urlsafe(16)
        buffer = {"state_dir": str(state_dir / "redis")}
        for candidate, served_as, what in ROLLOUTS:
            settings = canary_settings(triton.url, candidate, served_as, buffer, token)
            assert settings.canary is not None
            steps = ", ".join(f"{w:g}%" for w in settings.canary.steps)
            print(f"\n[canary] rollout of {candidate} ({what}); steps {steps}")
            t0 = time.monotonic()
            state, decisions, failed = await run_rollout(settings)
            print_decisions(decisions)
            outcome = state.status if state else "not started"
            print(
                f"[canary] {candidate}: {outcome} after {time.monotonic() - t0:.0f}s "
                f"({failed} client requests failed)"
            )
            expected = "promoted" if candidate == "traced" else "rolled_back"
            ok = ok and outcome == expected and failed == 0
    finally:
        await asyncio.to_thread(triton.stop)
    verdict = "as expected" if ok else "NOT as expected"
    print(f"[canary] done in {time.monotonic() - started:.0f}s: {verdict}")
    return 0 if ok else 1
