"""The evidence per build, and two builds side by side.

Per build: copies compared, flagged copies with the rate's Wilson interval, severity quantiles
(per copy and per output), labels by verdict of its flagged samples, golden-set replay runs and
its timeline. All from the one statistics store (``buffer/population.py``: cells carry the
candidate's build) and the ledger; nothing is counted twice.

``diff``: what differs in the fingerprints (version, hardware, server, config lines), the
flagged rates with a two-proportion z-test, the per-copy severities with a Mann-Whitney rank
test, and the golden-set samples whose outcome changed between the builds' latest replays. The
tests compare the two builds' copies as independent samples: the copies each build answered,
not the same requests paired.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from comparators.population import (
    COPY_OUTPUT,
    Cell,
    CellStats,
    rank_test,
    summary_rows,
    two_proportion_p,
    wilson_interval,
)

from ..buffer.population import PopulationStore
from ..buffer.store import SampleStore
from ..canary.state import CanaryStore
from ..settings import Settings
from .ledger import BuildLedger

_QUANTILES = (0.5, 0.9, 0.99)


def _copies(cells: Mapping[Cell, CellStats], build: str) -> CellStats:
    out = CellStats()
    for cell, stats in cells.items():
        if cell.build == build and cell.output == COPY_OUTPUT:
            out.merge(stats)
    return out


def _evidence(stats: CellStats) -> dict[str, Any]:
    lo, hi = wilson_interval(stats.flagged, stats.n)
    return {
        "copies": stats.n,
        "flagged": stats.flagged,
        "flagged_rate": stats.flagged / stats.n if stats.n else None,
        "flagged_rate_ci95": [lo, hi],
        "severity": {f"p{round(q * 100, 1):g}": stats.severity.quantile(q) for q in _QUANTILES},
    }


def _brief(build: Mapping[str, Any], current: Mapping[str, str]) -> dict[str, Any]:
    facts = build["facts"]
    return {
        "id": build["id"],
        "upstream": build["upstream"],
        "model": build["model"],
        "role": build["role"],
        "version": facts.get("version") or (facts.get("openai_model") or {}).get("id"),
        # What the server ran (after model_map): builds of one model name on different
        # upstreams are siblings only when they serve the same thing.
        "served": facts.get("served"),
        "hardware": facts.get("hardware"),
        "gpus": facts.get("gpus"),
        "first_seen": build["first_seen"],
        "last_seen": build["last_seen"],
        "current": current.get(f"{build['upstream']}|{build['model']}") == build["id"],
    }


class BuildsView:
    """Reads builds and their evidence (the admin API and the CLI)."""

    def __init__(
        self,
        ledger: BuildLedger,
        population: PopulationStore,
        store: SampleStore | None,
        canary: tuple[str, CanaryStore] | None = None,
    ) -> None:
        self.ledger = ledger
        self._population = population
        self._store = store
        self._canary = canary
        """(the canary candidate's name, its rollout's store), when a canary is configured."""

    async def _cells(self) -> dict[Cell, CellStats]:
        return await self._population.read(self._population.retention_min)

    async def list_builds(self) -> list[dict[str, Any]]:
        """Every build, by model then first seen, each with its evidence (candidates) and the
        number of comparisons it answered as the reference."""
        builds, current, cells = (
            await self.ledger.builds(),
            await self.ledger.current(),
            await self._cells(),
        )
        rows = []
        for b in builds:
            row = _brief(b, current)
            row["evidence"] = (
                _evidence(_copies(cells, b["id"])) if b["role"] == "candidate" else None
            )
            rows.append(row)
        return sorted(rows, key=lambda r: (r["model"], r["first_seen"]))

    async def show(self, build_id: str) -> dict[str, Any] | None:
        return await self._show(build_id, await self._cells(), full=True)

    async def _show(
        self, build_id: str, cells: Mapping[Cell, CellStats], *, full: bool
    ) -> dict[str, Any] | None:
        """A build's detail from statistics already read; ``full``: with its labels and canary
        attempts too (a diff shows neither, and reading every flagged sample twice for it was
        the most expensive part)."""
        build = await self.ledger.get(build_id)
        if build is None:
            return None
        row = _brief(build, await self.ledger.current())
        row["facts"] = build["facts"]
        is_candidate = build["role"] == "candidate"
        row["evidence"] = _evidence(_copies(cells, build_id)) if is_candidate else None
        row["outputs"] = summary_rows({c: s for c, s in cells.items() if c.build == build_id})
        row["replays"] = await self.ledger.replays(build_id)
        if not full:
            return row
        row["labels"] = await self._labels(build_id)
        row["timeline"] = [
            e
            for e in await self.ledger.events()
            if e["upstream"] == build["upstream"] and e["model"] == build["model"]
        ]
        row["canary"] = await self._canary_attempts(build_id, build["upstream"], row["timeline"])
        return row

    async def _canary_attempts(
        self, build_id: str, upstream: str, timeline: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """The canary attempts decided while this build served (its stretches of the timeline,
        newest event first): per attempt, the decisions and the last outcome."""
        if self._canary is None or self._canary[0] != upstream:
            return []
        spans, end = [], float("inf")
        for event in timeline:  # newest first: each event's build served until the next one
            if event["build"] == build_id:
                spans.append((float(event["ts"]), end))
            end = float(event["ts"])
        attempts: dict[int, dict[str, Any]] = {}
        for d in await self._canary[1].decisions(1000):
            if any(start <= float(d.get("ts", 0)) < stop for start, stop in spans):
                a = attempts.setdefault(int(d.get("attempt", 0)), {"decisions": 0})
                a.update(attempt=int(d.get("attempt", 0)), outcome=d.get("outcome"))
                a.update(status=d.get("status"), weight=d.get("weight"))
                a["decisions"] += 1
        return [attempts[k] for k in sorted(attempts)]

    async def _labels(self, build_id: str) -> dict[str, int]:
        if self._store is None:
            return {}
        flagged = await self._store.list_samples(flagged=True, limit=1_000_000)
        labels: Counter[str] = Counter()
        for s in flagged:
            if s.get("build") == build_id:
                labels[(s.get("label") or {}).get("verdict", "unlabelled")] += 1
        return dict(labels)

    async def diff(self, a: str, b: str) -> dict[str, Any]:
        """``a`` and ``b`` side by side; ``a`` is the baseline. The statistics window is read
        once for both builds and their tests."""
        cells = await self._cells()
        left = await self._show(a, cells, full=False)
        right = await self._show(b, cells, full=False)
        if left is None or right is None:
            raise KeyError(a if left is None else b)
        ca, cb = _copies(cells, a), _copies(cells, b)
        return {
            "a": {k: left[k] for k in ("id", "upstream", "model", "version", "hardware")},
            "b": {k: right[k] for k in ("id", "upstream", "model", "version", "hardware")},
            "fingerprint": fingerprint_diff(left["facts"], right["facts"]),
            "evidence": {"a": left["evidence"], "b": right["evidence"]},
            "flagged_rate_test": {
                "test": "two-proportion z-test (pooled), two-sided",
                "p": two_proportion_p(ca.flagged, ca.n, cb.flagged, cb.n),
                "difference": (cb.flagged / cb.n - ca.flagged / ca.n if ca.n and cb.n else None),
            },
            "severity_test": {
                "test": "Mann-Whitney U on per-copy severities (1% bins as ties), two-sided",
                **rank_test(ca.severity, cb.severity),
            },
            "golden_changes": golden_changes(left["replays"], right["replays"]),
        }


def fingerprint_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Fields whose values differ (``{field: [a, b]}``) and the config lines only one has."""
    fields = {
        k: [a.get(k), b.get(k)]
        for k in sorted(set(a) | set(b))
        if k != "config" and a.get(k) != b.get(k)
    }
    lines_a, lines_b = set(a.get("config") or []), set(b.get("config") or [])
    return {
        "fields": fields,
        "config_only_a": sorted(lines_a - lines_b),
        "config_only_b": sorted(lines_b - lines_a),
    }


