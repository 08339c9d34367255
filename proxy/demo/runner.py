"""``shadowproxy demo``: real Triton, embedded Redis, the proxy, realistic traffic, a report.

Everything runs on embedded defaults: the demo model repository (``deploy/models``) on the CPU
Triton server that the nvidia-pytriton wheel ships, an embedded Redis under the state directory,
and the proxy on free loopback ports (HTTP and gRPC). Traffic is sent through the proxy with
tritonclient: every fourth request over gRPC (ModelInfer, mirrored to the candidates over their
gRPC endpoint), the rest over REST, half JSON and half binary tensors. The report is read back
from Redis like any reviewer would.

Halfway through the traffic the traced candidate's model gets its second version (``rollout``):
from then on Triton answers it with version 2, and the proxy records a new build. After the
traffic a golden set is replayed against both versions (``builds``) and the report ends with the
builds ledger and the diff of the two versions.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..app import ProxyRunner
from ..keys import COVERAGE
from ..settings import Settings, settings_from_mapping
from ..tritonserver import TritonServer
from .builds import (
    ROLLOUT_CANDIDATE,
    ROLLOUT_MODEL,
    builds_evidence,
    export_golden_set,
    label_golden_set,
    replay_versions,
    version_builds,
)
from .corpus import sentences
from .hardware import cpu
from .llm import LM_CANDIDATES, LM_COMPARISONS, LM_MODELS, send_llm_traffic
from .report import print_builds, print_report
from .rollout import load_versions

EMBEDDER = "minilm_fp32"
# Where `make review` serves the demo's samples once the demo itself has exited.
REVIEW_DATA_PORT, REVIEW_ADMIN_PORT = 8000, 8001
CLASSIFIER = "topic_teacher"


# One candidate per optimization the project exists for, all served by the same Triton.
DEMO_CANDIDATES: list[dict[str, Any]] = [
    {
        "name": "int8",
        "model_map": {EMBEDDER: "minilm_int8"},
        "models": [EMBEDDER],
        "hardware": cpu("int8 dynamic"),
    },
    # bf16 is emulated on CPUs without bf16 instructions (~5x slower): sample half the traffic
    # and bound it tightly, so it cannot starve the others; what does not fit is dropped, counted.
    {
        "name": "bf16",
        "model_map": {EMBEDDER: "minilm_bf16"},
        "models": [EMBEDDER],
        "sample_rate": 0.5,
        "max_in_flight": 4,
        "hardware": cpu("bf16 (emulated)"),
    },
    {
        "name": ROLLOUT_CANDIDATE,
        "model_map": {EMBEDDER: ROLLOUT_MODEL},
        "models": [EMBEDDER],
        "hardware": cpu("fp32 TorchScript"),
    },
    {
        "name": "noise-floor",
        "model_map": {EMBEDDER: "minilm_fp32_twin"},
        "models": [EMBEDDER],
        "noise_floor": True,
        "hardware": cpu("fp32"),
    },
    {
        "name": "distilled",
        "model_map": {CLASSIFIER: "topic_student"},
        "models": [CLASSIFIER],
        "hardware": cpu("fp32 bag of words"),
    },
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


def demo_config(
    triton_url: str, grpc_url: str, token: str, metrics_url: str | None = None
) -> dict[str, Any]:
    """The demo proxy's configuration less its buffer: free loopback ports for HTTP and gRPC,
    and the reference and every candidate on the same Triton (``grpc_url``: its ``host:port``;
    ``metrics_url``: its Prometheus page, read for GPUs, of which a CPU server names none)."""
    same = {"url": triton_url, "metrics_url": metrics_url}
    return {
        "listen": {"host": "127.0.0.1", "port": 0, "grpc_port": 0},
        "admin": {"host": "127.0.0.1", "port": 0, "token": token},
        "reference": {
            "name": "fp32",
            "grpc_url": grpc_url,
            "timeout_s": 60,
            "hardware": cpu("fp32"),
            **same,
        },
        "candidates": [
            {"grpc_url": grpc_url, "timeout_s": 60, "max_in_flight": 32, **same, **c}
            for c in DEMO_CANDIDATES
        ]
        + [{**same, **c} for c in LM_CANDIDATES],
        "comparisons": {**DEMO_COMPARISONS, **LM_COMPARISONS},
        # Generated answers are also compared by meaning: both embedded by the demo's MiniLM.
        "semantic": {"embedding_url": triton_url, "embedding_model": EMBEDDER},
    }


def demo_settings(
    triton_url: str, grpc_url: str, state_dir: Path, token: str, metrics_url: str | None = None
) -> Settings:
    return settings_from_mapping(
        {
            **demo_config(triton_url, grpc_url, token, metrics_url),
            "buffer": {"state_dir": str(state_dir / "redis")},
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
            "comparisons": {**DEMO_COMPARISONS, **LM_COMPARISONS},
        }
    )
    path.touch(mode=0o600)
    path.write_text(text)
    return path


LLM_REQUESTS = 40
"""Generations sent to the language model after the tensor traffic."""

GRPC_EVERY = 4
"""Every fourth request goes over gRPC (when the proxy listens for it); the rest over REST."""


class _Halfway:
    """Holds the second half of the requests until ``midway`` has run, which starts once the
    first half has been answered. Its error is kept for after the traffic: raised at once, it
    would leave the second half waiting."""

    def __init__(self, n: int, midway: Callable[[], Awaitable[None]] | None) -> None:
        self._midway = midway
        self.half = n // 2 if midway is not None else 0
        self._left = self.half
        self._released = asyncio.Event()
        self.error: Exception | None = None
        if not self.half:
            self._released.set()

    async def before(self, i: int) -> None:
        if i >= self.half:
            await self._released.wait()

    async def after(self, i: int) -> None:
        if i >= self.half:
            return
        self._left -= 1
        if self._left or self._midway is None:
            return
        try:
            await self._midway()
        except Exception as exc:
            self.error = exc
        finally:
            self._released.set()


async def send_traffic(
    port: int,
    n: int,
    seed: int = 7,
    concurrency: int = 4,
    *,
    grpc_port: int | None = None,
    grpc_every: int = GRPC_EVERY,
    midway: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, int]:
    """``n`` requests through the proxy: 2/3 embeddings, 1/3 topics. With ``grpc_port``, every
    ``grpc_every``-th one goes there (tritonclient.grpc) instead; over REST, JSON and binary
    alternate. The same corpus draws and request ids (``demo-{i}``, X-Request-Id ``demo-{i:04d}``)
    whichever the protocol. ``midway`` is awaited once the first half has been answered, and the
    second half is sent after it (its error is raised once every request is done). Counts:
    ok/failed, rest (json/binary) and grpc."""
    import tritonclient.grpc.aio as grpcclient
    import tritonclient.http.aio as httpclient

    rng = random.Random(seed)
    corpus = sentences(max(400, n * 2), seed=seed)
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}", conn_timeout=120.0)
    gclient = (
        grpcclient.InferenceServerClient(url=f"127.0.0.1:{grpc_port}")
        if grpc_port is not None
        else None
    )
    grpc_on = gclient is not None and grpc_every > 0
    gate = asyncio.Semaphore(concurrency)
    counts = {"ok": 0, "failed": 0, "rest": 0, "json": 0, "binary": 0, "grpc": 0}
    halfway = _Halfway(n, midway)

    def names(model: str) -> list[str]:
        if model == EMBEDDER:
            return ["embedding"]
        return ["logits", "probabilities", "topic_scores", "label_id", "label"]

    async def over_rest(i: int, model: str, data: np.ndarray[Any, Any], binary: bool) -> None:
        text = httpclient.InferInput("text", [len(data)], "BYTES")
        text.set_data_from_numpy(data, binary_data=binary)
        outputs = [httpclient.InferRequestedOutput(o, binary_data=binary) for o in names(model)]
        await client.infer(
            model,
            [text],
            outputs=outputs,
            request_id=f"demo-{i}",
            headers={"X-Request-Id": f"demo-{i:04d}"},
        )

    async def over_grpc(i: int, model: str, data: np.ndarray[Any, Any]) -> None:
        assert gclient is not None
        text = grpcclient.InferInput("text", [len(data)], "BYTES")
        text.set_data_from_numpy(data)
        outputs = [grpcclient.InferRequestedOutput(o) for o in names(model)]
        await gclient.infer(
            model,
            [text],
            outputs=outputs,
            request_id=f"demo-{i}",
            headers={"x-request-id": f"demo-{i:04d}"},
            client_timeout=120.0,
        )

    async def one(i: int) -> None:
        model = EMBEDDER if i % 3 else CLASSIFIER
        batch = rng.sample(corpus, rng.randint(1, 6))  # drawn in order, whatever the protocol
        data = np.array([s.encode() for s in batch], dtype=np.object_)
        use_grpc = grpc_on and i % grpc_every == grpc_every - 1
        # JSON and binary alternate among the REST requests: i less the gRPC ones before it.
        binary = (i - (i // grpc_every if grpc_on else 0)) % 2 == 0
        await halfway.before(i)
        async with gate:
            try:
                if use_grpc:
                    await over_grpc(i, model, data)
                else:
                    await over_rest(i, model, data, binary)
                counts["ok"] += 1
            except Exception as exc:
                counts["failed"] += 1
                print(f"  request {i} ({'gRPC' if use_grpc else 'REST'}) failed: {exc}")
        if use_grpc:
            counts["grpc"] += 1
        else:
            counts["rest"] += 1
            counts["binary" if binary else "json"] += 1
        await halfway.after(i)

    try:
        await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        await client.close()
        if gclient is not None:
            await gclient.close()
    if halfway.error is not None:
        raise halfway.error
    return counts


async def collect_results(
    runner: ProxyRunner, since: float
) -> tuple[list[dict[str, Any]], Counter[tuple[str, str]], dict[str, Any]]:
    """What the report reads once the shadows drained: the verdicts since ``since`` (the state
    dir keeps earlier runs' for review), the outcome counts of both processes (the live one and
    the mirror worker) and the coverage per candidate."""
    verdicts = [v for v in await runner.store.recent_verdicts(1_000_000) if v["ts"] >= since]
    tally: Counter[tuple[str, str]] = Counter(runner.telemetry.tally)
    for candidate, what, n in (await runner.mirror.snapshot())["tally"]:
        tally[(candidate, what)] += n
    return verdicts, tally, await runner.data[COVERAGE].report()


async def report_builds(
    runner: ProxyRunner,
    settings: Settings,
    state_dir: Path,
    triton_url: str,
    since: float,
    n_requests: int,
    compared: Counter[str],
) -> None:
    """Label and export a golden set, replay it against both versions of the rolled-out model
    (each run recorded under its build), and print the builds and their diff."""
    store = runner.store
    ids = await label_golden_set(store, EMBEDDER, since)
    golden = await export_golden_set(
        store, state_dir / "golden.jsonl", ids, {**DEMO_COMPARISONS, **LM_COMPARISONS}
    )
    builds = await version_builds(store, triton_url, since)
    runs = await replay_versions(store, golden, triton_url, EMBEDDER, builds) if golden else {}
    rows, diff = await builds_evidence(settings, store, since, builds, compared)
    rollout = (
        f"{ROLLOUT_CANDIDATE} [{EMBEDDER} -> {ROLLOUT_MODEL}]: version 2 loaded after "
        f"{n_requests // 2} of {n_requests} requests; builds by version: "
        + ", ".join(f"v{v} {b}" for v, b in sorted(builds.items()))
    )
    print_builds(rows, diff, runs, rollout)


async def run_demo(n_requests: int, state_dir: Path, keep_running: bool) -> int:
    started = time.monotonic()
    await asyncio.to_thread(state_dir.mkdir, parents=True, exist_ok=True)
    repo = model_repository()
    print(f"[demo] starting Triton on the CPU with the demo models from {repo} ...")
    # The models the demo's candidates use (the repository also holds the suite's light pair).
    models = (
        EMBEDDER,
        CLASSIFIER,
        *(m for c in DEMO_CANDIDATES for m in c["model_map"].values()),
        *LM_MODELS,
    )
    triton = TritonServer(repo, workdir=state_dir / "triton", models=tuple(dict.fromkeys(models)))
    try:
        await asyncio.to_thread(triton.start)
        await asyncio.to_thread(triton.wait_ready, 300.0)
        print(f"[demo] Triton ready at {triton.url} ({time.monotonic() - started:.0f}s)")
        token = secrets.token_urlsafe(16)
        grpc_url = f"127.0.0.1:{triton.grpc_port}"
        metrics_url = f"http://127.0.0.1:{triton.metrics_port}/metrics"
        settings = demo_settings(triton.url, grpc_url, state_dir, token, metrics_url)
        runner = ProxyRunner(settings)
        await runner.start()
        try:
            print(
                f"[demo] proxy on 127.0.0.1:{runner.data_port} (gRPC 127.0.0.1:"
                f"{runner.grpc_port}), admin on 127.0.0.1:{runner.admin_port}; "
                f"sending {n_requests} requests ..."
            )
            t0 = time.monotonic()
            run_started = time.time()

            async def rollout() -> None:
                began = time.monotonic()
                print(
                    f"[demo] {n_requests // 2} requests answered: loading {ROLLOUT_MODEL} "
                    "version 2 beside version 1 (Triton's repository API) ..."
                )
                await load_versions(triton.url, ROLLOUT_MODEL, (1, 2))
                print(
                    f"[demo] {ROLLOUT_MODEL} serves versions 1 and 2 "
                    f"({time.monotonic() - began:.0f}s); un-versioned requests now reach 2"
                )

            counts = await send_traffic(
                runner.data_port, n_requests, grpc_port=runner.grpc_port, midway=rollout
            )
            llm = await send_llm_traffic(runner.data_port, LLM_REQUESTS)
            counts["failed"] += llm["failed"]
            counts.update({f"llm_{k}": v for k, v in llm.items()})
            print(
                f"[demo] {counts['ok']} answered ({counts['json']} REST JSON, {counts['binary']} "
                f"REST binary, {counts['grpc']} gRPC) and {llm['ok']} generations "
                f"({llm['generate']} generate, {llm['generate_stream']} generate_stream), "
                f"{counts['failed']} failed, in {time.monotonic() - t0:.1f}s; "
                "waiting for the shadows ..."
            )
            await runner.drained(180.0)
            verdicts, tally, coverage = await collect_results(runner, run_started)
            print_report(settings, verdicts, tally, coverage, traffic=counts)
            compared = Counter(v["candidate"] for v in verdicts if v["outcome"] == "compared")
            await report_builds(
                runner, settings, state_dir, triton.url, run_started, n_requests, compared
            )
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
            print(f"  shadowproxy builds list --config {config}")
            if keep_running:
                print(
                    f"  shadowproxy replay golden.jsonl --url {triton.url} "
                    "--model-map minilm_fp32=minilm_int8"
                )
            print(f"[demo] done in {time.monotonic() - started:.0f}s")
            if keep_running:
                print("[demo] running until Ctrl-C (or SIGTERM) ...")
                # SIGTERM too stops it through the finally blocks (the proxy, then Triton and
                # Redis), not by the default handler that would leave them running.
                stop = asyncio.Event()
                asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
                await stop.wait()
            return 0 if counts["failed"] == 0 else 1
        finally:
            await runner.stop()
    finally:
        await asyncio.to_thread(triton.stop)
