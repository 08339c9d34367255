"""The noise floor: how far two instances of the *same* reference diverge (A/A), per output.

A second reference instance sees a share of the same traffic as the candidates. Its verdicts
(A/A) form an empirical null distribution of severity for each (model, output): a histogram with
1% relative accuracy (``LogHistogram``), over the last ``noise.window_min`` minutes as every
process wrote it to Redis, plus what this process saw since. Each candidate
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

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

from comparators.population import LogHistogram
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

    def __post_init__(self) -> None:
        if not 0.0 < self.quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {self.quantile}")
        if self.margin < 1.0:
            raise ValueError(f"margin must be >= 1, got {self.margin}")
        if self.min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {self.min_samples}")


@dataclass(frozen=True, slots=True)
class NoiseAssessment:
    samples: int
    """A/A verdicts behind this assessment (0: no floor yet)."""
    p_value: float
    """Share of A/A severities at least as large, (1 + k) / (1 + N); 1.0 with no floor."""
    floor: float
    """The A/A severity at the policy's quantile (0.0 with no floor)."""
    beyond: bool


class NoiseFloor:
    """A/A severity histograms per key (typically (model, output)); one owner, not thread-safe.

    Three parts: ``merged``, the window every process wrote (read back from the shared store);
    what this process handed over to be stored since that read (``take_local``), and what it
    observed since. Judging uses all three, so a floor builds up at once in one process, counts
    each observation once, and is the same in every process once the store has it.
    """

    def __init__(self, policy: NoisePolicy | None = None) -> None:
        self.policy = policy or NoisePolicy()
        self._merged: dict[Hashable, LogHistogram] = {}
        self._handed: list[dict[Hashable, LogHistogram]] = []
        self._local: dict[Hashable, LogHistogram] = {}

    def observe(self, key: Hashable, verdict: OutputVerdict) -> None:
        """Record an A/A verdict. Invalid ones are not noise (they are bugs) and are skipped."""
        if verdict.valid:
            self._local.setdefault(key, LogHistogram()).add(max(0.0, verdict.severity))

    def take_local(self) -> dict[Hashable, LogHistogram]:
        """The observations made here since the last call, handed over to be stored (still
        counted here until ``set_merged`` brings the store's view of them)."""
        taken, self._local = self._local, {}
        if taken:
            self._handed.append(taken)
        return taken

    def put_back_local(self, taken: dict[Hashable, LogHistogram]) -> None:
        """Observations that could not be stored: still this process's own."""
        self._handed = [h for h in self._handed if h is not taken]
        for key, h in taken.items():
            self._local.setdefault(key, LogHistogram()).merge(h)

    def set_merged(self, merged: Mapping[Hashable, LogHistogram]) -> None:
        """The window as the store has it, read after everything handed over was stored."""
        self._merged = dict(merged)
        self._handed = []

    def _histogram(self, key: Hashable) -> LogHistogram | None:
        parts = [
            h
            for h in (
                self._merged.get(key),
                *(d.get(key) for d in self._handed),
                self._local.get(key),
            )
            if h is not None
        ]
        if len(parts) <= 1:
            return parts[0] if parts else None
        both = LogHistogram()
        for h in parts:
            both.merge(h)
        return both

    def samples(self, key: Hashable) -> int:
        h = self._histogram(key)
        return h.count if h is not None else 0

    def assess(self, key: Hashable, severity: float) -> NoiseAssessment:
        h = self._histogram(key)
        n = h.count if h is not None else 0
        if h is None or n < self.policy.min_samples:
            return NoiseAssessment(n, 1.0, 0.0, beyond=False)
        floor = h.quantile(self.policy.quantile) or 0.0
        p = (1 + h.at_least(severity)) / (1 + n)
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
