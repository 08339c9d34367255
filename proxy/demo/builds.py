"""The demo's builds part: a golden set judged as a reviewer would, replayed against both
versions of the rolled-out model, and the builds ledger with the two versions side by side.

The demo plays the reviewer: it labels int8's worst flagged embeddings (cosine to the reference
below ``REGRESSION_COSINE``) as regressions and the rest of a sample of them as acceptable, and
exports them with ``review export``'s own code. A golden set belongs to the reference model's
requests, not to the candidate that was flagged on them, so it is replayed against each version
of the traced model through Triton's versioned route (``/v2/models/{m}/versions/{v}/infer``) and
each run is recorded in the ledger under the build that version was while it served traffic
(not ``record_replay``'s probe: after the rollout the served config names both versions, which
would make version 1 another build).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..buffer.store import SampleStore
from ..builds.evidence import builds_view
from ..builds.ledger import BuildLedger
from ..review.golden import export_golden, golden_id, load_golden, replay_golden, replay_run
from ..settings import Settings

ROLLOUT_CANDIDATE, ROLLOUT_MODEL = "traced", "minilm_traced"
"""The candidate whose model gets a second version mid-run, and that model."""

STATISTICS_WAIT_S = 15.0
GOLDEN_FROM = "int8"
GOLDEN_SIZE = 40
REGRESSION_COSINE = 0.985
"""The demo reviewer's bar: an embedding this far from the reference's is a regression."""


async def label_golden_set(
    store: SampleStore, model: str, since: float, candidate: str = GOLDEN_FROM
) -> set[str]:
    """Label up to ``GOLDEN_SIZE`` of this run's flagged ``candidate`` samples of ``model``;
    their ids."""
    flagged = await store.list_samples(flagged=True, candidate=candidate, limit=10_000, since=since)
    # REST only: a replay re-sends the recorded body to the REST infer route, and a gRPC
    # sample's body is a protobuf message.
    chosen = [s for s in flagged if s["model"] == model and s.get("protocol") == "v2_rest"]
    chosen = chosen[:GOLDEN_SIZE]
    for s in chosen:
        # One minus the worst cosine: the embedding comparator's severity.
        regression = float(s["severity"]) > 1.0 - REGRESSION_COSINE
        verdict = "regression" if regression else "acceptable"
        note = f"demo reviewer: worst cosine {1.0 - float(s['severity']):.4f}"
        await store.label(s["id"], verdict, note, "demo")
    return {str(s["id"]) for s in chosen}


async def export_golden_set(
    store: SampleStore,
    path: Path,
    ids: set[str],
    comparisons: Mapping[str, Mapping[str, Mapping[str, Any]]],
) -> list[dict[str, Any]]:
    """Export as ``review export`` does, keep the samples ``ids`` names (the file is rewritten
    with them alone, ready for ``shadowproxy replay``)."""
    with contextlib.redirect_stdout(io.StringIO()):  # its "wrote N samples" line
        await export_golden(store, path, comparisons)
    records = [r for r in load_golden(path) if r["id"] in ids]
    text = "".join(json.dumps(r) + "\n" for r in records)
    await asyncio.to_thread(path.write_text, text, encoding="utf-8")
    return records


async def version_builds(store: SampleStore, url: str, since: float) -> dict[str, str]:
    """Version -> the build id the rolled-out candidate had while that version served this
    run's traffic (the first one seen, should a version have had more)."""
    out: dict[str, str] = {}
    for b in await BuildLedger(store.redis, store.keys).builds():  # oldest first
        facts = b["facts"]
        if (
            b["upstream"] == ROLLOUT_CANDIDATE
            and facts.get("url") == url
            and b["last_seen"] >= since
            and facts.get("version")
        ):
            out.setdefault(str(facts["version"]), b["id"])
    return out


async def replay_versions(
    store: SampleStore,
    records: list[dict[str, Any]],
    url: str,
    model: str,
    builds: Mapping[str, str],
) -> dict[str, dict[str, Any]]:
    """Replay ``records`` against each version in ``builds`` explicitly and record each run
    under that version's build; version -> run."""
    ledger, golden, runs = BuildLedger(store.redis, store.keys), golden_id(records), {}
    for version, build in sorted(builds.items()):
        # The replay joins "/v2/models/{served}/infer": a versioned name reaches one version.
        served = f"{ROLLOUT_MODEL}/versions/{version}"
        with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
            results = await replay_golden(records, url, model_map={model: served})
        run = replay_run(
            results,
            url=f"{url}/v2/models/{served}",
            build=build,
            golden=golden,
            golden_size=len(records),
            ts=time.time(),
        )
        await ledger.add_replay(build, run)
        runs[version] = run
    return runs


async def builds_evidence(
    settings: Settings,
    store: SampleStore,
    since: float,
    builds: Mapping[str, str],
    compared: Mapping[str, int],
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """This run's builds with their evidence, and the diff of the rolled-out versions (none
    when fewer than two served). ``compared``: the copies each candidate compared, which its
    builds' evidence adds up to once every process has added its statistics (each does so
    every second or so)."""
    view = builds_view(settings, store)
    deadline = time.monotonic() + STATISTICS_WAIT_S
    while True:
        rows = [r for r in await view.list_builds() if r["last_seen"] >= since]
        counted: Counter[str] = Counter()
        for r in rows:
            counted[r["upstream"]] += (r["evidence"] or {}).get("copies", 0)
        if all(counted[c] >= n for c, n in compared.items()) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.25)
    versions = sorted(builds, key=int)
    diff = await view.diff(builds[versions[0]], builds[versions[-1]]) if len(versions) > 1 else None
    return rows, diff
