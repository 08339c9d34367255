"""The gRPC section of ``make bench``: ``ModelInfer`` direct, through shadowproxy, through NGINX.

Targets (each a gRPC endpoint the load generator, ``grpc_load.py``, calls):

- ``direct``: the reference itself (the floor of this machine and this generator);
- ``shadowproxy-no-mirror``: ``python -m proxy serve`` with ``listen.grpc_port`` and
  ``reference.grpc_url``, no candidate;
- ``nginx-grpc``: NGINX ``grpc_pass`` (``grpc_nginx.py``);
- ``nginx-grpc-mirror``: the same with ``mirror`` to the candidate;
- ``shadowproxy`` (and each ``shadowproxy@LABEL``): a candidate with ``grpc_url``, every
  request to be mirrored (``sample_rate: 1.0``).

Backends, named in the report:

- ``static grpc nginx`` (default where NGINX is installed): NGINX answering ``ModelInfer`` with a
  fixed message from a file (``grpc_nginx.start_static_grpc``), reference and candidate. The
  Python ``grpc.aio`` backend (``grpc_backend.py``) answers about as many calls per second as
  shadowproxy can forward (one Python process either side), so behind it every proxy would meet
  the same ceiling and saturation would compare nothing; the ceilings are measured and printed;
- ``python grpc.aio xN`` (``--grpc-backend python``, or without NGINX): ``grpc_backend.py`` with
  ``--grpc-backend-processes`` processes on one port (``SO_REUSEPORT``);
- ``triton light_ref``: the real Triton the Triton coverage run uses (started once), on its gRPC
  port; the candidate is the same server (shadowproxy maps ``light_ref`` to ``light_cand``,
  NGINX's mirror cannot rename, so its copies go to ``light_ref``).

As on the REST live path (``rounds.py``), every target stays up for the whole section and
``--rounds`` interleaved rounds each measure every target once, each round starting one target
later: open loop at 500 and 1000 req/s (``--warmup`` s discarded, ``--duration`` s measured,
latency from each call's intended send time into an HDR histogram), then saturation (closed
loop, 32 concurrent callers for ``--sat-duration`` s). Against Triton: the same at
``--grpc-triton-rate``. The report gives medians with their spread (min-max).

``mirrored`` is what the candidate itself received / calls sent (static NGINX: its
``stub_status``; the Python backend: its own count; Triton: ``nv_inference_request_success``
over both models less the calls sent); ``compared`` is the proxy's own count (``/metrics``),
for the proxy with a candidate.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import yaml

from .coverage import LIGHT_CAND, LIGHT_REF, copies, coverage, settle
from .grpc_backend import infer_count, start_grpc_backend, wait_grpc_ready
from .grpc_load import GrpcSaturation, LoadError, run_open, run_saturate
from .grpc_nginx import nginx_requests, start_grpc_nginx, start_static_grpc
from .mirror_overhead import proxy_config
from .nginx import nginx_binary
from .procs import ROOT, SetupError, Snapshot, free_port, snapshot, wait_http_ok
from .rounds import Spread, round_order, spread

if TYPE_CHECKING:
    from .bench import Bench, Point, Results

RATES = (500.0, 1000.0)
GOAL_RATE = 500.0
NO_MIRROR = "shadowproxy-no-mirror"
PLAIN = "nginx-grpc"
PEER = "nginx-grpc-mirror"
ADDED_P50_MS = 0.5
"""Goal: shadowproxy's added p50 over direct at 500 req/s."""
SATURATION_SHARE = 1.0
"""Goal: shadowproxy's saturation as a multiple of NGINX grpc_pass's (mirror to mirror)."""
CONCURRENCY = 32
CANDIDATE = "grpc-cand"
SETTLE_S = 15.0
FAST, TRITON, CEILING = "grpc", "triton", "ceiling"
"""Point name prefixes: the fast backend's rounds, Triton's rounds, the backends' ceilings."""


