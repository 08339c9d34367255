"""``make bench``: shadowproxy against NGINX's mirror, side by side, in one run.

``python -m loadtest.bench [--quick] [--tree LABEL=DIR ...] [--out loadtest/out]``

Targets:

- ``direct``: the load generator straight to the reference (the floor);
- ``nginx``: NGINX as a plain reverse proxy;
- ``nginx-mirror``: NGINX with ``mirror`` to a candidate that answers at once;
- ``shadowproxy``: ``python -m proxy serve``, every request mirrored to that candidate and compared
  (its defaults: mirroring in a worker process with a CPU budget, embedded Redis);
- ``shadowproxy-no-mirror``: the same with no candidate;
- with ``--tree LABEL=DIR``, also ``shadowproxy@LABEL``: the proxy from another checkout (a
  worktree with patches applied), measured in the same run for a before/after.

Sections, in order:

1. the live path (``rounds.py``): reference and candidate are static NGINX servers
   (``static_backend.py``); ``--rounds`` interleaved rounds of small JSON at 1000 req/s and
   ``wrk`` saturation; medians and spread;
2. the other open-loop points against the Python fake reference (``fake_backend.py``): small
   JSON at 300 req/s, 1 MiB tensors, a mix;
3. the faults at ``--fault-rate``: a candidate that answers after 200 ms, one that refuses;
4. coverage (``coverage.py``): the light Triton pair with planted divergences, and small JSON at
   1000 req/s against static NGINX, each for ``--coverage-duration`` seconds;
5. CPU per compared copy (``shadow_cpu.py``) at ``--cpu-rate`` against static NGINX;
6. gRPC (``grpc_bench.py``): ``ModelInfer`` direct, through shadowproxy with and without a
   candidate and through NGINX ``grpc_pass`` with and without ``mirror``, interleaved rounds at
   500 and 1000 calls/s and saturation, against a static NGINX gRPC backend, then against
   Triton;
7. LLM streams (``llm_ttfb.py``): time to the first SSE event of streamed chat completions,
   direct and through shadowproxy with and without mirroring, against a deterministic
   streaming server (``llm_backend.py``);
8. the proxy's memory over ``--memory-duration`` seconds with the slow candidate.

Every open-loop point through a shadowproxy also reports its coverage (copies compared /
requests sent). The tables go to stdout; ``bench.md`` (with a latency CDF, ``bench_cdf.png``) and
``bench.json`` to ``--out``.
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
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import yaml

from .bench_report import to_json, write_report
from .coverage import (
    LIGHT_CAND,
    LIGHT_REF,
    Copies,
    Coverage,
    CoverageRun,
    copies,
    coverage,
    light_triton,
    run_coverage,
    settle,
    start_light_triton,
)
from .grpc_bench import run_grpc
from .llm_ttfb import run_llm
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
    is_redis,
    memory_mb,
    snapshot,
    start_backend,
    wait_http_ok,
)
from .rounds import NO_MIRROR, run_rounds
from .shadow_cpu import CpuRun, run_cpu
from .static_backend import start_static_backend

if TYPE_CHECKING:
    from proxy.tritonserver import TritonServer

SLOW_DELAY_MS = 200.0
PATH = f"/v2/models/{MODEL}/infer"
POINT_SETTLE_S = 15.0
"""Longest wait after a point for its copies' outcomes: the next point must not run beside them."""
Admin = tuple[str, str]
"""(admin URL, token) of a running shadowproxy."""


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
    backend: str = ""
    """What served as the reference (and candidate) for this point."""
    round: int | None = None
    """The live-path round (1..--rounds); None outside that section."""
    copies: Coverage | None = None
    """What happened to the copies of this point's requests (shadowproxy with a candidate)."""
    received: int | None = None
    """Calls the candidate itself received meanwhile (gRPC section, targets that mirror)."""


@dataclass
class Results:
    points: list[Point] = field(default_factory=list)
    mirror: dict[str, dict[str, int]] = field(default_factory=dict)
    """Mirror outcomes from each shadowproxy's /metrics, by target."""
    coverage: list[CoverageRun] = field(default_factory=list)
    cpu: list[CpuRun] = field(default_factory=list)
    grpc: list[Point] = field(default_factory=list)
    """The gRPC section's points (``grpc_bench.py``), apart from the REST ones."""
    notes: list[str] = field(default_factory=list)

    def get(self, target: str, name: str, round: int | None = None) -> Point | None:
        return next(
            (p for p in self.points if p.target == target and p.name == name and p.round == round),
            None,
        )


def point_names(args: argparse.Namespace) -> list[tuple[str, str, float]]:
    """(point name, scenario, rate) of the open-loop points each target gets against the fake
    reference (small JSON at 1000 req/s is the live-path section's, against static NGINX)."""
    return [
        ("small@300", "small", 300.0),
        (f"tensor@{args.tensor_rate:g}", "tensor", args.tensor_rate),
        ("mix@300", "mix", 300.0),
    ]


