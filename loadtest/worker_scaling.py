"""Worker scaling: copies compared per second by 1, 2 and 3 Redis-stream workers at a fixed
live rate, with the CPU each process used; and the live proxy's CPU per request when it only
appends copies to the stream (``proxy.compare: redis``) against comparing them itself (``local``:
its mirror process and compare worker, which are not counted as the live proxy's).

``python -m loadtest.worker_scaling [--rate 200] [--seconds 8]`` (part of ``make bench``).
Setup: one embedded Redis, a fake V2 reference and candidate (``loadtest.fake_backend``; the
candidate answers after ``--candidate-delay-ms``), one live proxy, all on this host. On a 2-core
host the curve flattens early: every process shares the same two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
import yaml

from proxy.buffer.embedded import EmbeddedRedis
from proxy.buffer.keys import KeySchema, outcome_stat

from .openloop import open_loop, scenario
from .procs import Processes, cpu_seconds, descendants, free_port, start_backend, wait_http_ok

TOKEN = "bench-token-0123456789abcdef"


def _config(ref: str, cand: str, redis_url: str, compare: str) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "admin": {"host": "127.0.0.1", "port": free_port(), "token": TOKEN},
        "reference": {"name": "ref", "url": ref},
        "candidates": [{"name": "c", "url": cand, "max_in_flight": 64}],
        "buffer": {"redis_url": redis_url},
        "proxy": {"compare": compare, "shed_lag_ms": 0, "mirror_cpu_budget": 0},
        "log_level": "WARNING",
    }


async def _start(
    procs: Processes,
    s: aiohttp.ClientSession,
    tmp: Path,
    name: str,
    config: dict[str, Any],
    cmd: str,
) -> Any:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = procs.start(name, [sys.executable, "-m", "proxy", cmd, "--config", str(path)])
    admin = config["admin"]
    await wait_http_ok(
        s, [f"http://127.0.0.1:{admin['port']}/healthz"], proc, procs.log_dir / f"{name}.log"
    )
    return proc


async def _compared(r: aioredis.Redis) -> int:
    raw = await r.hget(KeySchema().stats, outcome_stat("c", "compared"))
    return int(raw or 0)


async def one_run(
    procs: Processes,
    s: aiohttp.ClientSession,
    tmp: Path,
    urls: tuple[str, str, str],
    compare: str,
    workers: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    ref, cand, redis_url = urls
    r = aioredis.Redis.from_url(redis_url)
    await r.flushall()
    config = _config(ref, cand, redis_url, compare)
    proxy = await _start(procs, s, tmp, f"proxy-{compare}-{workers}", config, "serve")
    started = [
        await _start(
            procs, s, tmp, f"worker{i}-{workers}", _config(ref, cand, redis_url, compare), "worker"
        )
        for i in range(workers)
    ]
    pids = {"proxy": proxy.pid, **{f"worker{i}": p.pid for i, p in enumerate(started)}}
    shadow = [p for p in descendants(proxy.pid)]
    before = {k: cpu_seconds(p) or 0.0 for k, p in pids.items()}
    shadow_before = sum(cpu_seconds(p) or 0.0 for p in shadow)
    n0 = await _compared(r)
    url = f"http://127.0.0.1:{config['listen']['port']}/v2/models/m/infer"
    run = await open_loop(url, scenario("small"), args.rate, args.seconds, warmup_s=0.0)
    n1 = await _compared(r)
    cpu = {k: (cpu_seconds(p) or 0.0) - before[k] for k, p in pids.items()}
    shadow_cpu = sum(cpu_seconds(p) or 0.0 for p in shadow) - shadow_before
    for p in [*started, proxy]:
        procs.stop(p)
    await r.aclose()
    return {
        "compare": compare,
        "workers": workers,
        "sent": run.sent,
        "compared_per_s": (n1 - n0) / args.seconds,
        "live_cpu_ms_per_request": 1000 * cpu["proxy"] / max(1, run.sent),
        "shadow_children_cpu_s": shadow_cpu,
        "cpu_s": cpu,
    }


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="shadowproxy-workers-"))
    procs = Processes(tmp)
    redis = EmbeddedRedis(tmp / "redis")
    redis.start()
    try:
        async with aiohttp.ClientSession() as s:
            _, ref = await start_backend(procs, s, "ref")
            _, cand = await start_backend(procs, s, "cand", delay_ms=args.candidate_delay_ms)
            urls = (ref, cand, redis.url)
            rows = [await one_run(procs, s, tmp, urls, "local", 0, args)]
            for n in (1, 2, 3):
                rows.append(await one_run(procs, s, tmp, urls, "redis", n, args))
    finally:
        procs.stop_all()
        redis.stop()
    print(f"\nworker scaling at {args.rate:g} req/s for {args.seconds:g} s (small V2 infer)")
    print(
        f"{'mode':8} {'workers':>7} {'compared/s':>11} {'live ms CPU/req':>16}  CPU s per process"
    )
    for row in rows:
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in row["cpu_s"].items())
        if row["compare"] == "local":
            cpu += f", mirror+compare children {row['shadow_children_cpu_s']:.2f}"
        print(
            f"{row['compare']:8} {row['workers']:>7} {row['compared_per_s']:>11.1f} "
            f"{row['live_cpu_ms_per_request']:>16.3f}  {cpu}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--candidate-delay-ms", type=float, default=5.0)
    asyncio.run(main(parser.parse_args()))
