"""Population statistics a canary gate can use, per (model, candidate, output, metric).

- Mergeable streaming quantiles of severity and of the headline score (DDSketch, 1% relative
  accuracy), so replicas can merge their sketches;
- the flagged rate with a Wilson score interval;
- paired tests on the *same requests* against the noise floor: McNemar on threshold flags
  (candidate flagged vs reference twin flagged) and a one-sided Wilcoxon signed-rank test on
  severities (does the candidate diverge more than the reference does from itself?).

Pure and single-owner (not thread-safe); the proxy calls it from its event loop.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from comparators.types import OutputVerdict

_Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial rate k/n (95% by default); (0, 1) when n = 0."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided McNemar p-value on discordant pairs b and c (exact binomial below 25 pairs)."""
    n = b + c
    if n == 0:
        return 1.0
    if n < 25:
        k = min(b, c)
        tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
        return min(1.0, 2 * tail)
    stat = (abs(b - c) - 1) ** 2 / n  # continuity-corrected chi-square, 1 dof
    return math.erfc(math.sqrt(stat / 2))


def wilcoxon_greater_p(diffs: Iterable[float]) -> tuple[float, int]:
    """One-sided Wilcoxon signed-rank p-value that the median difference is > 0.

    Zero differences are dropped (Wilcoxon's convention); ties get average ranks and the variance
    its tie correction; the normal approximation (with continuity correction) needs >= 10 pairs,
    below that the p-value is 1.0 ("not enough evidence"). Returns (p, pairs used).
    """
    d = np.asarray([x for x in diffs if x != 0.0 and math.isfinite(x)], dtype=np.float64)
    n = int(d.size)
    if n < 10:
        return 1.0, n
    absd = np.abs(d)
    order = np.argsort(absd, kind="mergesort")
    ranks = np.empty(n, dtype=np.float64)
    sorted_abs = absd[order]
    # Average ranks over runs of ties.
    _, first, counts = np.unique(sorted_abs, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    w_plus = float(ranks[d > 0].sum())
    mean = n * (n + 1) / 4.0
    var = n * (n + 1) * (2 * n + 1) / 24.0 - float((counts**3 - counts).sum()) / 48.0
    if var <= 0:
        return 1.0, n
    z = (w_plus - mean - 0.5) / math.sqrt(var)
    return 0.5 * math.erfc(z / math.sqrt(2)), n


def _sketch() -> Any:
    from ddsketch import DDSketch  # a well-kept, mergeable sketch; imported lazily (optional dep)

    return DDSketch(relative_accuracy=0.01)


def _quantiles(sketch: Any, qs: Iterable[float]) -> dict[str, float | None]:
    if sketch.count == 0:
        return {f"p{round(q * 100, 1):g}": None for q in qs}
    return {f"p{round(q * 100, 1):g}": float(sketch.get_quantile_value(q)) for q in qs}


@dataclass
class _Cell:
    metric: str
    headline: str
    severity: Any = field(default_factory=_sketch)
    score: Any = field(default_factory=_sketch)
    n: int = 0
    flagged: int = 0
    invalid: int = 0
    max_severity: float = 0.0
    pairs: deque[tuple[float, float, bool, bool]] = field(
        default_factory=lambda: deque(maxlen=4096)
    )


class PopulationStats:
    """Accumulates verdicts per (model, candidate, output); one metric per cell (the first seen)."""

    QUANTILES = (0.5, 0.9, 0.99)

    def __init__(self) -> None:
        self._cells: dict[tuple[str, str, str], _Cell] = {}

    def _cell(self, model: str, candidate: str, v: OutputVerdict) -> _Cell:
        key = (model, candidate, v.output)
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = _Cell(metric=v.metric, headline=v.headline)
        return cell

    def record(self, model: str, candidate: str, verdict: OutputVerdict) -> None:
        cell = self._cell(model, candidate, verdict)
        cell.n += 1
        cell.flagged += int(verdict.flagged)
        if not verdict.valid:
            cell.invalid += 1
            return
        cell.severity.add(max(0.0, verdict.severity))
        cell.max_severity = max(cell.max_severity, verdict.severity)
        if verdict.headline and verdict.headline in verdict.scores:
            value = float(verdict.scores[verdict.headline])
            if math.isfinite(value):
                cell.score.add(value)

    def record_pair(self, model: str, candidate: str, ab: OutputVerdict, aa: OutputVerdict) -> None:
        """The candidate's and the reference twin's verdicts on the same request and output."""
        if ab.valid and aa.valid:
            cell = self._cell(model, candidate, ab)
            cell.pairs.append((ab.severity, aa.severity, ab.flagged, aa.flagged))

    def merge(self, other: PopulationStats) -> None:
        """Fold another replica's statistics into these (sketches merge exactly)."""
        for key, theirs in other._cells.items():
            mine = self._cells.setdefault(key, _Cell(theirs.metric, theirs.headline))
            mine.severity.merge(theirs.severity)
            mine.score.merge(theirs.score)
            mine.n += theirs.n
            mine.flagged += theirs.flagged
            mine.invalid += theirs.invalid
            mine.max_severity = max(mine.max_severity, theirs.max_severity)
            mine.pairs.extend(theirs.pairs)

    def summary(self) -> list[dict[str, Any]]:
        out = []
        for (model, candidate, output), c in sorted(self._cells.items()):
            lo, hi = wilson_interval(c.flagged, c.n)
            b = sum(1 for _, _, fab, faa in c.pairs if fab and not faa)
            cc = sum(1 for _, _, fab, faa in c.pairs if faa and not fab)
            w_p, w_n = wilcoxon_greater_p(ab - aa for ab, aa, _, _ in c.pairs)
            diffs = [ab - aa for ab, aa, _, _ in c.pairs]
            out.append(
                {
                    "model": model,
                    "candidate": candidate,
                    "output": output,
                    "metric": c.metric,
                    "samples": c.n,
                    "flagged": c.flagged,
                    "invalid": c.invalid,
                    "flagged_rate": c.flagged / c.n if c.n else None,
                    "flagged_rate_ci95": [lo, hi],
                    "severity": {**_quantiles(c.severity, self.QUANTILES), "max": c.max_severity},
                    "headline": {"name": c.headline, **_quantiles(c.score, self.QUANTILES)},
                    "paired_vs_noise_floor": {
                        "pairs": len(c.pairs),
                        "mcnemar": {"candidate_only": b, "twin_only": cc, "p": mcnemar_p(b, cc)},
                        "wilcoxon_greater": {"p": w_p, "nonzero_pairs": w_n},
                        "median_severity_diff": float(np.median(diffs)) if diffs else None,
                    },
                }
            )
        return out


class PairBuffer:
    """Matches each candidate's verdicts with the reference twin's on the same request.

    Bounded: the oldest requests are forgotten first (a twin that never answers leaves nothing
    behind for long). Keys are any hashable request identity the caller chooses.
    """

    def __init__(self, capacity: int = 8192) -> None:
        self._capacity = capacity
        self._twin: OrderedDict[Hashable, Mapping[str, OutputVerdict]] = OrderedDict()
        self._waiting: OrderedDict[Hashable, list[tuple[str, Mapping[str, OutputVerdict]]]] = (
            OrderedDict()
        )

    def _bound(self, d: OrderedDict[Hashable, Any]) -> None:
        while len(d) > self._capacity:
            d.popitem(last=False)

    def add_twin(
        self, request: Hashable, verdicts: Iterable[OutputVerdict]
    ) -> list[tuple[str, OutputVerdict, OutputVerdict]]:
        """Record the twin's verdicts; returns (candidate, ab, aa) pairs now complete."""
        by_output = {v.output: v for v in verdicts}
        self._twin[request] = by_output
        self._bound(self._twin)
        pairs = []
        for candidate, ab in self._waiting.pop(request, []):
            pairs += [(candidate, v, by_output[o]) for o, v in ab.items() if o in by_output]
        return pairs

    def add_candidate(
        self, request: Hashable, candidate: str, verdicts: Iterable[OutputVerdict]
    ) -> list[tuple[str, OutputVerdict, OutputVerdict]]:
        by_output = {v.output: v for v in verdicts}
        twin = self._twin.get(request)
        if twin is None:
            self._waiting.setdefault(request, []).append((candidate, by_output))
            self._bound(self._waiting)
            return []
        return [(candidate, v, twin[o]) for o, v in by_output.items() if o in twin]
