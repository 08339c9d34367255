"""``make bench``: shadowproxy against NGINX's mirror, side by side, in one run.

``python -m loadtest.bench [--quick] [--tree LABEL=DIR ...] [--out loadtest/out]``

Targets, each in front of the same fake V2 reference (``loadtest/fake_backend.py``):

- ``direct``: the load generator straight to the reference (the floor);
- ``nginx``: NGINX as a plain reverse proxy;
- ``nginx-mirror``: NGINX with ``mirror`` to a candidate that answers at once;
- ``shadowproxy``: ``python -m proxy serve``, every request mirrored to that candidate and compared
  (its defaults: mirroring in a worker process with a CPU budget, embedded Redis);
- with ``--tree LABEL=DIR``, also ``shadowproxy@LABEL``: the proxy from another checkout (a
  worktree with patches applied), measured in the same run for a before/after.

For each: closed-loop saturation (``wrk``), then open-loop points: small JSON at 300 and 1000
requests/s, 1 MiB tensors, and a mix. Then the faults at ``--fault-rate``: NGINX's mirror and
shadowproxy with a candidate that answers after 200 ms and with one that refuses connections,
against shadowproxy without mirroring. Last, the proxy's memory over ``--memory-duration`` seconds
with the slow candidate at ``--memory-rate`` requests/s. The table goes to stdout; ``bench.md``
(with a latency CDF, ``bench_cdf.png``) and ``bench.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from .bench_report import write_report
from .mirror_overhead import MODEL, environment, proxy_config, scrape
from .nginx import nginx_binary, start_nginx
from .openloop import Run, Saturation, open_loop, scenario, wrk_saturation
from .procs import (
    ROOT,
    Processes,
    SetupError,
    Snapshot,
    descendants,
    free_port,
    memory_mb,
    snapshot,
    start_backend,
    wait_http_ok,
)

SLOW_DELAY_MS = 200.0
PATH = f"/v2/models/{MODEL}/infer"


@dataclass
class Point:
    """One measurement of one target: an open-loop run, a saturation run, or the memory run."""

    target: str
    name: str
    run: Run | None = None
    saturation: Saturation | None = None
    other_cpu: float | None = None
    """CPU % (100 = one core) that processes outside this benchmark used meanwhile."""
    memory: list[tuple[float, float]] = field(default_factory=list)
    """(seconds since start, proxy RSS MiB incl. its mirror worker), sampled each second."""


@dataclass
class Results:
    points: list[Point] = field(default_factory=list)
    mirror: dict[str, dict[str, int]] = field(default_factory=dict)
    """Mirror outcomes from each shadowproxy's /metrics, by target."""
    notes: list[str] = field(default_factory=list)

    def get(self, target: str, name: str) -> Point | None:
        return next((p for p in self.points if p.target == target and p.name == name), None)


def point_names(args: argparse.Namespace) -> list[tuple[str, str, float]]:
    """(point name, scenario, rate) of the open-loop points every target gets."""
    return [
        ("small@300", "small", 300.0),
        ("small@1000", "small", 1000.0),
        (f"tensor@{args.tensor_rate:g}", "tensor", args.tensor_rate),
        ("mix@300", "mix", 300.0),
    ]