class Bench:
    def __init__(self, args: argparse.Namespace, procs: Processes, control: Any, work: Path):
        self.args, self.procs, self.control, self.work = args, procs, control, work
        self.results = Results()
        self.servers: dict[str, str] = {}
        self.pids: dict[str, int] = {}
        self.backend_of = {"reference": "python fake", "static": "static nginx", "triton": ""}
        """How the report names each reference."""
        self.say: Callable[[str], None] = lambda s: print(s, flush=True)
        self._started = 0
        self._triton: TritonServer | None = None
        self._triton_failed: SetupError | None = None

    async def start_backends(self) -> None:
        for name, delay in (("reference", 0.0), ("fast", 0.0), ("slow", SLOW_DELAY_MS)):
            proc, url = await start_backend(self.procs, self.control, name, delay)
            self.servers[name], self.pids[name] = url, proc.pid
        self.servers["dead"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        if nginx_binary() is None:
            # Without NGINX the live path and the runs meant for static NGINX still run, on the
            # fake backends, and the report names them so.
            for static, fake in (("static", "reference"), ("static-cand", "fast")):
                self.servers[static], self.pids[static] = self.servers[fake], self.pids[fake]
            self.backend_of["static"] = "python fake (no nginx)"
            return
        for name in ("static", "static-cand"):
            port, work = free_port(), self.work / name
            proc = start_static_backend(self.procs, name, work, port)
            url = f"http://127.0.0.1:{port}"
            await wait_http_ok(self.control, [f"{url}/v2/health/ready"], proc, work / "error.log")
            self.servers[name], self.pids[name] = url, proc.pid

    async def start_triton(self) -> str:
        """The light Triton pair, started once for every proxy's coverage run; its URL."""
        if self._triton_failed is not None:
            raise self._triton_failed  # one failed start (minutes) is enough
        if self._triton is None:
            server = self._triton = light_triton(self.work / "triton")
            try:
                await asyncio.to_thread(start_light_triton, server)
            except SetupError as exc:
                self._triton_failed = exc
                self.stop_triton()
                raise
            self.servers["triton"] = server.url
            self.servers["triton-grpc"] = f"127.0.0.1:{server.grpc_port}"
            self.servers["triton-metrics"] = f"http://127.0.0.1:{server.metrics_port}/metrics"
            self.backend_of["triton"] = f"triton {LIGHT_REF} / {LIGHT_CAND}"
        return self.servers["triton"]

    def stop_triton(self) -> None:
        if self._triton is not None:
            self._triton.stop()
            self._triton = None

    def _our_pids(self) -> dict[str, int | str]:
        # Everything this benchmark started is below it: backends, NGINX, proxies, their Redis,
        # Triton and its stubs, wrk. The rest of the host's CPU is "other".
        return {"loadgen": os.getpid(), **{str(p): p for p in descendants(os.getpid())}}

    async def measure(
        self,
        target: str,
        name: str,
        kind: str,
        rate: float,
        url: str,
        admin: Admin | None = None,
        candidate: str | None = None,
        round: int | None = None,
        reference: str = "reference",
    ) -> Point:
        """One open-loop point; with ``admin`` and ``candidate``, also its copies' coverage."""
        counting = admin is not None and candidate is not None
        start = await copies(self.control, *admin) if admin and counting else None
        pids = self._our_pids()
        before = snapshot(pids)
        run = await open_loop(
            url + PATH, scenario(kind), rate, self.args.duration, self.args.warmup
        )
        after = snapshot(pids)
        point = Point(target, name, run=run, other_cpu=_other_cpu(before, after), round=round)
        point.backend = self.backend_of[reference]
        if admin and candidate and start is not None:
            end = await settle(self.control, *admin, start, run.sent, POINT_SETTLE_S)
            point.copies = coverage(start, end, candidate, run.sent)
        self.results.points.append(point)
        p = run.figures()
        cov = f"  coverage {point.copies.share:.0%}" if point.copies else ""
        label = f"{name} r{round}" if round else name
        self.say(
            f"  {target:<22} {label:<14} p50 {p['p50'] or 0:8.2f}  p99 {p['p99'] or 0:8.2f}  "
            f"p99.9 {p['p99.9'] or 0:8.2f} ms  errors {sum(run.errors.values())}{cov}"
        )
        return point

    async def saturate(
        self, target: str, url: str, admin: Admin | None = None, round: int | None = None
    ) -> None:
        start = await copies(self.control, *admin) if admin else None
        sat = wrk_saturation(url + PATH, scenario("small")[0], self.args.sat_duration)
        if admin and start is not None:
            # The copies wrk's requests left queued must not run beside the next measurement.
            await settle(self.control, *admin, start, None, POINT_SETTLE_S)
        if sat is None:
            return
        point = Point(target, "saturation", saturation=sat, round=round)
        point.backend = self.backend_of["static" if round else "reference"]
        self.results.points.append(point)
        self.say(f"  {target:<22} saturation     {sat.requests_per_s:8.0f} req/s ({sat.tool})")

    @contextlib.asynccontextmanager
    async def server(
        self, target: str, candidate: str | dict[str, Any] | None, reference: str = "reference"
    ) -> AsyncIterator[tuple[str, int, Admin | None]]:
        """Start ``target`` in front of ``reference`` (a key of ``servers``), mirroring to
        ``candidate`` (a key of ``servers``, or a whole candidate config); yield its URL, its
        pid, and for a shadowproxy its admin URL and token. ``direct`` is the reference itself."""
        if target == "direct":
            yield self.servers[reference], self.pids[reference], None
            return
        self._started += 1
        label = candidate["name"] if isinstance(candidate, dict) else candidate or "none"
        work = self.work / f"{target}-{label}-{self._started}"
        port = free_port()
        if target.startswith("nginx"):
            mirror = self.servers[candidate] if isinstance(candidate, str) else None
            proc = start_nginx(self.procs, work.name, work, port, self.servers[reference], mirror)
            url = f"http://127.0.0.1:{port}"
            await wait_http_ok(self.control, [f"{url}/v2/health/ready"], proc, work / "error.log")
            try:
                yield url, proc.pid, None
            finally:
                self.procs.stop(proc)
            return
        tree = self.args.trees.get(target, ROOT)
        token, admin_port = secrets.token_urlsafe(16), free_port()
        cand = candidate if isinstance(candidate, dict) else None
        if isinstance(candidate, str):
            cand = {"name": candidate, "url": self.servers[candidate], "sample_rate": 1.0}
            cand["timeout_s"] = 5.0
        cfg = proxy_config(port, admin_port, token, self.servers[reference], work / "state", cand)
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

    async def points(self, target: str) -> None:
        """The open-loop points against the fake reference (small@300, tensors, the mix)."""
        candidate = "fast" if target != "direct" and target != "nginx" else None
        self.say(f"[{time.strftime('%H:%M:%S')}] {target}")
        async with self.server(target, candidate) as (url, _, admin):
            for name, kind, rate in point_names(self.args):
                await self.measure(target, name, kind, rate, url, admin, candidate)
            if admin is not None and candidate:
                self.results.mirror[target] = (await scrape(self.control, *admin))["mirror"]

    async def fault(self, target: str, candidate: str | None) -> None:
        """One target at ``--fault-rate`` with the slow, the dead, or (None) no candidate."""
        rate = self.args.fault_rate
        self.say(f"[{time.strftime('%H:%M:%S')}] faults: {target} {candidate or 'no mirror'}")
        async with self.server(target, candidate) as (url, _, admin):
            name = f"{candidate or 'no'}-candidate@{rate:g}"
            await self.measure(target, name, "small", rate, url, admin, candidate)
            if admin is not None and candidate:
                outcomes = (await scrape(self.control, *admin))["mirror"]
                self.results.mirror[f"{target} ({candidate} candidate)"] = outcomes

    async def attempt(self, what: str, step: Awaitable[None]) -> None:
        """Run one step; a target that does not start is reported, and the run goes on."""
        try:
            await step
        except SetupError as exc:
            self.results.notes.append(f"{what}: not measured, it did not start: {exc}")
            self.say(f"  {what}: did not start: {exc}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            # A proxy whose admin API fails mid-run: say so, and measure the rest.
            self.results.notes.append(f"{what}: failed: {type(exc).__name__}: {exc}")
            self.say(f"  {what}: failed: {type(exc).__name__}: {exc}")

    async def memory(self, target: str) -> None:
        secs, rate = self.args.memory_duration, self.args.memory_rate
        self.say(f"[{time.strftime('%H:%M:%S')}] memory: {target}, slow candidate, {secs:g} s")
        async with self.server(target, "slow") as (url, pid, admin):
            point = Point(
                target, f"memory@{rate:g} {secs:g}s", backend=self.backend_of["reference"]
            )
            load = asyncio.create_task(
                open_loop(url + PATH, scenario("small"), rate, secs, warmup_s=0.0)
            )
            t0 = time.monotonic()
            while not load.done():
                # The embedded Redis is the proxy's child but not the proxy's memory.
                procs = [pid, *(p for p in descendants(pid) if not is_redis(p))]
                rss = [memory_mb(p) for p in procs]
                point.memory.append((time.monotonic() - t0, sum(r[0] for r in rss if r)))
                await asyncio.sleep(1.0)
            point.run = await load
            self.results.points.append(point)
            if admin is not None:
                # Queued copies still have to meet the slow candidate: count them too.
                start = Copies({}, 0, {})
                end = await settle(self.control, *admin, start, point.run.sent, POINT_SETTLE_S)
                self.results.mirror[f"{target} (memory run)"] = end.outcomes


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
            try:
                await _sections(bench, args)
            finally:
                bench.stop_triton()
            return bench.results


async def _sections(bench: Bench, args: argparse.Namespace) -> None:
    await bench.start_backends()
    proxies = ["shadowproxy", *(f"shadowproxy@{k}" for k in args.tree_labels)]
    args.trees = {f"shadowproxy@{k}": Path(v) for k, v in args.tree_dirs.items()}
    nginx = ["nginx", "nginx-mirror"] if nginx_binary() else []
    if not nginx:
        bench.results.notes.append(
            "nginx is not installed: the NGINX targets were skipped, and the live path, "
            "coverage and CPU runs used the Python fake backend instead of static NGINX"
        )
    if shutil.which("wrk") is None:
        bench.results.notes.append("wrk is not installed: no saturation runs")
    only = set(args.only or SECTIONS)
    live = ["direct", NO_MIRROR, *nginx[1:], *proxies]
    if "live" in only:
        await bench.attempt("live path", run_rounds(bench, live))
    for target in ["direct", *nginx, *proxies] if "points" in only else []:
        await bench.attempt(target, bench.points(target))
    for target in nginx[1:] + proxies if "faults" in only else []:
        # NGINX's own no-mirror figure is the `nginx` target's; each proxy needs its own.
        for cand in ([] if target.startswith("nginx") else [None]) + ["slow", "dead"]:
            await bench.attempt(f"{target} {cand}", bench.fault(target, cand))
    for target in proxies if "coverage" in only else []:
        await bench.attempt(f"{target} coverage static", run_coverage(bench, target, "static"))
    for target in proxies if "cpu" in only else []:
        await bench.attempt(f"{target} CPU per copy", run_cpu(bench, target))
    for target in proxies if "triton" in only else []:
        await bench.attempt(f"{target} coverage triton", run_coverage(bench, target, "triton"))
    if "grpc" in only:
        await bench.attempt("grpc", run_grpc(bench))
    if "llm" in only:
        await bench.attempt("llm", run_llm(bench))
    bench.stop_triton()  # its stubs must not sit beside the memory run
    for target in proxies if "memory" in only else []:
        await bench.attempt(f"{target} memory", bench.memory(target))


SECTIONS = ("live", "points", "faults", "coverage", "cpu", "triton", "grpc", "llm", "memory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__)
    parser.add_argument(
        "--only",
        action="append",
        choices=SECTIONS,
        help="run only this section (repeatable): to re-measure one figure quickly",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="measured s per point")
    parser.add_argument("--warmup", type=float, default=2.0, help="discarded s before each")
    parser.add_argument("--sat-duration", type=float, default=5.0, help="wrk seconds")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved live-path rounds")
    parser.add_argument("--memory-duration", type=float, default=60.0)
    # 500/s: copies of a 200 ms candidate outnumber max_in_flight (64) and must be dropped, while
    # the live path itself keeps up (at 1000/s it does not here, and its own backlog would grow).
    parser.add_argument("--memory-rate", type=float, default=500.0, help="requests/s")
    parser.add_argument("--tensor-rate", type=float, default=50.0, help="1 MiB requests/s")
    parser.add_argument("--fault-rate", type=float, default=300.0)
    parser.add_argument(
        "--coverage-duration", type=float, default=60.0, help="s of each dedicated coverage run"
    )
    parser.add_argument("--coverage-rate", type=float, default=1000.0, help="static NGINX run")
    parser.add_argument("--triton-rate", type=float, default=150.0, help="light Triton pair run")
    parser.add_argument("--cpu-rate", type=float, default=120.0, help="CPU-per-copy run, req/s")
    parser.add_argument("--cpu-duration", type=float, default=20.0)
    parser.add_argument(
        "--grpc-backend",
        choices=("static", "python"),
        help="gRPC section's backend: static NGINX (the default with nginx) or grpc_backend.py",
    )
    parser.add_argument(
        "--grpc-backend-processes", type=int, default=2, help="grpc_backend.py processes"
    )
    parser.add_argument(
        "--grpc-triton-rate", type=float, default=300.0, help="gRPC calls/s against Triton"
    )
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
        args.coverage_duration, args.cpu_duration = 10.0, 5.0
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
    (args.out / "bench.json").write_text(json.dumps(to_json(results), indent=2))
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


if __name__ == "__main__":
    raise SystemExit(main())
