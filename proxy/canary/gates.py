"""The canary's gates: pure functions from one step's evidence to pass / fail / wait.

Evidence is a flat map of counters (what every replica adds to the step's Redis hash), so it merges
by addition. Each gate reports the measured value next to its threshold, and the rule it applied:

- a rate gate (flagged rate, candidate error rate) is a **sequential test** whose error rates hold
  however often it is evaluated (the gates look every ``interval_s``, as many times as a step
  takes): two mixture likelihood ratios against the limit ``L`` (``sequential_evidence``), each
  a nonnegative martingale under its null, so by Ville's inequality it ever reaches
  ``1 / (1 - confidence)`` with probability at most ``1 - confidence``. The gate **fails** when
  the evidence that the rate is above ``L`` reaches that bound, **passes** once the step has
  ``min_samples`` and the evidence that it is below ``L`` reaches it, and otherwise **waits**.
  With the true rate at twice the limit it fails after about
  ``(ln(1/(1-confidence)) + ln(RATE_GRID)) / KL(2L || L)`` compared requests on average (about
  300 at a 5% limit and 95% confidence; ``loadtest/canary_sim.py`` measures it);
- the latency gate compares p99s of the same requests once there are ``min_samples`` of them;
- the paired gate (where a noise-floor twin answered the same requests) runs a one-sided McNemar
  test: is the candidate flagged more often than the reference is against itself?
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from statistics import NormalDist
from typing import Any, Literal

from ..settings import CanaryGates

Status = Literal["pass", "fail", "wait", "skip"]

# Latency histogram: log buckets 2% wide from 1 us, so p99 is known to within 2% and the buckets
# of many replicas add up exactly.
_LAT_BASE_MS = 0.001
_LAT_GAMMA = 1.02
_LOG_GAMMA = math.log(_LAT_GAMMA)
# Alternatives the rate gates' mixtures spread their weight over, on each side of the limit.
RATE_GRID = 24
# A tail quantile needs this many samples beyond it to be more than the largest few values.
_TAIL_SAMPLES = 10

# Counter names in a step's evidence hash.
COMPARED = "compared"
FLAGGED = "flagged"
CAND_CALLS = "cand_calls"
CAND_ERRORS = "cand_errors"
REF_CALLS = "ref_calls"
REF_ERRORS = "ref_errors"
PAIRS = "pairs"
PAIRS_CAND_ONLY = "pairs_cand_only"  # candidate flagged, twin not (McNemar's b)
PAIRS_TWIN_ONLY = "pairs_twin_only"  # twin flagged, candidate not (McNemar's c)
SERVED_CAND = "served_cand"
SERVED_REF = "served_ref"
FALLBACKS = "fallbacks"
UNCOMPARED = "uncompared"  # canary answers whose reverse copy was dropped (overload, bounds)
LAT_REF = "lat_ref"  # paired: both sides' timings of the same compared request
LAT_CAND = "lat_cand"
LAT_PAIRS = "lat_pairs"  # compared requests timed on both sides
LAT_EXCEED = "lat_exceed"  # ... where the candidate took longer than ratio x reference + slack
# The paired latency gate's limit: the share of requests allowed over their own bound (the p99
# statement "at most 1 in 100 slower than allowed", made on the same requests).
LATENCY_EXCEED_LIMIT = 0.01
LIVE_LAT_REF = "live_lat_ref"  # live answers, timed by the live process
LIVE_LAT_CAND = "live_lat_cand"
TTFT_REF = "ttft_ref"  # LLM calls: time to first token of both sides of a compared request
TTFT_CAND = "ttft_cand"
SEMANTIC = "sem"  # LLM calls: the answers' embedding cosine, in buckets of 0.001 below 1
_SEM_BUCKETS = 2000


def semantic_field(cosine: float) -> str:
    """The histogram bucket field for one cosine similarity (1 - cosine in steps of 0.001)."""
    bucket = min(_SEM_BUCKETS, max(0, math.floor((1.0 - cosine) * 1000.0)))
    return f"{SEMANTIC}:{bucket}"


def semantic_quantile(evidence: Mapping[str, int], q: float) -> tuple[float | None, int]:
    """(the ``q`` quantile of the cosine, samples): low quantiles are the dissimilar answers."""
    prefix = SEMANTIC + ":"
    buckets = sorted(
        ((int(k[len(prefix) :]), n) for k, n in evidence.items() if k.startswith(prefix)),
        reverse=True,  # most dissimilar first: the q quantile of cosine from below
    )
    total = sum(n for _, n in buckets)
    if not total:
        return None, 0
    seen = 0
    for bucket, n in buckets:
        seen += n
        if seen >= q * total:
            return 1.0 - bucket / 1000.0, total
    return 1.0 - buckets[-1][0] / 1000.0, total


def latency_field(side: str, seconds: float) -> str:
    """The histogram bucket field for one latency (``side`` is ``LAT_REF`` or ``LAT_CAND``)."""
    ms = seconds * 1000.0
    bucket = 0 if ms <= _LAT_BASE_MS else math.ceil(math.log(ms / _LAT_BASE_MS) / _LOG_GAMMA)
    return f"{side}:{bucket}"


def latency_quantile(evidence: Mapping[str, int], side: str, q: float) -> tuple[float | None, int]:
    """(quantile in ms, samples) of one side's latency histogram; None without samples."""
    prefix = side + ":"
    buckets = sorted(
        (int(k[len(prefix) :]), n) for k, n in evidence.items() if k.startswith(prefix)
    )
    total = sum(n for _, n in buckets)
    if not total:
        return None, 0
    rank = q * total
    seen = 0
    for bucket, n in buckets:
        seen += n
        if seen >= rank:
            return _LAT_BASE_MS * _LAT_GAMMA**bucket, total
    return _LAT_BASE_MS * _LAT_GAMMA ** buckets[-1][0], total


