"""Population statistics a canary gate can use, per (model, candidate, output, metric).

- Mergeable histograms of severity and of the headline score (DDSketch's log mapping, 1% relative
  accuracy) kept as integer counters per (cell, minute), so every process's counts add up
  in Redis and any window of minutes is merged exactly;
- the flagged rate with a Wilson score interval;
- paired tests on the *same requests* against the noise floor: McNemar on threshold flags
  (candidate flagged vs reference twin flagged) and a one-sided Wilcoxon signed-rank test on
  severities (does the candidate diverge more than the reference does from itself?).

Pure and single-owner (not thread-safe); the proxy calls it from its event loop and keeps the
counters in Redis (``proxy/buffer/population.py``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ddsketch.mapping import LogarithmicMapping

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


def two_proportion_p(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided p-value that two binomial rates differ (pooled z-test); 1.0 without data."""
    if n1 <= 0 or n2 <= 0:
        return 1.0
    pooled = (k1 + k2) / (n1 + n2)
    var = pooled * (1 - pooled) * (1 / n1 + 1 / n2)
    if var <= 0:
        return 1.0
    z = (k1 / n1 - k2 / n2) / math.sqrt(var)
    return math.erfc(abs(z) / math.sqrt(2))


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


# DDSketch's logarithmic mapping (1% relative accuracy): a value's bin is a pure function of the
# value, so bins counted anywhere (each process, each minute) add up to the sketch of the whole.
_MAPPING = LogarithmicMapping(0.01)


def _bin(x: float) -> int:
    return int(_MAPPING.key(min(max(x, _MAPPING.min_possible), _MAPPING.max_possible)))


class LogHistogram:
    """Counts of values in log-spaced bins, plus zeros and negatives; merged by adding counts.

    Its fields (``to_fields``) are plain integer counters, so Redis sums them with HINCRBY and a
    window of per-minute buckets read back is the histogram of the whole window, exactly.
    Quantiles are within 1% of a true order statistic (DDSketch's guarantee).
    """

    __slots__ = ("neg", "pos", "zeros")

    def __init__(self) -> None:
        self.pos: dict[int, int] = {}
        self.neg: dict[int, int] = {}
        self.zeros = 0

    def add(self, x: float, n: int = 1) -> None:
        if not math.isfinite(x):
            return
        if x > 0:
            k = _bin(x)
            self.pos[k] = self.pos.get(k, 0) + n
        elif x < 0:
            k = _bin(-x)
            self.neg[k] = self.neg.get(k, 0) + n
        else:
            self.zeros += n

    def merge(self, other: LogHistogram) -> None:
        for k, n in other.pos.items():
            self.pos[k] = self.pos.get(k, 0) + n
        for k, n in other.neg.items():
            self.neg[k] = self.neg.get(k, 0) + n
        self.zeros += other.zeros

    @property
    def count(self) -> int:
        return self.zeros + sum(self.pos.values()) + sum(self.neg.values())

    def ascending(self) -> Iterator[tuple[float, int]]:
        for k in sorted(self.neg, reverse=True):
            yield -float(_MAPPING.value(k)), self.neg[k]
        if self.zeros:
            yield 0.0, self.zeros
        for k in sorted(self.pos):
            yield float(_MAPPING.value(k)), self.pos[k]

    def quantile(self, q: float) -> float | None:
        """The value at rank ``q * (count - 1)`` (DDSketch's rule); None when empty."""
        total = self.count
        if total == 0:
            return None
        rank = q * (total - 1)
        seen = 0
        last = 0.0
        for value, n in self.ascending():
            seen += n
            last = value
            if seen > rank:
                return value
        return last

    def max(self) -> float | None:
        return self.quantile(1.0)

    def at_least(self, x: float) -> int:
        """How many values are >= ``x``, counting ``x``'s own bin as at least ``x``."""
        if x > 0:
            k = _bin(x)
            return sum(n for key, n in self.pos.items() if key >= k)
        above = sum(self.pos.values())
        if x == 0:
            return above + self.zeros
        k = _bin(-x)
        return above + self.zeros + sum(n for key, n in self.neg.items() if key <= k)

    def to_fields(self, prefix: str) -> dict[str, int]:
        fields = {f"{prefix}:{k}": n for k, n in self.pos.items()}
        fields.update({f"{prefix}-:{k}": n for k, n in self.neg.items()})
        if self.zeros:
            fields[f"{prefix}0"] = self.zeros
        return fields

    def add_field(self, prefix: str, name: str, n: int) -> bool:
        """Count one field written by ``to_fields``; False when ``name`` is not one of ours."""
        if name == f"{prefix}0":
            self.zeros += n
        elif name.startswith(f"{prefix}-:"):
            k = int(name[len(prefix) + 2 :])
            self.neg[k] = self.neg.get(k, 0) + n
        elif name.startswith(f"{prefix}:"):
            k = int(name[len(prefix) + 1 :])
            self.pos[k] = self.pos.get(k, 0) + n
        else:
            return False
        return True