@dataclass
class Backend:
    label: str
    """How the report names it."""
    reference: str
    candidate: str
    """host:port of the reference's and the candidate's gRPC endpoints."""
    rest_reference: str
    rest_candidate: str
    """Their REST URLs (the proxy's config needs one; it reads model configs there)."""
    received: Callable[[], Awaitable[int | None]]
    """Calls the candidate side received so far (None: cannot tell)."""
    request: str = "small"
    """``grpc_load``'s ``--request``."""
    model_map: dict[str, str] | None = None
    live_counted: bool = False
    """``received`` also counts the live calls (Triton): subtract them."""


@dataclass
class Up:
    target: str
    address: str
    admin: tuple[str, str] | None
    mirrors: bool


def mirrors(target: str) -> bool:
    return target not in ("direct", NO_MIRROR, PLAIN)


def targets(bench: Bench) -> list[str]:
    nginx = [PLAIN, PEER] if nginx_binary() else []
    trees = [f"shadowproxy@{k}" for k in bench.args.tree_labels]
    return ["direct", NO_MIRROR, *nginx, "shadowproxy", *trees]


# ----------------------------------------------------------------------------------------------
# Backends and targets.


def _stub_counter(control: aiohttp.ClientSession, url: str) -> Callable[[], Awaitable[int | None]]:
    reads = 0

    async def received() -> int | None:
        nonlocal reads
        reads += 1  # each stub_status read counts itself
        count = await nginx_requests(control, url)
        return None if count is None else count - reads

    return received


def _triton_counter(
    control: aiohttp.ClientSession, metrics_url: str
) -> Callable[[], Awaitable[int | None]]:
    pattern = re.compile(
        rf'^nv_inference_request_success\{{[^}}]*model="({LIGHT_REF}|{LIGHT_CAND})"[^}}]*\}}\s+'
        r"([\d.e+]+)",
        re.MULTILINE,
    )

    async def received() -> int | None:
        try:
            async with control.get(metrics_url) as resp:
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError):
            return None
        return sum(int(float(m.group(2))) for m in pattern.finditer(text))

    return received


async def start_fast_backends(bench: Bench, kind: str, processes: int) -> Backend:
    """Reference and candidate for the rounds: static NGINX gRPC, or the Python one."""
    procs, ports = bench.procs, [free_port() for _ in range(4)]
    rest = bench.servers["static"], bench.servers["static-cand"]
    addresses = [f"127.0.0.1:{p}" for p in ports[:2]]
    if kind == "static":
        for name, port, status in (
            ("grpc-static", ports[0], ports[2]),
            ("grpc-static-cand", ports[1], ports[3]),
        ):
            proc = start_static_grpc(procs, name, bench.work / name, port, status)
            await wait_grpc_ready(f"127.0.0.1:{port}", proc)
        counter = _stub_counter(bench.control, f"http://127.0.0.1:{ports[3]}/status")
        return Backend("static grpc nginx", *addresses, *rest, counter)
    for name, port in (("grpc-python", ports[0]), ("grpc-python-cand", ports[1])):
        proc = start_grpc_backend(procs, name, port, processes)
        await wait_grpc_ready(f"127.0.0.1:{port}", proc)

    async def received() -> int | None:
        return await infer_count(addresses[1])

    return Backend(f"python grpc.aio x{processes}", *addresses, *rest, received)