def golden_changes(
    runs_a: list[Mapping[str, Any]], runs_b: list[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The golden-set samples whose outcome differs between the newest run against each build
    (of the same golden set)."""
    if not runs_a or not runs_b:
        return []
    newest_b = runs_b[0]
    newest_a = next((r for r in runs_a if r.get("golden_id") == newest_b.get("golden_id")), None)
    if newest_a is None:
        return []
    outcome_a = {s["sample"]: s for s in newest_a.get("samples", [])}
    changes = []
    for s in newest_b.get("samples", []):
        before = outcome_a.get(s["sample"])
        if before is not None and bool(before["diverges"]) != bool(s["diverges"]):
            changes.append(
                {
                    "sample": s["sample"],
                    "label": s.get("label"),
                    "a_diverges": bool(before["diverges"]),
                    "b_diverges": bool(s["diverges"]),
                }
            )
    return changes


def builds_view(settings: Settings, store: SampleStore) -> BuildsView:
    """The builds of the Redis ``store`` uses, read as ``settings`` configure them."""
    canary = None
    if settings.canary is not None:
        rollout = CanaryStore(store.redis, store.keys, settings.canary.rollout_id)
        canary = (settings.canary.candidate, rollout)
    return BuildsView(
        BuildLedger(store.redis, store.keys),
        PopulationStore(store.redis, store.keys, settings.buffer.stats_retention_min),
        store,
        canary,
    )