@dataclass(frozen=True, slots=True)
class GateResult:
    gate: str
    status: Status
    value: float | None
    threshold: float | None
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Evaluation:
    status: Status
    gates: list[GateResult]

    @property
    def failed(self) -> list[GateResult]:
        return [g for g in self.gates if g.status == "fail"]

    @property
    def waiting(self) -> list[GateResult]:
        return [g for g in self.gates if g.status == "wait"]

    def summary(self) -> str:
        """One line: what failed, or what it waits for, or that every gate passed."""
        if self.failed:
            return "; ".join(f"{g.gate}: {g.detail}" for g in self.failed)
        if self.waiting:
            return "waiting: " + "; ".join(f"{g.gate}: {g.detail}" for g in self.waiting)
        return "every gate passed"

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "gates": [g.to_dict() for g in self.gates]}


def _grid(limit: float, above: bool) -> list[float]:
    """The alternatives: geometric steps away from the limit, from 1% of the way to 99%."""
    steps = [10 ** (-2 + 2 * (j + 0.5) / RATE_GRID) * 0.99 for j in range(RATE_GRID)]
    if above:
        return [limit + (1 - limit) * s for s in steps]
    return [limit * (1 - s) for s in steps]


def _log_mixture(k: int, n: int, limit: float, thetas: list[float]) -> float:
    # log of the mean over the alternatives of theta^k (1-theta)^(n-k) / (L^k (1-L)^(n-k)).
    terms = [k * math.log(t / limit) + (n - k) * math.log((1 - t) / (1 - limit)) for t in thetas]
    top = max(terms)
    return top + math.log(sum(math.exp(t - top) for t in terms) / len(terms))