@contextlib.asynccontextmanager
async def grpc_target(bench: Bench, target: str, backend: Backend) -> AsyncIterator[Up]:
    """Start ``target`` in front of ``backend``; yield its gRPC address (and admin for a proxy)."""
    if target == "direct":
        yield Up(target, backend.reference, None, False)
        return
    bench._started += 1
    work = bench.work / f"grpc-{target}-{bench._started}"
    port = free_port()
    address = f"127.0.0.1:{port}"
    mirror = mirrors(target)
    if target.startswith("nginx"):
        cand = backend.candidate if mirror else None
        proc = start_grpc_nginx(bench.procs, work.name, work, port, backend.reference, cand)
        try:
            await wait_grpc_ready(address, proc)
            yield Up(target, address, None, mirror)
        finally:
            bench.procs.stop(proc)
        return
    tree = bench.args.trees.get(target, ROOT)
    token, admin_port = secrets.token_urlsafe(16), free_port()
    candidate: dict[str, Any] | None = None
    if mirror:
        candidate = {
            "name": CANDIDATE,
            "url": backend.rest_candidate,
            "grpc_url": backend.candidate,
            "sample_rate": 1.0,
            "timeout_s": 5.0,
        }
        if backend.model_map:
            candidate["model_map"] = backend.model_map
    cfg = proxy_config(
        free_port(), admin_port, token, backend.rest_reference, work / "state", candidate
    )
    cfg["listen"]["grpc_port"] = port
    cfg["reference"]["grpc_url"] = backend.reference
    cfg["log_level"] = "WARNING"
    work.mkdir(parents=True)
    (work / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(tree)}
    args = [sys.executable, "-m", "proxy", "serve", "--config", str(work / "config.yaml")]
    proc = bench.procs.start(work.name, args, cwd=tree, env=env)
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        log = bench.procs.log_dir / f"{work.name}.log"
        await wait_http_ok(bench.control, [f"{admin}/healthz"], proc, log)
        await wait_grpc_ready(address, proc)
        bench.procs.adopt_children(proc)
        yield Up(target, address, (admin, token), mirror)
    finally:
        bench.procs.stop(proc)


# ----------------------------------------------------------------------------------------------
# Measurements.


def _other_cpu(before: Snapshot, after: Snapshot, generator_cpu_s: float) -> float | None:
    """CPU % of processes outside the benchmark: the generator ran in a process that started
    and ended between the snapshots, so its own CPU is taken out here."""
    from .bench import _other_cpu as other

    value = other(before, after)
    if value is None:
        return None
    return max(0.0, value - generator_cpu_s / max(1e-9, after.at - before.at) * 100.0)


class _Counting:
    """What the copies of one measurement became: the candidate's count, the proxy's."""

    def __init__(self, bench: Bench, up: Up, backend: Backend) -> None:
        self.bench, self.up, self.backend = bench, up, backend
        self.received0: int | None = None
        self.copies0: Any = None

    async def start(self) -> None:
        if not self.up.mirrors:
            return
        self.received0 = await self.backend.received()
        if self.up.admin:
            self.copies0 = await copies(self.bench.control, *self.up.admin)

    async def finish(self, point: Point, sent: int | None) -> None:
        if not self.up.mirrors:
            return
        if self.up.admin and self.copies0 is not None:
            end = await settle(self.bench.control, *self.up.admin, self.copies0, sent, SETTLE_S)
            if sent is not None:
                point.copies = coverage(self.copies0, end, CANDIDATE, sent)
        else:
            await asyncio.sleep(0.5)  # NGINX's mirror subrequests finish with their calls
        received = await self.backend.received()
        if received is not None and self.received0 is not None:
            point.received = received - self.received0
            if self.backend.live_counted and sent is not None:
                point.received -= sent


async def measure(
    bench: Bench, up: Up, backend: Backend, prefix: str, rate: float, round: int | None
) -> Point:
    from .bench import Point

    counting = _Counting(bench, up, backend)
    await counting.start()
    pids = bench._our_pids()
    before = snapshot(pids)
    args = bench.args
    run, cpu_s = await run_open(up.address, rate, args.duration, args.warmup, backend.request)
    after = snapshot(pids)
    point = Point(up.target, f"{prefix}@{rate:g}", run=run, round=round, backend=backend.label)
    point.other_cpu = _other_cpu(before, after, cpu_s)
    await counting.finish(point, run.sent)
    bench.results.grpc.append(point)
    p = run.figures()
    mirrored = f"  mirrored {point.received / run.sent:.0%}" if point.received is not None else ""
    label = f"{point.name} r{round}" if round else point.name
    bench.say(
        f"  grpc {up.target:<22} {label:<16} p50 {p['p50'] or 0:8.2f}  p99 {p['p99'] or 0:8.2f}"
        f"  p99.9 {p['p99.9'] or 0:8.2f} ms  errors {sum(run.errors.values())}{mirrored}"
    )
    return point


