"""Coverage: what share of the copies asked for were compared, and were the right ones flagged?

A QA reviewer who asks for every request to be compared must see every request compared, or be
told why not. Coverage is read from the proxy's own counters (``/metrics``, parsed by
``mirror_overhead.scrape``): for one candidate, copies compared / requests sent, both counted
over the same stretch of traffic. The drop reasons are not looked at one by one (their names
change), only their sum, to know when every copy has had its outcome.

The Triton run plants divergences: ``light_cand`` answers differently from ``light_ref`` exactly
on rows whose last feature is ``MARKER``, so the requests that carry one are known in advance,
each under its own ``X-Request-Id``. The flagged samples the proxy stored (admin API,
``/api/samples?flagged=1``) are then matched against them: recall is the share of planted
requests found flagged, precision the share of flagged requests that were planted.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import numpy as np

from .mirror_overhead import MODEL, scrape
from .openloop import Payload, open_loop, scenario
from .procs import ROOT, SetupError

if TYPE_CHECKING:
    from proxy.tritonserver import TritonServer

    from .bench import Bench

LIGHT_REF, LIGHT_CAND = "light_ref", "light_cand"
MARKER = 13.0
"""``x[i, 7] == MARKER`` on a row makes ``light_cand`` diverge from ``light_ref`` on it."""
PLANTED_SHARE = 0.10
STILL_S = 1.5
"""Copies are settled when none has had an outcome for this long (the worker is idle)."""
MODELS = ROOT / "deploy" / "models"
SETTLE_S = 30.0
"""Longest wait after a run for the last copies' outcomes."""
TRITON_READY_S = 300.0
COVERAGE_GOALS = {"triton": 1.0, "static": 0.5}
"""Share of copies compared each dedicated run must reach (Triton: all; 1000 req/s: half)."""


@dataclass(frozen=True)
class Copies:
    """A proxy's copy counters at one moment."""

    compared: dict[str, int]
    """Copies compared, by candidate."""
    accounted: int
    """Copies with any outcome (compared, dropped, failed), all candidates, including those the
    live process refused before a candidate was chosen."""
    outcomes: dict[str, int]
    """Every outcome, summed over candidates (``mirror_overhead.parse_metrics``)."""


async def copies(control: aiohttp.ClientSession, admin: str, token: str) -> Copies:
    metrics = await scrape(control, admin, token)
    outcomes = {k: v for k, v in metrics["mirror"].items() if not k.startswith("skipped:")}
    compared = {c: o.get("compared", 0) for c, o in metrics["by_candidate"].items()}
    return Copies(compared, sum(outcomes.values()), outcomes)


async def settle(
    control: aiohttp.ClientSession,
    admin: str,
    token: str,
    before: Copies,
    expected: int | None,
    timeout_s: float,
) -> Copies:
    """Scrape until ``expected`` more copies have an outcome than ``before``, or none has had
    one for ``STILL_S``, or ``timeout_s`` is up; return the last counters.

    Copies queue on the shadow side, so the last ones are compared after the load has ended:
    counting them needs this wait, and so does the next measurement, which must not run beside
    the previous one's backlog.
    """
    deadline = time.monotonic() + timeout_s
    last = await copies(control, admin, token)
    still_since = time.monotonic()
    while time.monotonic() < deadline:
        if expected is not None and last.accounted - before.accounted >= expected:
            break
        if time.monotonic() - still_since >= STILL_S:
            break
        await asyncio.sleep(0.25)
        now = await copies(control, admin, token)
        if now.accounted != last.accounted:
            still_since = time.monotonic()
        last = now
    return last


@dataclass(frozen=True)
class Coverage:
    """What happened to one candidate's copies of ``sent`` requests."""

    candidate: str
    sent: int
    compared: int
    outcomes: dict[str, int]
    """Every outcome over the same stretch (all candidates), for the report."""

    @property
    def share(self) -> float:
        return self.compared / self.sent if self.sent else 0.0

    def others(self) -> str:
        rest = {k: v for k, v in self.outcomes.items() if k != "compared" and v}
        return ", ".join(f"{k} {v}" for k, v in sorted(rest.items())) or "nothing else"


def coverage(before: Copies, after: Copies, candidate: str, sent: int) -> Coverage:
    compared = after.compared.get(candidate, 0) - before.compared.get(candidate, 0)
    outcomes = {k: v - before.outcomes.get(k, 0) for k, v in after.outcomes.items()}
    return Coverage(candidate, sent, compared, outcomes)