def sequential_evidence(k: int, n: int, limit: float) -> tuple[float, float]:
    """(evidence the rate is above ``limit``, evidence it is below), as likelihood ratios of a
    uniform mixture of ``RATE_GRID`` alternatives on that side against the limit itself.

    Each is a nonnegative supermartingale while the true rate is on the other side of the limit
    (or at it), whatever the number of looks: one mixture component's expected factor per
    sample is ``p t/L + (1-p)(1-t)/(1-L) <= 1`` for ``p`` on the null side. So the chance that
    it ever reaches ``1/alpha`` is at most ``alpha`` (Ville's inequality)."""
    if n <= 0:
        return 1.0, 1.0
    if limit <= 0.0:  # nothing may fail: one event is proof
        return (math.inf if k else 1.0), 1.0
    if limit >= 1.0:  # everything may fail: nothing is ever above
        return 1.0, math.inf
    up = _log_mixture(k, n, limit, _grid(limit, above=True))
    down = _log_mixture(k, n, limit, _grid(limit, above=False))
    return math.exp(min(up, 700.0)), math.exp(min(down, 700.0))


def _rate_gate(
    gate: str, k: int, n: int, limit: float, min_samples: int, confidence: float, what: str
) -> GateResult:
    if n == 0:
        return GateResult(gate, "wait", None, limit, f"no {what} yet (0/{min_samples})")
    bound = 1.0 / (1.0 - confidence)
    above, below = sequential_evidence(k, n, limit)
    rate = k / n
    shown = (
        f"{k}/{n} = {rate:.2%}, limit {limit:.2%}; sequential evidence above {_fmt(above)}, "
        f"below {_fmt(below)} (decides at {bound:.3g})"
    )
    if above >= bound:
        return GateResult(gate, "fail", rate, limit, f"{shown}: above the limit")
    if n < min_samples:
        return GateResult(gate, "wait", rate, limit, f"{shown}: {n}/{min_samples} {what}")
    if below >= bound:
        return GateResult(gate, "pass", rate, limit, shown)
    return GateResult(gate, "wait", rate, limit, f"{shown}: inconclusive, needs more {what}")


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.3g}"


def mcnemar_greater_p(b: int, c: int) -> float:
    """One-sided exact McNemar p-value that discordance ``b`` outnumbers ``c``."""
    n = b + c
    if n == 0 or b <= c:
        return 1.0
    if n > 1000:  # normal approximation with continuity correction
        z = (b - c - 1) / math.sqrt(n)
        return 1.0 - NormalDist().cdf(z)
    return sum(math.comb(n, i) for i in range(b, n + 1)) / 2.0**n


def evaluate(
    evidence: Mapping[str, int],
    gates: CanaryGates,
    *,
    min_samples: int,
    elapsed_s: float,
    min_duration_s: float,
    has_twin: bool,
    weight: float = 0.0,
) -> Evaluation:
    """Judge one step's evidence. Fail beats wait beats pass."""
    n = evidence.get(COMPARED, 0)
    results = [
        GateResult(
            "samples",
            "pass" if n >= min_samples else "wait",
            float(n),
            float(min_samples),
            f"{n}/{min_samples} compared requests",
        ),
        GateResult(
            "duration",
            "pass" if elapsed_s >= min_duration_s else "wait",
            round(elapsed_s, 1),
            min_duration_s,
            f"{elapsed_s:.0f}/{min_duration_s:.0f} s at this step",
        ),
        _rate_gate(
            "flagged_rate",
            evidence.get(FLAGGED, 0),
            n,
            gates.max_flagged_rate,
            min_samples,
            gates.confidence,
            "compared requests",
        ),
    ]
    ref_calls = evidence.get(REF_CALLS, 0)
    ref_rate = evidence.get(REF_ERRORS, 0) / ref_calls if ref_calls else 0.0
    results.append(
        _rate_gate(
            "error_rate",
            evidence.get(CAND_ERRORS, 0),
            evidence.get(CAND_CALLS, 0),
            min(1.0, ref_rate + gates.max_error_rate_increase),
            min_samples,
            gates.confidence,
            "candidate answers",
        )
    )
    results.append(_latency_gate(evidence, gates, min_samples))
    results.append(_ttft_gate(evidence, gates, min_samples))
    results.append(_semantic_gate(evidence, gates, min_samples))
    results.append(_paired_gate(evidence, gates, has_twin, weight))
    statuses = {r.status for r in results}
    status: Status = "fail" if "fail" in statuses else "wait" if "wait" in statuses else "pass"
    return Evaluation(status, results)


