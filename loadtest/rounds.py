"""The live path against the strongest fair baseline, in interleaved rounds.

On two shared cores one run of a point moves by more than the differences being measured: a
neighbour's test suite, a page-cache flush, the CPU's clock. So the live-path figures are taken
in ``--rounds`` rounds (3 by default) over targets that all stay up for the whole section; each
round measures every target once (small JSON at 1000 req/s, open loop, then ``wrk``
saturation), and the report gives each figure's median with its spread (min-max). A drift on
the host then touches every target alike instead of the one that happened to run during it.
Each round starts one target later, so none always runs first or right after the same one.

The reference and the candidate are static NGINX servers (``static_backend.py``): the floor of
``direct`` is then NGINX's own, and the added latency of each proxy is its own work.

Targets: ``direct`` (the reference itself), ``shadowproxy-no-mirror`` (the proxy with no
candidate), ``nginx-mirror`` (NGINX's ``mirror`` to the static candidate), ``shadowproxy`` (every
request mirrored to the static candidate and compared) and any ``shadowproxy@LABEL``.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .procs import SetupError

if TYPE_CHECKING:
    from .bench import Bench, Point, Results

LIVE_POINT = "small@1000"
LIVE_RATE = 1000.0
NO_MIRROR = "shadowproxy-no-mirror"
PEER = "nginx-mirror"
ADDED_P50_MARGIN_MS = 0.3
"""shadowproxy's added p50 over direct may exceed NGINX mirror's by at most this."""
ADDED_P99_MS = 2.0
SATURATION_SHARE = 1.0
"""shadowproxy's saturation throughput as a multiple of NGINX mirror's."""


def round_order(targets: Sequence[str], index: int) -> list[str]:
    k = index % len(targets) if targets else 0
    return [*targets[k:], *targets[:k]]


def candidate_for(target: str) -> str | None:
    return None if target in ("direct", NO_MIRROR) else "static-cand"


async def run_rounds(bench: Bench, targets: Sequence[str]) -> None:
    """Start every target once, then measure them round after round, interleaved."""
    async with contextlib.AsyncExitStack() as stack:
        up: dict[str, Any] = {}
        for target in targets:
            try:
                server = bench.server(target, candidate_for(target), "static")
                up[target] = await stack.enter_async_context(server)
            except SetupError as exc:
                bench.results.notes.append(f"{target} (live path): not measured: {exc}")
                bench.say(f"  {target}: did not start: {exc}")
        rounds = bench.args.rounds
        for r in range(rounds):
            bench.say(f"[{time.strftime('%H:%M:%S')}] live path, round {r + 1} of {rounds}")
            order = round_order(list(up), r)
            for target in order:
                url, _, admin = up[target]
                # Copies are counted (and waited for) only where there is a candidate.
                cand = candidate_for(target)
                admin = admin if cand else None
                await bench.measure(
                    target, LIVE_POINT, "small", LIVE_RATE, url, admin, cand, r + 1, "static"
                )
            for target in order:
                url, _, admin = up[target]
                await bench.saturate(target, url, admin if candidate_for(target) else None, r + 1)


@dataclass(frozen=True)
class Spread:
    median: float
    lo: float
    hi: float

    def text(self, digits: int = 2) -> str:
        return f"{self.median:.{digits}f} ({self.lo:.{digits}f}-{self.hi:.{digits}f})"


def spread(values: Sequence[float]) -> Spread | None:
    if not values:
        return None
    return Spread(statistics.median(values), min(values), max(values))


def _points(results: Results, target: str, name: str) -> list[Point]:
    return [p for p in results.points if p.target == target and p.name == name and p.round]


def latency(results: Results, target: str, key: str) -> Spread | None:
    runs = [p.run for p in _points(results, target, LIVE_POINT) if p.run and p.run.ok]
    return spread([v for r in runs if (v := r.figures()[key]) is not None])


def saturation(results: Results, target: str) -> Spread | None:
    sats = [p.saturation for p in _points(results, target, "saturation")]
    return spread([s.requests_per_s for s in sats if s is not None])


def live_targets(results: Results) -> list[str]:
    seen: list[str] = []
    for p in results.points:
        if p.round and p.target not in seen:
            seen.append(p.target)
    return seen


def live_table(results: Results) -> tuple[list[str], list[list[str]]]:
    header = [
        "target",
        "backend",
        "saturation req/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "added p50 / p99 over direct",
        "coverage",
        "errors",
    ]
    d50, d99 = latency(results, "direct", "p50"), latency(results, "direct", "p99")
    rows = []
    for target in live_targets(results):
        points = _points(results, target, LIVE_POINT)
        p50, p99 = latency(results, target, "p50"), latency(results, target, "p99")
        p999, sat = latency(results, target, "p99.9"), saturation(results, target)
        added = "-"
        if target != "direct" and p50 and p99 and d50 and d99:
            added = f"{p50.median - d50.median:+.2f} / {p99.median - d99.median:+.2f} ms"
        shares = [p.copies.share for p in points if p.copies is not None]
        cov = spread(shares)
        errors = sum(sum(p.run.errors.values()) for p in points if p.run)
        sat_errors = sum(
            p.saturation.errors for p in _points(results, target, "saturation") if p.saturation
        )
        rows.append(
            [
                target,
                points[0].backend if points else "-",
                sat.text(0) if sat else "-",
                p50.text() if p50 else "-",
                p99.text() if p99 else "-",
                p999.text() if p999 else "-",
                added,
                f"{cov.median:.1%} ({cov.lo:.0%}-{cov.hi:.0%})" if cov else "-",
                f"{errors}" + (f" (+{sat_errors} wrk)" if sat_errors else ""),
            ]
        )
    return header, rows


def live_goals(results: Results, proxies: Sequence[str]) -> list[str]:
    lines = []
    d50, d99 = latency(results, "direct", "p50"), latency(results, "direct", "p99")
    m50 = latency(results, PEER, "p50")
    peer_sat = saturation(results, PEER)
    n = len(_points(results, "direct", LIVE_POINT))
    for target in proxies:
        p50, p99 = latency(results, target, "p50"), latency(results, target, "p99")
        errors = sum(
            sum(p.run.errors.values()) for p in _points(results, target, LIVE_POINT) if p.run
        )
        if p50 and p99 and d50 and d99 and m50:
            added, peer_added = p50.median - d50.median, m50.median - d50.median
            ok = added <= peer_added + ADDED_P50_MARGIN_MS and not errors
            lines.append(
                f"{'PASS' if ok else 'FAIL'} {target}: added p50 at {LIVE_RATE:g} req/s, 100% "
                f"mirrored, static NGINX backend, median of {n} rounds: {added:+.2f} ms over "
                f"direct (goal <= {PEER} {peer_added:+.2f} + {ADDED_P50_MARGIN_MS} ms)"
            )
            added99 = p99.median - d99.median
            lines.append(
                f"{'PASS' if added99 <= ADDED_P99_MS and not errors else 'FAIL'} {target}: "
                f"added p99 {added99:+.2f} ms over direct (goal <= {ADDED_P99_MS}; "
                f"p99 {p99.text()} ms, min-max over rounds)"
            )
        sat = saturation(results, target)
        if sat and peer_sat and peer_sat.median:
            share = sat.median / peer_sat.median
            lines.append(
                f"{'PASS' if share >= SATURATION_SHARE else 'FAIL'} {target}: saturation "
                f"{sat.text(0)} req/s = {share:.2f}x {PEER} {peer_sat.text(0)} (medians of {n} "
                f"interleaved rounds; goal >= {SATURATION_SHARE}x)"
            )
    return lines
