"""The judge: turns raw comparator verdicts into noise-aware ones and keeps population statistics.

Verdicts from a ``noise_floor`` candidate (a second reference instance) feed the A/A noise floor;
every other candidate's verdicts are re-decided against it (``noise`` settings) before they are
counted, stored and shown. The same request's candidate and twin verdicts are paired for the
population's paired tests. One owner (the app); called only from the event loop thread.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation

from comparators import OutputVerdict
from comparators.noise import NoiseFloor, NoisePolicy
from comparators.population import PairBuffer, PopulationStats

from ..settings import CandidateSettings, NoiseSettings

Pair = tuple[str, OutputVerdict, OutputVerdict]


class Judge:
    def __init__(self, settings: NoiseSettings) -> None:
        self.noise = NoiseFloor(
            NoisePolicy(
                mode=settings.mode,
                quantile=settings.quantile,
                margin=settings.margin,
                min_samples=settings.min_samples,
                window=settings.window,
            )
        )
        self.population = PopulationStats()
        self._pairs = PairBuffer()

    def judge(
        self,
        cand: CandidateSettings,
        model: str,
        request_seq: int,
        verdicts: Sequence[OutputVerdict],
    ) -> tuple[list[OutputVerdict], list[Pair]]:
        """The verdicts to act on (twin verdicts unchanged, candidate verdicts noise-judged), and
        the (candidate, candidate verdict, twin verdict) pairs this request completed."""
        if cand.noise_floor:
            for v in verdicts:
                self.noise.observe((model, v.output), v)
            pairs = self._pairs.add_twin(request_seq, verdicts)
            judged = list(verdicts)
        else:
            judged = [self.noise.judge((model, v.output), v)[0] for v in verdicts]
            pairs = self._pairs.add_candidate(request_seq, cand.name, verdicts)
        for v in judged:
            self.population.record(model, cand.name, v)
        for candidate, ab, aa in pairs:
            self.population.record_pair(model, candidate, ab, aa)
        return judged, pairs

    def observe_gauges(self, options: CallbackOptions) -> Iterator[Observation]:
        """OpenTelemetry callback: the population's rates and quantiles as gauges."""
        return population_gauges(self.population)


class LatestPopulation:
    """The population statistics last gathered from the compare workers (the mirror process
    serves them as gauges; each worker only sees the pairs it compared)."""

    def __init__(self) -> None:
        self.stats = PopulationStats()

    def observe_gauges(self, options: CallbackOptions) -> Iterator[Observation]:
        return population_gauges(self.stats)


def population_gauges(population: PopulationStats) -> Iterator[Observation]:
    """The population's rates and quantiles as gauge observations."""
    for row in population.summary():
        attrs: dict[str, Any] = {
            "model": row["model"],
            "candidate": row["candidate"],
            "output": row["output"],
            "metric": row["metric"],
        }
        yield Observation(row["flagged_rate_ci95"][1], {**attrs, "stat": "flagged_rate_upper95"})
        if row["flagged_rate"] is not None:
            yield Observation(row["flagged_rate"], {**attrs, "stat": "flagged_rate"})
        for q in ("p50", "p99"):
            value = row["severity"][q]
            if value is not None:
                yield Observation(value, {**attrs, "stat": f"severity_{q}"})
        paired = row["paired_vs_noise_floor"]
        if paired["pairs"]:
            yield Observation(
                paired["wilcoxon_greater"]["p"], {**attrs, "stat": "paired_wilcoxon_p"}
            )
            yield Observation(paired["mcnemar"]["p"], {**attrs, "stat": "paired_mcnemar_p"})
