"""The noise floor: how far two instances of the *same* reference diverge (A/A), per output.

A second reference instance sees a share of the same traffic as the candidates. Its verdicts
(A/A) form an empirical null distribution of severity for each (model, output). Each candidate
verdict (A/B) is then placed in that distribution: an empirical p-value
``(1 + #{A/A >= x}) / (1 + N)`` and the quantile it reaches. A verdict is *beyond noise* when its
severity exceeds ``margin`` times the A/A ``quantile`` (a ratio rule: a candidate whose only
difference is noise of the same distribution essentially never exceeds 1.5x the A/A p99, while a
real divergence does, even a small one where the reference is deterministic).

Flagging combines the comparator's own threshold with this rule (``NoisePolicy.mode``):
``threshold_and_noise`` (default) flags when both fire, or on the threshold alone while no noise
floor exists yet; ``threshold_only`` ignores the noise floor; ``noise_only`` flags on the noise
rule alone once a floor exists. Invalid verdicts (NaN, shape...) are always flagged.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, replace
from typing import Literal

from comparators.types import OutputVerdict

NoiseMode = Literal["threshold_and_noise", "threshold_only", "noise_only"]


@dataclass(frozen=True, slots=True)
class NoisePolicy:
    mode: NoiseMode = "threshold_and_noise"
    quantile: float = 0.99
    """The A/A quantile that bounds noise."""
    margin: float = 1.5
    """Beyond noise means severity > margin x that quantile (and > 0)."""
    min_samples: int = 30
    """A/A verdicts needed before the floor is used."""
    window: int = 4096
    """A/A verdicts kept per (model, output): the most recent ones."""

    def __post_init__(self) -> None:
        if not 0.0 < self.quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {self.quantile}")
        if self.margin < 1.0:
            raise ValueError(f"margin must be >= 1, got {self.margin}")
        if self.min_samples < 1 or self.window < self.min_samples:
            raise ValueError("need 1 <= min_samples <= window")


@dataclass(frozen=True, slots=True)
class NoiseAssessment:
    samples: int
    """A/A verdicts behind this assessment (0: no floor yet)."""
    p_value: float
    """Share of A/A severities at least as large, (1 + k) / (1 + N); 1.0 with no floor."""
    floor: float
    """The A/A severity at the policy's quantile (0.0 with no floor)."""
    beyond: bool


class _Window:
    """The last ``size`` values, also kept sorted for O(log n) rank queries."""

    def __init__(self, size: int) -> None:
        self._fifo: deque[float] = deque()
        self._sorted: list[float] = []
        self._size = size

    def add(self, x: float) -> None:
        self._fifo.append(x)
        bisect.insort(self._sorted, x)
        if len(self._fifo) > self._size:
            old = self._fifo.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]

    def __len__(self) -> int:
        return len(self._sorted)

    def at_least(self, x: float) -> int:
        return len(self._sorted) - bisect.bisect_left(self._sorted, x)

    def quantile(self, q: float) -> float:
        # Nearest-rank: an actual observed severity, never an interpolation above the data.
        idx = min(len(self._sorted) - 1, max(0, int(q * len(self._sorted) + 0.5) - 1))
        return self._sorted[idx]


class NoiseFloor:
    """A/A severities per key (typically (model, output)); not thread-safe: one owner."""

    def __init__(self, policy: NoisePolicy | None = None) -> None:
        self.policy = policy or NoisePolicy()
        self._windows: dict[Hashable, _Window] = {}

    def observe(self, key: Hashable, verdict: OutputVerdict) -> None:
        """Record an A/A verdict. Invalid ones are not noise (they are bugs) and are skipped."""
        if verdict.valid:
            self._windows.setdefault(key, _Window(self.policy.window)).add(verdict.severity)

    def samples(self, key: Hashable) -> int:
        w = self._windows.get(key)
        return len(w) if w is not None else 0

    def assess(self, key: Hashable, severity: float) -> NoiseAssessment:
        w = self._windows.get(key)
        n = len(w) if w is not None else 0
        if w is None or n < self.policy.min_samples:
            return NoiseAssessment(n, 1.0, 0.0, beyond=False)
        floor = w.quantile(self.policy.quantile)
        p = (1 + w.at_least(severity)) / (1 + n)
        return NoiseAssessment(
            n, p, floor, beyond=severity > 0 and severity > self.policy.margin * floor
        )

    def judge(self, key: Hashable, verdict: OutputVerdict) -> tuple[OutputVerdict, NoiseAssessment]:
        """Re-decide ``verdict.flagged`` against the noise floor; adds the noise scores."""
        a = self.assess(key, verdict.severity)
        if not verdict.valid:
            return verdict, a
        has_floor = a.samples >= self.policy.min_samples
        mode = self.policy.mode
        if mode == "threshold_only" or not has_floor:
            flagged = verdict.flagged
        elif mode == "noise_only":
            flagged = a.beyond
        else:
            flagged = verdict.flagged and a.beyond
        reason = verdict.reason
        if has_floor and mode != "threshold_only":
            where = f"A/A p={a.p_value:.3g} over {a.samples} (floor {a.floor:.3g})"
            if flagged:
                reason = f"{reason}; beyond the noise floor, {where}" if reason else where
            elif verdict.flagged:
                reason = ""  # the threshold fired, but within what the reference does to itself
        scores = dict(verdict.scores)
        scores.update(
            {"noise_p": a.p_value, "noise_floor": a.floor, "noise_samples": float(a.samples)}
        )
        return replace(verdict, flagged=flagged, reason=reason, scores=scores), a