async def saturate(bench: Bench, up: Up, backend: Backend, name: str, round: int | None) -> Point:
    from .bench import Point

    counting = _Counting(bench, up, backend)
    await counting.start()
    pids = bench._our_pids()
    before = snapshot(pids)
    sat = await run_saturate(up.address, bench.args.sat_duration, CONCURRENCY, backend.request)
    after = snapshot(pids)
    point = Point(up.target, name, saturation=sat, round=round, backend=backend.label)
    point.other_cpu = _other_cpu(before, after, sat.client_cores * bench.args.sat_duration)
    # Saturation sends an unknown number of calls: wait for the copies, count what arrived.
    await counting.finish(point, None)
    bench.results.grpc.append(point)
    bench.say(
        f"  grpc {up.target:<22} {name:<16} {sat.requests_per_s:8.0f} req/s ({sat.tool}, "
        f"generator {sat.client_cores:.2f} cores, errors {sat.errors})"
    )
    return point


async def _rounds(
    bench: Bench, backend: Backend, names: Sequence[str], prefix: str, rates: Sequence[float]
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        up: dict[str, Up] = {}
        for target in names:
            try:
                up[target] = await stack.enter_async_context(grpc_target(bench, target, backend))
            except SetupError as exc:
                bench.results.notes.append(f"grpc {target} ({backend.label}): not measured: {exc}")
                bench.say(f"  grpc {target}: did not start: {exc}")
        rounds = bench.args.rounds
        for r in range(rounds):
            bench.say(f"[{time.strftime('%H:%M:%S')}] gRPC {backend.label}, round {r + 1}/{rounds}")
            order = round_order(list(up), r)
            for rate in rates:
                for target in order:
                    await _guarded(bench, measure(bench, up[target], backend, prefix, rate, r + 1))
            for target in order:
                sat = saturate(bench, up[target], backend, f"{prefix} saturation", r + 1)
                await _guarded(bench, sat)


async def _guarded(bench: Bench, step: Awaitable[Any]) -> None:
    """One measurement; a generator that fails is reported, and the section goes on."""
    try:
        await step
    except (LoadError, TimeoutError) as exc:
        bench.results.notes.append(f"grpc: a measurement failed: {type(exc).__name__}: {exc}")
        bench.say(f"  grpc: a measurement failed: {exc}")


async def ceilings(bench: Bench, fast: Backend) -> None:
    """What each backend answers at saturation, direct: the Python one with 1 and N processes,
    and the fast backend of the rounds. A proxy cannot go faster than its backend."""
    processes = sorted({1, bench.args.grpc_backend_processes})
    for n in processes:
        port = free_port()
        proc = start_grpc_backend(bench.procs, f"grpc-ceiling-x{n}", port, n)
        try:
            await wait_grpc_ready(f"127.0.0.1:{port}", proc)
            backend = Backend(f"python grpc.aio x{n}", f"127.0.0.1:{port}", "", "", "", _none)
            up = Up("direct", backend.reference, None, False)
            await _guarded(bench, saturate(bench, up, backend, f"{CEILING} saturation", None))
        finally:
            bench.procs.stop(proc)
    if not fast.label.startswith("python"):
        up = Up("direct", fast.reference, None, False)
        await _guarded(bench, saturate(bench, up, fast, f"{CEILING} saturation", None))


async def _none() -> int | None:
    return None


async def run_grpc(bench: Bench) -> None:
    """The whole section: ceilings, the fast backend's rounds, then real Triton's."""
    args = bench.args
    kind = args.grpc_backend or ("static" if nginx_binary() else "python")
    if kind == "static" and not nginx_binary():
        kind = "python"
    if not nginx_binary():
        bench.results.notes.append(
            "nginx is not installed: no nginx-grpc targets, the gRPC backend is the Python one"
        )
    bench.say(f"[{time.strftime('%H:%M:%S')}] gRPC: backends ({kind})")
    fast = await start_fast_backends(bench, kind, args.grpc_backend_processes)
    await ceilings(bench, fast)
    await _rounds(bench, fast, targets(bench), FAST, RATES)
    try:
        await bench.start_triton()
    except SetupError as exc:
        bench.results.notes.append(f"grpc against Triton: not measured: {exc}")
        bench.say(f"  grpc against Triton: not measured: {exc}")
        return
    grpc_address, metrics = bench.servers["triton-grpc"], bench.servers["triton-metrics"]
    triton = Backend(
        f"triton {LIGHT_REF}",
        grpc_address,
        grpc_address,
        bench.servers["triton"],
        bench.servers["triton"],
        _triton_counter(bench.control, metrics),
        request="light",
        model_map={LIGHT_REF: LIGHT_CAND},
        live_counted=True,
    )
    names = [t for t in targets(bench) if t != PLAIN]
    await _rounds(bench, triton, names, TRITON, (args.grpc_triton_rate,))


# ----------------------------------------------------------------------------------------------
# Report.


def _points(results: Results, target: str, name: str) -> list[Point]:
    return [p for p in results.grpc if p.target == target and p.name == name]


def _latency(results: Results, target: str, name: str, key: str) -> Spread | None:
    runs = [p.run for p in _points(results, target, name) if p.run and p.run.ok]
    return spread([v for r in runs if (v := r.figures()[key]) is not None])


def _saturation(results: Results, target: str, name: str) -> Spread | None:
    sats = [p.saturation for p in _points(results, target, name) if p.saturation]
    return spread([s.requests_per_s for s in sats])


def _generator(results: Results, target: str, name: str) -> Spread | None:
    sats = [p.saturation for p in _points(results, target, name)]
    return spread([s.client_cores for s in sats if isinstance(s, GrpcSaturation)])


def _targets(results: Results, prefix: str) -> list[str]:
    seen: list[str] = []
    for p in results.grpc:
        if p.name.startswith(prefix + "@") and p.target not in seen:
            seen.append(p.target)
    return seen


def _rates(results: Results, prefix: str) -> list[str]:
    names: list[str] = []
    for p in results.grpc:
        if p.name.startswith(prefix + "@") and p.name not in names:
            names.append(p.name)
    return names


def grpc_table(results: Results, prefix: str = FAST) -> tuple[list[str], list[list[str]]]:
    """Medians (min-max) per target: saturation, then p50/p99 and the added p50/p99 over
    ``direct`` at each rate, mirrored and compared shares, errors."""
    names = _rates(results, prefix)
    header = ["target", "backend", "saturation req/s", "generator cores"]
    for name in names:
        rate = name.split("@")[1]
        header += [f"p50 ms @{rate}", f"p99 ms @{rate}", f"added p50 / p99 @{rate}"]
    header += ["mirrored", "compared", "errors"]
    rows = []
    sat_name = f"{prefix} saturation"
    for target in _targets(results, prefix):
        points = [p for p in results.grpc if p.target == target and p.name.startswith(prefix)]
        sat, gen = _saturation(results, target, sat_name), _generator(results, target, sat_name)
        row = [
            target,
            points[0].backend if points else "-",
            sat.text(0) if sat else "-",
            gen.text(2) if gen else "-",
        ]
        for name in names:
            p50, p99 = (_latency(results, target, name, k) for k in ("p50", "p99"))
            d50, d99 = (_latency(results, "direct", name, k) for k in ("p50", "p99"))
            added = "-"
            if target != "direct" and p50 and p99 and d50 and d99:
                added = f"{p50.median - d50.median:+.2f} / {p99.median - d99.median:+.2f} ms"
            row += [p50.text() if p50 else "-", p99.text() if p99 else "-", added]
        opened = [p for p in points if p.run is not None]
        shares = [p.received / p.run.sent for p in opened if p.received is not None and p.run]
        mirrored = spread(shares)
        compared = spread([p.copies.share for p in opened if p.copies is not None])
        errors = sum(sum(p.run.errors.values()) for p in opened if p.run)
        sat_errors = sum(p.saturation.errors for p in points if p.saturation)
        row += [
            f"{mirrored.median:.1%} ({mirrored.lo:.0%}-{mirrored.hi:.0%})" if mirrored else "-",
            f"{compared.median:.1%} ({compared.lo:.0%}-{compared.hi:.0%})" if compared else "-",
            f"{errors}" + (f" (+{sat_errors} saturation)" if sat_errors else ""),
        ]
        rows.append(row)
    return header, rows


def ceiling_table(results: Results) -> tuple[list[str], list[list[str]]]:
    header = ["backend (direct, no proxy)", "saturation req/s", "generator cores", "errors"]
    rows = []
    for p in results.grpc:
        if p.name == f"{CEILING} saturation" and isinstance(p.saturation, GrpcSaturation):
            sat = p.saturation
            rows.append(
                [p.backend, f"{sat.requests_per_s:.0f}", f"{sat.client_cores:.2f}", str(sat.errors)]
            )
    return header, rows


def grpc_goals(results: Results) -> list[str]:
    lines = []
    goal_name = f"{FAST}@{GOAL_RATE:g}"
    d50 = _latency(results, "direct", goal_name, "p50")
    proxies = [t for t in _targets(results, FAST) if t.startswith("shadowproxy")]
    n = len(_points(results, "direct", goal_name))
    for target in proxies:
        p50 = _latency(results, target, goal_name, "p50")
        points = _points(results, target, goal_name)
        errors = sum(sum(p.run.errors.values()) for p in points if p.run)
        backend = points[0].backend if points else "-"
        if p50 and d50:
            added = p50.median - d50.median
            ok = added <= ADDED_P50_MS and not errors
            lines.append(
                f"{'PASS' if ok else 'FAIL'} gRPC {target}: added p50 at {GOAL_RATE:g} req/s, "
                f"{backend}, median of {n} rounds: {added:+.2f} ms over direct "
                f"(goal <= {ADDED_P50_MS} ms; p50 {p50.text()} vs direct {d50.text()})"
                + (f"; {errors} errors" if errors else "")
            )
        peer = PLAIN if target == NO_MIRROR else PEER
        sat = _saturation(results, target, f"{FAST} saturation")
        peer_sat = _saturation(results, peer, f"{FAST} saturation")
        if sat and peer_sat and peer_sat.median:
            share = sat.median / peer_sat.median
            lines.append(
                f"{'PASS' if share >= SATURATION_SHARE else 'FAIL'} gRPC {target}: saturation "
                f"{sat.text(0)} req/s = {share:.2f}x {peer} {peer_sat.text(0)} (medians; goal "
                f">= {SATURATION_SHARE}x)"
            )
        shares = [p.received / p.run.sent for p in points if p.received is not None and p.run]
        if mirrors(target) and shares and max(shares) < 0.99:
            lines.append(
                f"NOTE gRPC {target}: the candidate received {max(shares):.0%} of the calls at "
                f"most: this build does not mirror (all of) gRPC, so 'with mirroring' measured "
                "less mirroring than asked for"
            )
    return lines