def _latency_gate(evidence: Mapping[str, int], gates: CanaryGates, min_samples: int) -> GateResult:
    pairs = evidence.get(LAT_PAIRS, 0)
    if pairs >= min_samples:
        return _paired_latency_gate(evidence.get(LAT_EXCEED, 0), pairs, gates, min_samples)
    why = f"only {pairs}/{min_samples} requests timed on both sides, so unpaired quantiles"
    result = _unpaired_latency_gate(evidence, gates, min_samples)
    return replace(result, detail=f"{result.detail} [{why}]")


def _paired_latency_gate(k: int, n: int, gates: CanaryGates, min_samples: int) -> GateResult:
    """On the same requests: the share where the candidate took longer than
    ``ratio x the reference's time + slack``. It fails by the sequential test (evidence that
    more than 1% are over their bound reaches ``1 / (1 - confidence)``, so a sound candidate
    is rolled back at most that often however many looks); it passes, as the unpaired p99 did,
    once ``min_samples`` pairs show at most 1% over."""
    bound = 1.0 / (1.0 - gates.confidence)
    above, _ = sequential_evidence(k, n, LATENCY_EXCEED_LIMIT)
    rate = k / n
    shown = (
        f"paired: {k} of {n} requests answered slower than "
        f"{gates.max_latency_p99_ratio:g}x the reference's time on the same request + "
        f"{gates.latency_slack_ms:g} ms ({rate:.2%}; at most {LATENCY_EXCEED_LIMIT:.0%} may be; "
        f"evidence above {_fmt(above)}, fails at {bound:.3g})"
    )
    if above >= bound:
        return GateResult("latency_p99", "fail", rate, LATENCY_EXCEED_LIMIT, shown)
    if rate <= LATENCY_EXCEED_LIMIT:
        return GateResult("latency_p99", "pass", rate, LATENCY_EXCEED_LIMIT, shown)
    return GateResult(
        "latency_p99", "wait", rate, LATENCY_EXCEED_LIMIT, f"{shown}: inconclusive, needs more"
    )


def _unpaired_latency_gate(
    evidence: Mapping[str, int], gates: CanaryGates, min_samples: int
) -> GateResult:
    # Live answers of each side, timed alike by the live process, are the fair comparison; at
    # low weights (or at 100%) one side has too few, and the paired timings of compared requests
    # stand in: those are taken by the mirror worker, which runs at low CPU priority, so on a
    # busy host they are slower for whichever side was the shadow.
    sides = (LIVE_LAT_REF, LIVE_LAT_CAND)
    source = "live answers"
    n = min(latency_quantile(evidence, side, 0.5)[1] for side in sides)
    if n < min_samples:
        sides, source = (LAT_REF, LAT_CAND), "timed pairs"
        n = min(latency_quantile(evidence, side, 0.5)[1] for side in sides)
    if n < min_samples:
        return GateResult("latency_p99", "wait", None, None, f"{n}/{min_samples} timed answers")
    # p99 when there are enough samples for it; below 1,000 the highest quantile that still has
    # ten samples beyond it (p95 at 200), so one or two outliers do not decide the step.
    q = min(0.99, 1.0 - _TAIL_SAMPLES / n)
    ref_q, _ = latency_quantile(evidence, sides[0], q)
    cand_q, _ = latency_quantile(evidence, sides[1], q)
    assert ref_q is not None and cand_q is not None
    name = f"p{q * 100:.3g}"
    limit = gates.max_latency_p99_ratio * ref_q + gates.latency_slack_ms
    shown = (
        f"candidate {name} {cand_q:.1f} ms vs reference {name} {ref_q:.1f} ms ({source}, {n}), "
        f"limit {limit:.1f} ms ({gates.max_latency_p99_ratio:g}x + {gates.latency_slack_ms:g} ms)"
    )
    cand_p99 = cand_q
    status: Status = "pass" if cand_p99 <= limit else "fail"
    return GateResult("latency_p99", status, round(cand_p99, 3), round(limit, 3), shown)