class Bench:
    def __init__(self, args: argparse.Namespace, procs: Processes, control: Any, work: Path):
        self.args, self.procs, self.control, self.work = args, procs, control, work
        self.results = Results()
        self.servers: dict[str, str] = {}
        self.pids: dict[str, int] = {}
        self.say: Callable[[str], None] = lambda s: print(s, flush=True)
        self._started = 0

    async def start_backends(self) -> None:
        for name, delay in (("reference", 0.0), ("fast", 0.0), ("slow", SLOW_DELAY_MS)):
            proc, url = await start_backend(self.procs, self.control, name, delay)
            self.servers[name], self.pids[name] = url, proc.pid
        self.servers["dead"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    def _our_pids(self, server: int | None) -> dict[str, int | str]:
        pids: dict[str, int | str] = {"loadgen": os.getpid(), **self.pids}
        if server is not None:
            pids["server"] = server
            for pid in descendants(server):
                pids[f"child{pid}"] = pid
        return pids

    async def measure(
        self, target: str, name: str, kind: str, rate: float, url: str, server: int | None
    ) -> Point:
        pids = self._our_pids(server)
        before = snapshot(pids)
        run = await open_loop(
            url + PATH, scenario(kind), rate, self.args.duration, self.args.warmup
        )
        after = snapshot(pids)
        point = Point(target, name, run=run, other_cpu=_other_cpu(before, after))
        self.results.points.append(point)
        p = run.figures()
        self.say(
            f"  {target:<22} {name:<12} p50 {p['p50'] or 0:8.2f}  p99 {p['p99'] or 0:8.2f}  "
            f"p99.9 {p['p99.9'] or 0:8.2f} ms  errors {sum(run.errors.values())}"
        )
        return point

    def saturate(self, target: str, url: str) -> None:
        sat = wrk_saturation(url + PATH, scenario("small")[0], self.args.sat_duration)
        if sat is None:
            return
        self.results.points.append(Point(target, "saturation", saturation=sat))
        self.say(f"  {target:<22} saturation   {sat.requests_per_s:8.0f} req/s ({sat.tool})")

    @contextlib.asynccontextmanager
    async def server(self, target: str, candidate: str | None) -> Any:
        """Start the target (None for ``direct``); yield (its URL, its pid, its admin or None)."""
        if target == "direct":
            yield self.servers["reference"], self.pids["reference"], None
            return
        self._started += 1
        work = self.work / f"{target}-{candidate or 'none'}-{self._started}"
        port = free_port()
        if target.startswith("nginx"):
            proc = start_nginx(
                self.procs,
                work.name,
                work,
                port,
                self.servers["reference"],
                self.servers[candidate] if candidate else None,
            )
            url = f"http://127.0.0.1:{port}"
            await wait_http_ok(self.control, [f"{url}/v2/health/ready"], proc, work / "error.log")
            try:
                yield url, proc.pid, None
            finally:
                self.procs.stop(proc)
            return
        tree = self.args.trees.get(target, ROOT)
        token, admin_port = secrets.token_urlsafe(16), free_port()
        cand = None
        if candidate:
            cand = {"name": candidate, "url": self.servers[candidate], "sample_rate": 1.0}
            cand["timeout_s"] = 5.0
        cfg = proxy_config(port, admin_port, token, self.servers["reference"], work / "state", cand)
        cfg["log_level"] = "WARNING"
        work.mkdir(parents=True)
        (work / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        env = {**os.environ, "PYTHONPATH": str(tree)}
        args = [sys.executable, "-m", "proxy", "serve", "--config", str(work / "config.yaml")]
        proc = self.procs.start(work.name, args, cwd=tree, env=env)
        url, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
        try:
            await wait_http_ok(
                self.control,
                [f"{admin}/healthz", f"{url}/v2/health/ready"],
                proc,
                self.procs.log_dir / f"{work.name}.log",
            )
            self.procs.adopt_children(proc)
            yield url, proc.pid, (admin, token)
        finally:
            self.procs.stop(proc)

    async def target(self, target: str) -> None:
        candidate = "fast" if target != "direct" and target != "nginx" else None
        self.say(f"[{time.strftime('%H:%M:%S')}] {target}")
        async with self.server(target, candidate) as (url, pid, admin):
            self.saturate(target, url)
            for name, kind, rate in point_names(self.args):
                await self.measure(target, name, kind, rate, url, pid)
            if admin is not None:
                await asyncio.sleep(1.0)  # let the last copies settle
                self.results.mirror[target] = (await scrape(self.control, *admin))["mirror"]

    async def fault(self, target: str, candidate: str | None) -> None:
        """One target at ``--fault-rate`` with the slow, the dead, or (None) no candidate."""
        rate = self.args.fault_rate
        self.say(f"[{time.strftime('%H:%M:%S')}] faults: {target} {candidate or 'no mirror'}")
        async with self.server(target, candidate) as (url, pid, admin):
            name = f"{candidate or 'no'}-candidate@{rate:g}"
            await self.measure(target, name, "small", rate, url, pid)
            if admin is not None and candidate:
                await asyncio.sleep(1.0)
                outcomes = (await scrape(self.control, *admin))["mirror"]
                self.results.mirror[f"{target} ({candidate} candidate)"] = outcomes

    async def attempt(self, what: str, step: Awaitable[None]) -> None:
        """Run one step; a target that does not start is reported, and the run goes on."""
        try:
            await step
        except SetupError as exc:
            self.results.notes.append(f"{what}: not measured, it did not start: {exc}")
            self.say(f"  {what}: did not start: {exc}")

    async def memory(self, target: str) -> None:
        secs, rate = self.args.memory_duration, self.args.memory_rate
        self.say(f"[{time.strftime('%H:%M:%S')}] memory: {target}, slow candidate, {secs:g} s")
        async with self.server(target, "slow") as (url, pid, admin):
            point = Point(target, f"memory@{rate:g} {secs:g}s")
            load = asyncio.create_task(
                open_loop(url + PATH, scenario("small"), rate, secs, warmup_s=0.0)
            )
            t0 = time.monotonic()
            while not load.done():
                rss = [memory_mb(p) for p in (pid, *descendants(pid))]
                total = sum(r[0] for r in rss if r is not None)
                point.memory.append((time.monotonic() - t0, total - _redis_rss(pid)))
                await asyncio.sleep(1.0)
            point.run = await load
            self.results.points.append(point)
            if admin is not None:
                outcomes = (await scrape(self.control, *admin))["mirror"]
                self.results.mirror[f"{target} (memory run)"] = outcomes


def _redis_rss(pid: int) -> float:
    """The embedded Redis is the proxy's child but not the proxy's memory: leave it out."""
    total = 0.0
    for child in descendants(pid):
        with contextlib.suppress(OSError):
            if b"redis" in Path(f"/proc/{child}/cmdline").read_bytes():
                mem = memory_mb(child)
                total += mem[0] if mem else 0.0
    return total


def _other_cpu(before: Snapshot, after: Snapshot) -> float | None:
    if before.host is None or after.host is None:
        return None
    wall = after.at - before.at
    busy = (after.host[0] - before.host[0]) / max(1, after.host[1] - before.host[1])
    ours = sum(
        (after.cpu[k] or 0.0) - (v or 0.0) for k, v in before.cpu.items() if after.cpu.get(k)
    )
    return float(max(0.0, busy * (os.cpu_count() or 1) * 100.0 - ours / wall * 100.0))


async def run_all(args: argparse.Namespace, procs: Processes) -> Results:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as control:
        with tempfile.TemporaryDirectory(prefix="shadowproxy-bench-") as tmp:
            bench = Bench(args, procs, control, Path(tmp))
            await bench.start_backends()
            proxies = ["shadowproxy", *(f"shadowproxy@{k}" for k in args.tree_labels)]
            args.trees = {f"shadowproxy@{k}": Path(v) for k, v in args.tree_dirs.items()}
            nginx = ["nginx", "nginx-mirror"] if nginx_binary() else []
            if not nginx:
                bench.results.notes.append("nginx is not installed: the NGINX targets were skipped")
            if shutil.which("wrk") is None:
                bench.results.notes.append("wrk is not installed: no saturation runs")
            for target in ["direct", *nginx, *proxies]:
                await bench.attempt(target, bench.target(target))
            for target in nginx[1:] + proxies:
                # NGINX's own no-mirror figure is the `nginx` target's; each proxy needs its own.
                for cand in ([] if target.startswith("nginx") else [None]) + ["slow", "dead"]:
                    await bench.attempt(f"{target} {cand}", bench.fault(target, cand))
            for target in proxies:
                await bench.attempt(f"{target} memory", bench.memory(target))
            return bench.results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__)
    parser.add_argument("--duration", type=float, default=10.0, help="measured s per point")
    parser.add_argument("--warmup", type=float, default=2.0, help="discarded s before each")
    parser.add_argument("--sat-duration", type=float, default=5.0, help="wrk seconds")
    parser.add_argument("--memory-duration", type=float, default=60.0)
    # 500/s: copies of a 200 ms candidate outnumber max_in_flight (64) and must be dropped, while
    # the live path itself keeps up (at 1000/s it does not here, and its own backlog would grow).
    parser.add_argument("--memory-rate", type=float, default=500.0, help="requests/s")
    parser.add_argument("--tensor-rate", type=float, default=50.0, help="1 MiB requests/s")
    parser.add_argument("--fault-rate", type=float, default=300.0)
    parser.add_argument("--quick", action="store_true", help="short runs, to try the bench out")
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="also run the proxy from this checkout, as shadowproxy@LABEL (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest" / "out")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.sat_duration, args.memory_duration = 3.0, 1.0, 2.0, 10.0
    args.tree_dirs = dict(t.split("=", 1) for t in args.tree)
    args.tree_labels = list(args.tree_dirs)
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    procs = Processes(args.out / "logs")
    started = time.time()
    env = environment()  # the commit as the run starts: the tree may change while it runs
    for label, tree in args.tree_dirs.items():
        env += f"; shadowproxy@{label} from {tree} at {_revision(Path(tree))}"
    loop_factory = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            results = runner.run(run_all(args, procs))
    except SetupError as exc:
        print(f"bench: setup failed: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
    text = write_report(results, args, time.time() - started, env)
    print(text)
    (args.out / "bench.json").write_text(json.dumps(_as_json(results), indent=2))
    print(f"written: {args.out / 'bench.md'}, {args.out / 'bench_cdf.png'}, bench.json")
    return 0


def _revision(tree: Path) -> str:
    out = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or "unknown"


def _as_json(results: Results) -> dict[str, Any]:
    return {
        "points": [
            {
                "target": p.target,
                "name": p.name,
                "latency_ms": p.run.figures() if p.run else None,
                "ok": p.run.ok if p.run else None,
                "errors": dict(p.run.errors) if p.run else None,
                "saturation_rps": p.saturation.requests_per_s if p.saturation else None,
                "other_cpu_percent": p.other_cpu,
                "memory_mb": p.memory or None,
            }
            for p in results.points
        ],
        "mirror": results.mirror,
        "notes": results.notes,
    }


if __name__ == "__main__":
    raise SystemExit(main())
