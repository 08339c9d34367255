"""The golden set: export judged divergences as JSON lines, and replay them against a new model.

Each record carries the request exactly as sent (bytes, base64, with the headers that frame
them), the reference's answer, the candidate's answer, the label and note, both model versions,
every score, and the comparator spec each output was judged by. ``replay`` re-sends every request
to a new server, compares its answer with the recorded *reference* answer under the same spec,
and reports per label which samples still diverge: a regression found once is checked on every
later model.

Runs are history: with a store (``replay --config``) each run is kept in the builds ledger under
the build that answered it (``record_replay``), with the golden set's own id and size, so
``builds show`` lists a build's runs and ``builds diff`` finds the samples whose outcome changed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

from comparators import resolve_spec

from ..buffer.store import SampleStore
from ..builds.fingerprint import build_id, probe
from ..builds.ledger import BuildLedger
from ..errors import ConfigError
from ..shadow.analysis import Exchange, analyze
from .admin import render_payloads

# Request headers that frame the body; everything else about the original client stays behind.
_FRAMING = ("Content-Type", "Content-Encoding", "Inference-Header-Content-Length")


async def export_golden(
    store: SampleStore, out: Path, comparisons: Mapping[str, Mapping[str, Mapping[str, Any]]]
) -> int:
    """Write every stored flagged sample; labelled ones get their TTL back once exported."""
    count, exported_labelled = 0, []
    # Created 0600: an export holds samples (an existing file is truncated, its mode kept
    # unless it let others read, then narrowed before a byte is written).
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    if os.fstat(fd).st_mode & 0o077:
        os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        for item in await store.list_samples(flagged=True, limit=1_000_000):
            sample = await store.get_sample(item["id"])
            if sample is None:
                continue
            raw = sample.pop("payloads")
            payloads = render_payloads(raw, sample.get("truncated"))
            label = sample.get("label") or {}
            specs = {}
            for o in sample["outputs"]:
                spec = resolve_spec(comparisons, sample["model"], o["output"])
                specs[o["output"]] = {"metric": spec.metric, **dict(spec.params)}
            record = {
                "id": sample["id"],
                "request_id": sample["request_id"],
                "model": sample["model"],
                "candidate": sample["candidate"],
                "ts": sample["ts"],
                "label": label.get("verdict"),
                "note": label.get("note"),
                "labelled_by": label.get("by"),
                "versions": {
                    "reference": sample["reference"]["version"],
                    "candidate": sample["candidate_side"]["version"],
                },
                "models": {
                    "reference": sample["reference"]["model"],
                    "candidate": sample["candidate_side"]["model"],
                },
                "scores": sample["outputs"],
                "reason": sample["reason"],
                "comparisons": specs,
                "request": payloads.get("request"),
                "request_headers": payloads.get("request_headers"),
                "reference_answer": payloads.get("reference_body"),
                "candidate_answer": payloads.get("candidate_body"),
                "raw": {
                    k: base64.b64encode(raw[k]).decode()
                    for k in ("request", "reference_body", "candidate_body")
                    if k in raw
                },
                "reference_headers": payloads.get("reference_headers"),
            }
            fh.write(json.dumps(record) + "\n")
            count += 1
            if label:
                exported_labelled.append(sample["id"])
    if exported_labelled:
        await store.mark_exported(exported_labelled)
    print(f"wrote {count} samples to {out} ({len(exported_labelled)} labelled)")
    return count


def load_golden(path: Path) -> list[dict[str, Any]]:
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the golden set ({exc.strerror})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record["raw"]["request"]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{path}:{n}: not a golden-set record (export it again)") from None
        records.append(record)
    return records


def _progress(done: int, total: int) -> None:
    width = 30
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\rreplaying [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


async def replay_golden(
    records: list[dict[str, Any]],
    url: str,
    *,
    model_map: Mapping[str, str],
    concurrency: int = 4,
    timeout_s: float = 60.0,
) -> list[dict[str, Any]]:
    """Re-send each request to ``url`` and judge the answer against the recorded reference."""
    gate = asyncio.Semaphore(concurrency)
    results: list[dict[str, Any]] = []
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def one(session: aiohttp.ClientSession, rec: dict[str, Any]) -> None:
        model = model_map.get(rec["model"], rec["model"])
        headers = {k: v for k, v in rec.get("request_headers") or [] if k in _FRAMING}
        body = base64.b64decode(rec["raw"]["request"])
        ref = Exchange(
            "recorded reference",
            200,
            dict(rec.get("reference_headers") or []),
            base64.b64decode(rec["raw"].get("reference_body", "")),
            0.0,
        )
        async with gate:
            started = time.perf_counter()
            try:
                async with session.post(
                    f"{url.rstrip('/')}/v2/models/{model}/infer", data=body, headers=headers
                ) as r:
                    new = Exchange(url, r.status, dict(r.headers), await r.read(), 0.0)
            except (aiohttp.ClientError, TimeoutError) as exc:
                results.append(
                    {
                        "record": rec,
                        "served": model,
                        "diverges": None,
                        "reason": f"no answer: {str(exc) or type(exc).__name__}",
                        "latency_s": time.perf_counter() - started,
                    }
                )
                _progress(len(results), len(records))
                return
            latency_s = time.perf_counter() - started
        table = {rec["model"]: rec.get("comparisons") or {}, "*": {"*": {"metric": "auto"}}}
        analysis = await asyncio.to_thread(analyze, ref, new, rec["model"], table)
        results.append(
            {
                "record": rec,
                "served": model,
                # The version that answered: the build a run is recorded against.
                "version": analysis.candidate.model_version if analysis.candidate else None,
                "outcome": analysis.outcome,
                "diverges": analysis.flagged,
                "reason": analysis.reason,
                "severity": analysis.severity,
                "latency_s": latency_s,
            }
        )
        _progress(len(results), len(records))

    # Bodies exactly as the server sent them: the codec reads Content-Encoding itself.
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        await asyncio.gather(*(one(session, r) for r in records))
    return results


def replay_report(results: list[dict[str, Any]]) -> dict[str, Any]:
    by_label: dict[str, Counter[str]] = defaultdict(Counter)
    diverging: dict[str, list[dict[str, str]]] = defaultdict(list)
    for res in results:
        label = res["record"].get("label") or "unlabelled"
        state = {True: "still_diverges", False: "now_matches", None: "no_answer"}[res["diverges"]]
        by_label[label][state] += 1
        if res["diverges"]:
            diverging[label].append({"id": res["record"]["id"], "reason": res["reason"]})
    return {
        "samples": len(results),
        "by_label": {k: dict(v) for k, v in sorted(by_label.items())},
        "still_diverging": dict(diverging),
    }


def golden_id(records: list[dict[str, Any]]) -> str:
    """The golden set's own id: 12 hex digits of its sample ids and their labels, in any order.
    The same export is the same set wherever it is replayed; a relabelled sample makes a new
    set (what counts as a regression changed), so runs compare only like with like."""
    pairs = sorted((str(r["id"]), str(r.get("label") or "unlabelled")) for r in records)
    raw = json.dumps(pairs, separators=(",", ":"))
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def replay_run(
    results: list[dict[str, Any]],
    *,
    url: str,
    build: str,
    golden: str,
    golden_size: int,
    ts: float,
) -> dict[str, Any]:
    """One run as the ledger keeps it (``builds show`` and ``builds diff`` read it): per label,
    which samples still diverge. Samples the server did not answer are listed apart: they say
    nothing about the build, and a diff must not read them as "now matches"."""
    report = replay_report(results)
    models = sorted({str(r["record"]["model"]) for r in results})
    return {
        "ts": ts,
        "url": url,
        "build": build,
        "golden_id": golden,
        "golden_size": golden_size,
        "models": models,
        "replayed": len(results),
        "by_label": report["by_label"],
        "still_diverging": report["by_label"].get("regression", {}).get("still_diverges", 0),
        "samples": [
            {
                "sample": r["record"]["id"],
                "request_id": r["record"].get("request_id"),
                "label": r["record"].get("label") or "unlabelled",
                "diverges": bool(r["diverges"]),
                "severity": r.get("severity", 0.0),
                "reason": r["reason"],
            }
            for r in results
            if r["diverges"] is not None
        ],
        "no_answer": [r["record"]["id"] for r in results if r["diverges"] is None],
    }


async def record_replay(
    store: SampleStore,
    results: list[dict[str, Any]],
    *,
    url: str,
    upstream: str,
    hardware: str | None,
    metrics_url: str | None,
    model_map: Mapping[str, str],
    golden: str,
    golden_size: int,
    ts: float,
) -> dict[str, str]:
    """Record the run against the build(s) it talked to, in the store's ledger; model -> build.

    One build per model replayed: the facts ``probe`` reads from ``url`` for the model as it
    was served, with the version the answers named (the one that really answered; the
    server's newest otherwise). The same upstream name, URL, ``model_map`` and hardware as a
    candidate's config give that candidate's own build id, so the run joins its evidence."""
    ledger = BuildLedger(store.redis, store.keys)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for res in results:
        groups[str(res["record"]["model"])].append(res)
    builds: dict[str, str] = {}
    async with aiohttp.ClientSession() as session:
        for model, group in sorted(groups.items()):
            versions = Counter(str(r["version"]) for r in group if r.get("version"))
            facts = await probe(
                session,
                upstream=upstream,
                url=url,
                model=model,
                served=str(group[0]["served"]),
                version=versions.most_common(1)[0][0] if versions else None,
                hardware=hardware,
                metrics_url=metrics_url,
                model_map=model_map,
            )
            bid = build_id(facts)
            # Not "serves now": a replay may target any version, live traffic decides that.
            await ledger.record(bid, facts, "candidate", serving=False)
            run = replay_run(
                group, url=url, build=bid, golden=golden, golden_size=golden_size, ts=ts
            )
            await ledger.add_replay(bid, run)
            builds[model] = bid
    return builds


def print_replay_report(report: Mapping[str, Any]) -> None:
    golden = report.get("golden")
    size = f" of golden set {golden['id']} ({golden['size']} samples)" if golden else ""
    print(f"replayed {report['samples']} golden samples{size}")
    for model, bid in (report.get("builds") or {}).items():
        print(f"  recorded against build {bid} ({model})")
    for label, counts in report["by_label"].items():
        total = sum(counts.values())
        print(
            f"  {label:<12} {total:>4} samples: {counts.get('still_diverges', 0)} still diverge,"
            f" {counts.get('now_matches', 0)} now match, {counts.get('no_answer', 0)} no answer"
        )
        for item in report["still_diverging"].get(label, [])[:20] if label == "regression" else []:
            print(f"    regression still present: {item['id'][:12]}: {item['reason'][:100]}")