# ----------------------------------------------------------------------------------------------
# Planted divergences for the light Triton pair.


@dataclass(frozen=True)
class PlantedTraffic:
    payloads: list[Payload]
    """One per request, each with its own ``X-Request-Id``; sent in order."""
    planted: frozenset[str]
    """Request ids whose input carries ``MARKER`` on at least one row."""


def planted_traffic(n: int, prefix: str, seed: int = 0) -> PlantedTraffic:
    """``n`` requests of 1..4 rows of small random features; ``PLANTED_SHARE`` of them (chosen
    at random, a fixed seed) carry ``MARKER`` as the last feature of one or more rows."""
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(n, size=max(1, round(n * PLANTED_SHARE)), replace=False).tolist())
    payloads, planted = [], set()
    for i in range(n):
        rows = int(rng.integers(1, 5))
        # Four decimals: short JSON, and values no float32 rounding can bring to MARKER.
        x = np.round(rng.normal(0.0, 0.5, size=(rows, 8)), 4)
        rid = f"{prefix}-{i:06d}"
        if i in chosen:
            marked = rng.random(rows) < 0.5
            marked[int(rng.integers(rows))] = True
            x[marked, 7] = MARKER
            planted.add(rid)
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 8]}]}
        body["inputs"][0]["data"] = x.ravel().tolist()
        payloads.append(
            Payload(
                "application/json",
                json.dumps(body, separators=(",", ":")).encode(),
                (("X-Request-Id", rid),),
            )
        )
    return PlantedTraffic(payloads, frozenset(planted))


async def flagged_ids(
    control: aiohttp.ClientSession, admin: str, token: str, candidate: str, timeout_s: float = 10.0
) -> set[str]:
    """Request ids of the flagged samples stored for ``candidate``, once their count is steady
    (a sample is stored just after its comparison is counted)."""
    deadline = time.monotonic() + timeout_s
    ids = await _flagged_once(control, admin, token, candidate)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        again = await _flagged_once(control, admin, token, candidate)
        if again == ids:
            break
        ids = again
    return ids


async def _flagged_once(
    control: aiohttp.ClientSession, admin: str, token: str, candidate: str
) -> set[str]:
    headers, offset, limit = {"Authorization": f"Bearer {token}"}, 0, 10_000
    ids: set[str] = set()
    for _ in range(50):  # bounded: 500k samples, far beyond any run here
        query = {"flagged": "1", "candidate": candidate, "limit": str(limit), "offset": str(offset)}
        async with control.get(f"{admin}/api/samples", params=query, headers=headers) as resp:
            resp.raise_for_status()
            page: list[dict[str, Any]] = await resp.json()
            total = int(resp.headers.get("X-Total-Count", len(page)))
        ids.update(str(s.get("request_id", "")) for s in page)
        offset += len(page)
        if not page or offset >= total:
            break
    return ids


# ----------------------------------------------------------------------------------------------
# The dedicated runs and their report.


def light_triton(workdir: Path) -> TritonServer:
    """The Triton server of the light pair, not started yet (so it can be stopped whatever
    happens while it starts), from the repository's launcher."""
    from proxy.tritonserver import TritonServer  # imported here: only this run needs the proxy

    for model in (LIGHT_REF, LIGHT_CAND):
        if not (MODELS / model / "config.pbtxt").exists():
            raise SetupError(f"{MODELS / model} is missing: no light Triton pair to measure")
    return TritonServer(MODELS, workdir=workdir, models=(LIGHT_REF, LIGHT_CAND))


def start_light_triton(server: TritonServer) -> None:
    """Start it and wait until both models answer (blocking: run it in a thread). Its failures
    are ``SetupError``s, like those of every other server the bench starts."""
    from proxy.tritonserver import TritonError

    try:
        server.start()
        server.wait_ready(TRITON_READY_S)
    except TritonError as exc:
        raise SetupError(f"Triton with {LIGHT_REF} and {LIGHT_CAND}: {exc}") from exc


