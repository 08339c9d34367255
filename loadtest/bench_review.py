"""How fast the review API lists 10,000 flagged samples (the review page's first screen).

Fills an embedded Redis with N flagged samples through the real store, starts the admin plane,
and times the list queries the page makes: first page by severity (cold: summaries read from
Redis; warm: from the cache), a filtered page, and a deep page. Prints milliseconds per query.

    python -m loadtest.bench_review [--samples 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from proxy.app import ProxyRunner
from proxy.buffer.embedded import EmbeddedRedis
from proxy.settings import settings_from_mapping

TOKEN = "bench-token"


def _meta(i: int, rng: random.Random) -> dict[str, object]:
    cand = rng.choice(["int8", "bf16", "distilled"])
    sev = rng.lognormvariate(-6, 2)
    return {
        "id": f"{i:032x}",
        "ts": time.time() - rng.random() * 86400,
        "request_id": f"req-{i}",
        "candidate": cand,
        "noise_floor": False,
        "model": "minilm_fp32",
        "outcome": "compared",
        "flagged": True,
        "severity": sev,
        "reason": f"embedding: min_cosine {1 - sev:.6f}",
        "stored": True,
        "reference": {
            "upstream": "fp32",
            "status": 200,
            "model": "minilm_fp32",
            "version": "1",
            "latency_ms": 12.0,
        },
        "candidate_side": {
            "upstream": cand,
            "status": 200,
            "model": f"minilm_{cand}",
            "version": "1",
            "latency_ms": 10.0,
        },
        "outputs": [
            {
                "output": "embedding",
                "metric": "cosine",
                "validity": "ok",
                "scores": {"min_cosine": 1 - sev, "mean_cosine": 1 - sev / 2},
                "headline": "min_cosine",
                "severity": sev,
                "flagged": True,
                "reason": "below 0.99999",
            }
        ],
        "previews": {"embedding": {"reference": {"shape": [4, 384], "head": [0.1] * 16}}},
    }


async def main(samples: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        redis = EmbeddedRedis(Path(tmp) / "redis")
        redis.start()
        try:
            settings = settings_from_mapping(
                {
                    "listen": {"port": 0},
                    "admin": {"port": 0, "token": TOKEN},
                    "reference": {"name": "ref", "url": "http://127.0.0.1:9"},
                    "buffer": {"redis_url": redis.url},
                }
            )
            runner = ProxyRunner(settings)
            await runner.start()
            rng = random.Random(0)
            payloads = {"request": b"{}", "reference_body": b"{}", "candidate_body": b"{}"}
            t0 = time.perf_counter()
            for start in range(0, samples, 500):
                await asyncio.gather(
                    *(
                        runner.store.record(_meta(i, rng), payloads)
                        for i in range(start, min(samples, start + 500))
                    )
                )
            fill = time.perf_counter() - t0
            base = f"http://127.0.0.1:{runner.admin_port}/api/samples?flagged=1"
            queries = {
                "first page by severity (cold)": "&sort=severity&limit=200",
                "first page by severity (warm)": "&sort=severity&limit=200",
                "filtered: candidate+severity range": "&candidate=int8&min_severity=0.01&limit=200",
                "deep page (offset 9000)": "&sort=time&limit=200&offset=9000",
                "unlabelled only": "&label=none&limit=200",
            }
            print(f"{samples} flagged samples written in {fill:.1f}s")
            print(f"{'query':<38} {'ms (median of 5)':>16} {'rows':>5} {'total':>6}")
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as s:
                for name, q in queries.items():
                    times = []
                    for _ in range(1 if "cold" in name else 5):
                        t = time.perf_counter()
                        async with s.get(base + q) as r:
                            rows = await r.json()
                            total = r.headers["X-Total-Count"]
                        times.append((time.perf_counter() - t) * 1000)
                    print(f"{name:<38} {statistics.median(times):>16.1f} {len(rows):>5} {total:>6}")
            await runner.stop()
        finally:
            redis.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    asyncio.run(main(parser.parse_args().samples))