def _ttft_gate(evidence: Mapping[str, int], gates: CanaryGates, min_samples: int) -> GateResult:
    n = min(latency_quantile(evidence, side, 0.5)[1] for side in (TTFT_REF, TTFT_CAND))
    if n == 0:
        return GateResult("ttft", "skip", None, None, "no compared answer carried tokens")
    if n < min_samples:
        return GateResult("ttft", "wait", None, None, f"{n}/{min_samples} timed first tokens")
    q = min(0.99, 1.0 - _TAIL_SAMPLES / n)
    ref_q, _ = latency_quantile(evidence, TTFT_REF, q)
    cand_q, _ = latency_quantile(evidence, TTFT_CAND, q)
    assert ref_q is not None and cand_q is not None
    limit = gates.max_ttft_ratio * ref_q + gates.ttft_slack_ms
    name = f"p{q * 100:.3g}"
    shown = (
        f"candidate time to first token {name} {cand_q:.1f} ms vs reference {ref_q:.1f} ms "
        f"({n} pairs), limit {limit:.1f} ms "
        f"({gates.max_ttft_ratio:g}x + {gates.ttft_slack_ms:g} ms)"
    )
    status: Status = "pass" if cand_q <= limit else "fail"
    return GateResult("ttft", status, round(cand_q, 3), round(limit, 3), shown)


def _semantic_gate(evidence: Mapping[str, int], gates: CanaryGates, min_samples: int) -> GateResult:
    floor = gates.min_semantic_similarity
    if floor is None:
        return GateResult("semantic", "skip", None, None, "no min_semantic_similarity set")
    q = gates.semantic_quantile
    value, n = semantic_quantile(evidence, q)
    if value is None or n < min_samples:
        return GateResult("semantic", "wait", value, floor, f"{n}/{min_samples} semantic scores")
    shown = (
        f"cosine of the answers' embeddings at the {q:.0%} quantile {value:.3f} over {n}, "
        f"floor {floor:g}"
    )
    return GateResult("semantic", "pass" if value >= floor else "fail", value, floor, shown)


def _paired_gate(
    evidence: Mapping[str, int], gates: CanaryGates, has_twin: bool, weight: float
) -> GateResult:
    pairs = evidence.get(PAIRS, 0)
    if not has_twin:
        return GateResult("paired_vs_noise", "skip", None, None, "no noise-floor twin configured")
    if weight >= 100 and pairs < gates.min_pairs:
        # The twin answers copies of reference-served requests; at 100% there are none.
        return GateResult(
            "paired_vs_noise", "skip", None, None, "at 100% the twin sees no requests"
        )
    if pairs < gates.min_pairs:
        return GateResult(
            "paired_vs_noise",
            "wait",
            None,
            gates.paired_alpha,
            f"{pairs}/{gates.min_pairs} outputs answered by both the candidate and the twin",
        )
    b, c = evidence.get(PAIRS_CAND_ONLY, 0), evidence.get(PAIRS_TWIN_ONLY, 0)
    p = mcnemar_greater_p(b, c)
    shown = (
        f"McNemar on {pairs} paired outputs: candidate alone flagged {b}, twin alone {c}, "
        f"p = {p:.3g} (fails below {gates.paired_alpha:g})"
    )
    return GateResult(
        "paired_vs_noise",
        "fail" if p < gates.paired_alpha else "pass",
        p,
        gates.paired_alpha,
        shown,
    )