def rank_test(a: LogHistogram, b: LogHistogram) -> dict[str, float | None]:
    """Mann-Whitney U on two histograms (values in one bin are ties), normal approximation with
    the tie correction: ``p`` two-sided, and ``prob_b_greater``, the chance that a value of
    ``b`` exceeds one of ``a`` (ties count half). None values without data on both sides."""
    n1, n2 = a.count, b.count
    if n1 == 0 or n2 == 0:
        return {"u": None, "p": None, "prob_b_greater": None}
    # Both histograms' bins in ascending order of value, walked together.
    bins: dict[float, list[int]] = {}
    for value, n in a.ascending():
        bins.setdefault(value, [0, 0])[0] += n
    for value, n in b.ascending():
        bins.setdefault(value, [0, 0])[1] += n
    below_a = 0
    u_b = 0.0  # pairs (a, b) with b > a, ties half
    ties = 0.0
    for value in sorted(bins):
        ca, cb = bins[value]
        u_b += cb * (below_a + 0.5 * ca)
        below_a += ca
        t = ca + cb
        ties += t**3 - t
    n = n1 + n2
    mean = n1 * n2 / 2
    var = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1))) if n > 1 else 0.0
    p = 1.0 if var <= 0 else math.erfc(abs(u_b - mean) / math.sqrt(2 * var))
    return {"u": u_b, "p": min(1.0, p), "prob_b_greater": u_b / (n1 * n2)}