async def run_coverage(bench: Bench, target: str, kind: str) -> None:
    """One dedicated coverage run of ``target`` against a fresh proxy, every request counted.

    ``triton``: the light pair at ``--triton-rate`` with planted divergences; ``static``: small
    JSON at ``--coverage-rate`` against static NGINX; each for ``--coverage-duration`` s.
    """
    args = bench.args
    secs, planted = args.coverage_duration, frozenset[str]()
    candidate: str | dict[str, Any]
    if kind == "triton":
        url = await bench.start_triton()
        rate, reference, model, name = args.triton_rate, "triton", LIGHT_REF, LIGHT_CAND
        candidate = {"name": name, "url": url, "sample_rate": 1.0, "timeout_s": 5.0}
        candidate["model_map"] = {LIGHT_REF: LIGHT_CAND}
        traffic = planted_traffic(round(rate * secs), prefix=target)
        payloads, planted = traffic.payloads, traffic.planted
    else:
        rate, reference, model = args.coverage_rate, "static", MODEL
        candidate = name = "static-cand"
        payloads = scenario("small")
    bench.say(f"[{time.strftime('%H:%M:%S')}] coverage: {target}, {kind}@{rate:g} for {secs:g} s")
    async with bench.server(target, candidate, reference) as (url, _, admin):
        assert admin is not None
        start = await copies(bench.control, *admin)
        run = await open_loop(f"{url}/v2/models/{model}/infer", payloads, rate, secs, 0.0)
        end = await settle(bench.control, *admin, start, run.sent, SETTLE_S)
        flagged = await flagged_ids(bench.control, *admin, name) if planted else set()
    figures = run.figures()
    result = CoverageRun(
        target,
        kind,
        bench.backend_of[reference],
        rate,
        secs,
        coverage(start, end, name, run.sent),
        figures["p50"],
        figures["p99"],
        sum(run.errors.values()),
        planted,
        flagged,
    )
    bench.results.coverage.append(result)
    found = f", recall {_share(result.recall)}, precision {_share(result.precision)}"
    bench.say(
        f"  {target}: {result.copies.compared} of {run.sent} copies compared "
        f"({result.copies.share:.1%}){found if planted else ''}"
    )


@dataclass
class CoverageRun:
    target: str
    kind: str
    """``triton`` (the light pair, planted divergences) or ``static`` (small JSON, NGINX)."""
    backend: str
    rate: float
    duration_s: float
    copies: Coverage
    p50_ms: float | None
    p99_ms: float | None
    errors: int
    planted: frozenset[str] = frozenset()
    flagged: set[str] = field(default_factory=set)

    @property
    def recall(self) -> float | None:
        return len(self.planted & self.flagged) / len(self.planted) if self.planted else None

    @property
    def precision(self) -> float | None:
        if self.kind != "triton":
            return None
        return len(self.planted & self.flagged) / len(self.flagged) if self.flagged else 0.0


def coverage_rows(runs: list[CoverageRun]) -> tuple[list[str], list[list[str]]]:
    header = [
        "target",
        "run",
        "backend",
        "sent",
        "compared",
        "coverage",
        "planted",
        "flagged",
        "recall",
        "precision",
        "live p50 / p99 ms",
        "other outcomes",
    ]
    rows = []
    for r in runs:
        c = r.copies
        triton = r.kind == "triton"
        rows.append(
            [
                r.target,
                f"{r.kind}@{r.rate:g} {r.duration_s:g}s",
                r.backend,
                str(c.sent),
                str(c.compared),
                f"{c.share:.1%}",
                str(len(r.planted)) if triton else "-",
                str(len(r.flagged)) if triton else "-",
                _share(r.recall),
                _share(r.precision),
                f"{_ms(r.p50_ms)} / {_ms(r.p99_ms)}"
                + (f" ({r.errors} errors)" if r.errors else ""),
                c.others(),
            ]
        )
    return header, rows


def coverage_goals(runs: list[CoverageRun]) -> list[str]:
    lines = []
    for r in runs:
        goal = COVERAGE_GOALS[r.kind]
        c = r.copies
        lines.append(
            f"{'PASS' if c.share >= goal else 'FAIL'} {r.target}: coverage {r.kind}@{r.rate:g} "
            f"({r.backend}) {c.compared}/{c.sent} = {c.share:.1%} compared (goal >= {goal:.0%})"
        )
        if r.kind == "triton":
            ok = r.recall == 1.0 and r.precision == 1.0
            found = len(r.planted & r.flagged)
            lines.append(
                f"{'PASS' if ok else 'FAIL'} {r.target}: planted divergences: recall "
                f"{_share(r.recall)} ({found} of {len(r.planted)} planted requests flagged), "
                f"precision {_share(r.precision)} ({found} of {len(r.flagged)} flagged were "
                "planted) (goal 1.0 and 1.0)"
            )
    return lines


def _share(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}" if v < 100 else f"{v:.0f}"
