"""``shadowproxy demo``: real Triton, embedded Redis, the proxy, realistic traffic, a report.

Everything runs on embedded defaults: the demo model repository (``deploy/models``) on the CPU
Triton server that the nvidia-pytriton wheel ships, an embedded Redis under the state directory,
and the proxy on free loopback ports. Traffic is sent through the proxy with tritonclient, half
JSON and half binary tensors, and the report is read back from Redis like any reviewer would.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..app import ProxyRunner
from ..keys import COVERAGE
from ..settings import Settings, settings_from_mapping
from ..tritonserver import TritonServer
from .corpus import sentences
from .report import print_report

EMBEDDER = "minilm_fp32"
# Where `make review` serves the demo's samples once the demo itself has exited.
REVIEW_DATA_PORT, REVIEW_ADMIN_PORT = 8000, 8001
CLASSIFIER = "topic_teacher"

# One candidate per optimization the project exists for, all served by the same Triton.
DEMO_CANDIDATES: list[dict[str, Any]] = [
    {"name": "int8", "model_map": {EMBEDDER: "minilm_int8"}, "models": [EMBEDDER]},
    # bf16 is emulated on CPUs without bf16 instructions (~5x slower): sample half the traffic
    # and bound it tightly, so it cannot starve the others; what does not fit is dropped, counted.
    {
        "name": "bf16",
        "model_map": {EMBEDDER: "minilm_bf16"},
        "models": [EMBEDDER],
        "sample_rate": 0.5,
        "max_in_flight": 4,
    },
    {"name": "traced", "model_map": {EMBEDDER: "minilm_traced"}, "models": [EMBEDDER]},
    {
        "name": "noise-floor",
        "model_map": {EMBEDDER: "minilm_fp32_twin"},
        "models": [EMBEDDER],
        "noise_floor": True,
    },
    {"name": "distilled", "model_map": {CLASSIFIER: "topic_student"}, "models": [CLASSIFIER]},
]

DEMO_COMPARISONS: dict[str, Any] = {
    "*": {"*": {"metric": "auto"}},
    # Sentence embeddings are compared by direction: 1e-5 of angle separates bf16 and int8
    # (1 - cos ~ 5e-5 and 1e-2) from re-ordered fp32 arithmetic (~1e-13).
    EMBEDDER: {"embedding": {"metric": "cosine", "min_cosine": 0.99999}},
    # A dense regression output: a business tolerance rather than fp32 round-off.
    CLASSIFIER: {"topic_scores": {"metric": "tolerance", "atol": 0.02, "rtol": 0.05}},
}


def model_repository() -> Path:
    """``deploy/models`` of this checkout, or ``$SHADOWPROXY_MODEL_REPOSITORY``."""
    env = os.environ.get("SHADOWPROXY_MODEL_REPOSITORY")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "deploy" / "models"
    if not (path / EMBEDDER).is_dir():
        from ..errors import ConfigError

        raise ConfigError(
            f"demo model repository not found at {path}: run the demo from a checkout "
            "(make demo) or set SHADOWPROXY_MODEL_REPOSITORY"
        )
    return path


def demo_settings(triton_url: str, state_dir: Path, token: str) -> Settings:
    return settings_from_mapping(
        {
            "listen": {"host": "127.0.0.1", "port": 0},
            "admin": {"host": "127.0.0.1", "port": 0, "token": token},
            "reference": {"name": "fp32", "url": triton_url, "timeout_s": 60},
            "candidates": [
                {"url": triton_url, "timeout_s": 60, "max_in_flight": 32, **c}
                for c in DEMO_CANDIDATES
            ],
            "buffer": {"state_dir": str(state_dir / "redis")},
            "comparisons": DEMO_COMPARISONS,
        },
        "<demo defaults>",
    )


def write_demo_config(state_dir: Path, triton_url: str, token: str) -> Path:
    """A config for the demo's data, used by ``make review`` and the review CLI after the demo
    has exited (owner-only: it holds the token). Serving it needs no Triton: the review plane
    reads Redis only."""
    path = (state_dir / "shadowproxy.yaml").resolve()
    text = yaml.safe_dump(
        {
            "listen": {"host": "127.0.0.1", "port": REVIEW_DATA_PORT},
            "admin": {"host": "127.0.0.1", "port": REVIEW_ADMIN_PORT, "token": token},
            "reference": {"name": "fp32", "url": triton_url},
            "buffer": {"state_dir": str((state_dir / "redis").resolve())},
            "comparisons": DEMO_COMPARISONS,
        }
    )
    path.touch(mode=0o600)
    path.write_text(text)
    return path


async def send_traffic(port: int, n: int, seed: int = 7, concurrency: int = 4) -> dict[str, int]:
    """``n`` requests through the proxy: 2/3 embeddings, 1/3 topics; JSON and binary alternate."""
    import tritonclient.http.aio as httpclient

    rng = random.Random(seed)
    corpus = sentences(max(400, n * 2), seed=seed)
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}", conn_timeout=120.0)
    gate = asyncio.Semaphore(concurrency)
    counts = {"ok": 0, "failed": 0, "json": 0, "binary": 0}

    async def one(i: int) -> None:
        model = EMBEDDER if i % 3 else CLASSIFIER
        batch = rng.sample(corpus, rng.randint(1, 6))
        binary = i % 2 == 0
        text = httpclient.InferInput("text", [len(batch)], "BYTES")
        text.set_data_from_numpy(
            np.array([s.encode() for s in batch], dtype=np.object_), binary_data=binary
        )
        names = (
            ["embedding"]
            if model == EMBEDDER
            else ["logits", "probabilities", "topic_scores", "label_id", "label"]
        )
        outputs = [httpclient.InferRequestedOutput(o, binary_data=binary) for o in names]
        async with gate:
            try:
                await client.infer(
                    model,
                    [text],
                    outputs=outputs,
                    request_id=f"demo-{i}",
                    headers={"X-Request-Id": f"demo-{i:04d}"},
                )
                counts["ok"] += 1
            except Exception as exc:
                counts["failed"] += 1
                print(f"  request {i} failed: {exc}")
        counts["binary" if binary else "json"] += 1

    try:
        await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        await client.close()
    return counts


async def run_demo(n_requests: int, state_dir: Path, keep_running: bool) -> int:
    started = time.monotonic()
    await asyncio.to_thread(state_dir.mkdir, parents=True, exist_ok=True)
    repo = model_repository()
    print(f"[demo] starting Triton on the CPU with the demo models from {repo} ...")
    # The models the demo's candidates use (the repository also holds the suite's light pair).
    models = (EMBEDDER, CLASSIFIER, *(m for c in DEMO_CANDIDATES for m in c["model_map"].values()))
    triton = TritonServer(repo, workdir=state_dir / "triton", models=tuple(dict.fromkeys(models)))
    try:
        await asyncio.to_thread(triton.start)
        await asyncio.to_thread(triton.wait_ready, 300.0)
        print(f"[demo] Triton ready at {triton.url} ({time.monotonic() - started:.0f}s)")
        token = secrets.token_urlsafe(16)
        settings = demo_settings(triton.url, state_dir, token)
        runner = ProxyRunner(settings)
        await runner.start()
        try:
            print(
                f"[demo] proxy on 127.0.0.1:{runner.data_port}, admin on "
                f"127.0.0.1:{runner.admin_port}; sending {n_requests} requests ..."
            )
            t0 = time.monotonic()
            run_started = time.time()
            counts = await send_traffic(runner.data_port, n_requests)
            print(
                f"[demo] {counts['ok']} answered ({counts['json']} JSON, {counts['binary']} "
                f"binary), {counts['failed']} failed, in {time.monotonic() - t0:.1f}s; "
                "waiting for the shadows ..."
            )
            await runner.drained(180.0)
            # This run's verdicts only: the state dir keeps earlier runs' for review.
            verdicts = [
                v for v in await runner.store.recent_verdicts(1_000_000) if v["ts"] >= run_started
            ]
            # Outcome counts from both processes: the live one and the mirror worker.
            tally = Counter(runner.telemetry.tally)
            for candidate, what, n in (await runner.mirror.snapshot())["tally"]:
                tally[(candidate, what)] += n
            print_report(settings, verdicts, tally, await runner.data[COVERAGE].report())
            config = write_demo_config(state_dir, triton.url, token)
            admin = f"http://127.0.0.1:{runner.admin_port}"
            if keep_running:
                print(f"\nReview the flagged samples: open {admin}/review, token {token}")
            else:
                print(
                    "\nReview the flagged samples: run `make review` (that is, shadowproxy "
                    f"serve --config {config}), open http://127.0.0.1:{REVIEW_ADMIN_PORT}/review "
                    f"and log in with the token {token}"
                )
            print(f"From the command line (the config is {config}):")
            print(f"  shadowproxy review list --flagged --config {config}")
            print(f"  shadowproxy review export --out golden.jsonl --config {config}")
            if keep_running:
                print(
                    f"  shadowproxy replay golden.jsonl --url {triton.url} "
                    "--model-map minilm_fp32=minilm_int8"
                )
            print(f"[demo] done in {time.monotonic() - started:.0f}s")
            if keep_running:
                print("[demo] running until Ctrl-C ...")
                await asyncio.Event().wait()
            return 0 if counts["failed"] == 0 else 1
        finally:
            await runner.stop()
    finally:
        await asyncio.to_thread(triton.stop)