@dataclass(frozen=True, slots=True)
class Cell:
    """What one row of population statistics is about. ``build`` is the candidate's build (the
    builds ledger); empty until builds are known."""

    model: str
    candidate: str
    output: str
    metric: str
    headline: str = ""
    build: str = ""

    @property
    def id(self) -> str:
        """A short stable id: the Redis hash tag of the cell's keys."""
        raw = json.dumps([self.model, self.candidate, self.output, self.metric, self.build])
        return hashlib.blake2b(raw.encode(), digest_size=8).hexdigest()

    def to_json(self) -> str:
        return json.dumps(
            {
                "model": self.model,
                "candidate": self.candidate,
                "output": self.output,
                "metric": self.metric,
                "headline": self.headline,
                "build": self.build,
            }
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> Cell:
        d = json.loads(raw)
        return cls(
            str(d["model"]),
            str(d["candidate"]),
            str(d["output"]),
            str(d["metric"]),
            str(d.get("headline", "")),
            str(d.get("build", "")),
        )


_COUNTERS = ("n", "flagged", "invalid", "pairs", "mc_b", "mc_c")
# Paired differences a cell keeps (the newest): the Wilcoxon reservoir's size, so statistics
# gathered while the store is away stay bounded.
PAIRS_KEPT = 4096
# The cell of whole copies (flagged when any output is, at its worst output's severity): per-copy
# rates for the builds ledger, left out of the per-output summary rows.
COPY_OUTPUT = "*"
COPY_METRIC = "copy"


@dataclass(slots=True)
class CellStats:
    """One cell's statistics over some span of time: counters and histograms that merge by
    addition, and the paired severity differences (minute, candidate - twin) for Wilcoxon."""

    n: int = 0
    flagged: int = 0
    invalid: int = 0
    pairs: int = 0
    mc_b: int = 0
    """Pairs where the candidate was flagged and the noise-floor twin was not."""
    mc_c: int = 0
    """Pairs where the twin was flagged and the candidate was not."""
    severity: LogHistogram = field(default_factory=LogHistogram)
    score: LogHistogram = field(default_factory=LogHistogram)
    diffs: list[tuple[int, float]] = field(default_factory=list)

    def record(self, verdict: OutputVerdict) -> None:
        self.n += 1
        self.flagged += int(verdict.flagged)
        if not verdict.valid:
            self.invalid += 1
            return
        self.severity.add(max(0.0, verdict.severity))
        if verdict.headline and verdict.headline in verdict.scores:
            self.score.add(float(verdict.scores[verdict.headline]))

    def record_pair(self, minute: int, ab: OutputVerdict, aa: OutputVerdict) -> None:
        if not (ab.valid and aa.valid):
            return
        self.pairs += 1
        self.mc_b += int(ab.flagged and not aa.flagged)
        self.mc_c += int(aa.flagged and not ab.flagged)
        diff = ab.severity - aa.severity
        if math.isfinite(diff):
            self.diffs.append((minute, diff))
            if len(self.diffs) > 2 * PAIRS_KEPT:  # amortized: trim in halves, not every append
                del self.diffs[:-PAIRS_KEPT]

    def merge(self, other: CellStats) -> None:
        for name in _COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.severity.merge(other.severity)
        self.score.merge(other.score)
        self.diffs.extend(other.diffs)
        if len(self.diffs) > PAIRS_KEPT:
            del self.diffs[:-PAIRS_KEPT]

    def counters(self) -> dict[str, int]:
        """Everything but the differences, as integer fields to add (HINCRBY)."""
        fields = {name: getattr(self, name) for name in _COUNTERS if getattr(self, name)}
        fields.update(self.severity.to_fields("s"))
        fields.update(self.score.to_fields("h"))
        return fields

    def add_counters(self, fields: Mapping[str, int]) -> None:
        """Add fields written by ``counters`` (unknown fields are ignored: a newer writer)."""
        for name, n in fields.items():
            if name in _COUNTERS:
                setattr(self, name, getattr(self, name) + n)
            elif not self.severity.add_field("s", name, n):
                self.score.add_field("h", name, n)


class PopulationStats:
    """Statistics gathered per (cell, minute) until they are taken to be stored (and merged with
    every other process's). Pure and single-owner (not thread-safe)."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[Cell, int], CellStats] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def _stats(self, cell: Cell, minute: int) -> CellStats:
        stats = self._buckets.get((cell, minute))
        if stats is None:
            stats = self._buckets[(cell, minute)] = CellStats()
        return stats

    def record(self, cell: Cell, minute: int, verdict: OutputVerdict) -> None:
        self._stats(cell, minute).record(verdict)

    def record_pair(self, cell: Cell, minute: int, ab: OutputVerdict, aa: OutputVerdict) -> None:
        self._stats(cell, minute).record_pair(minute, ab, aa)

    def take(self) -> dict[tuple[Cell, int], CellStats]:
        """Everything gathered, handed over (and forgotten here)."""
        taken, self._buckets = self._buckets, {}
        return taken

    def put_back(self, taken: Mapping[tuple[Cell, int], CellStats]) -> None:
        """Statistics that could not be stored, kept to try again."""
        for key, stats in taken.items():
            self._stats(*key).merge(stats)

    def drop_before(self, minute: int) -> int:
        """Forget buckets older than ``minute`` (kept past their retention while Redis was
        away); how many verdicts they held."""
        old = [key for key in self._buckets if key[1] < minute]
        return sum(self._buckets.pop(key).n for key in old)

    def by_cell(self) -> dict[Cell, CellStats]:
        """Each cell's statistics over every minute gathered."""
        out: dict[Cell, CellStats] = {}
        for (cell, _), stats in self._buckets.items():
            out.setdefault(cell, CellStats()).merge(stats)
        return out


QUANTILES = (0.5, 0.9, 0.99)


def _quantiles(h: LogHistogram) -> dict[str, float | None]:
    return {f"p{round(q * 100, 1):g}": h.quantile(q) for q in QUANTILES}


def summary_rows(cells: Mapping[Cell, CellStats], *, copies: bool = False) -> list[dict[str, Any]]:
    """One row per cell: counts, the flagged rate with its Wilson interval, severity and headline
    quantiles, and the paired tests against the noise-floor twin. ``copies``: the whole-copy
    cells too (``COPY_OUTPUT``)."""
    out = []
    ordered = sorted(cells.items(), key=lambda kv: (kv[0].model, kv[0].candidate, kv[0].output))
    for cell, c in ordered:
        if cell.output == COPY_OUTPUT and not copies:
            continue
        lo, hi = wilson_interval(c.flagged, c.n)
        diffs = [d for _, d in c.diffs]
        w_p, w_n = wilcoxon_greater_p(diffs)
        out.append(
            {
                "model": cell.model,
                "candidate": cell.candidate,
                "output": cell.output,
                "metric": cell.metric,
                "build": cell.build,
                "samples": c.n,
                "flagged": c.flagged,
                "invalid": c.invalid,
                "flagged_rate": c.flagged / c.n if c.n else None,
                "flagged_rate_ci95": [lo, hi],
                "severity": {**_quantiles(c.severity), "max": c.severity.max() or 0.0},
                "headline": {"name": cell.headline, **_quantiles(c.score)},
                "paired_vs_noise_floor": {
                    "pairs": c.pairs,
                    "mcnemar": {
                        "candidate_only": c.mc_b,
                        "twin_only": c.mc_c,
                        "p": mcnemar_p(c.mc_b, c.mc_c),
                    },
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
