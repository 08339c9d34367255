"""The demo's report: the traffic sent, per candidate what was compared (over which protocol),
what diverged and by how much, and the builds: every build this run recorded with its evidence,
the golden-set replays of the rolled-out model's versions, and ``builds diff`` of the two."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ..builds.commands import render_diff, render_list
from ..settings import Settings
from .llm import llm_lines

PROTOCOLS = {
    "v2_rest": "REST",
    "v2_grpc": "gRPC",
    "triton_generate": "generate",
    "openai": "OpenAI",
}
"""A verdict's ``protocol`` (the reference answer's wire protocol) as the report names it."""


def compared_by_protocol(verdicts: Iterable[Mapping[str, Any]]) -> dict[str, Counter[str]]:
    """Per candidate, its compared verdicts by protocol (``REST``, ``gRPC``; an unknown one by its
    own name): what Redis holds, the same count the report's "samples compared" is."""
    out: dict[str, Counter[str]] = defaultdict(Counter)
    for v in verdicts:
        if v["outcome"] == "compared":
            protocol = str(v.get("protocol") or "unknown")
            out[v["candidate"]][PROTOCOLS.get(protocol, protocol)] += 1
    return out


def traffic_line(traffic: Mapping[str, int]) -> str:
    """``traffic: 300 requests, 225 REST (113 JSON, 112 binary) + 75 gRPC, 0 failed``."""
    rest, grpc = traffic.get("rest", 0), traffic.get("grpc", 0)
    generate, stream = traffic.get("llm_generate", 0), traffic.get("llm_generate_stream", 0)
    llm = f" + {generate + stream} generations ({generate} generate, {stream} streamed)"
    return (
        f"traffic: {rest + grpc} requests, {rest} REST ({traffic.get('json', 0)} JSON, "
        f"{traffic.get('binary', 0)} binary) + {grpc} gRPC"
        f"{llm if generate + stream else ''}, {traffic.get('failed', 0)} failed"
    )


def _q(values: list[float], q: float) -> float:
    return float(np.quantile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def print_report(
    settings: Settings,
    verdicts: Iterable[Mapping[str, Any]],
    tally: Mapping[tuple[str, str], int],
    coverage: Mapping[str, Mapping[str, Any]],
    traffic: Mapping[str, int] | None = None,
) -> None:
    verdicts = list(verdicts)
    by_cand: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for v in verdicts:
        by_cand[v["candidate"]].append(v)
    by_protocol = compared_by_protocol(verdicts)
    print("\n=== shadowproxy demo report ===")
    if traffic is not None:
        print(traffic_line(traffic))
    for cand in settings.candidates:
        rows = by_cand.get(cand.name, [])
        compared = [r for r in rows if r["outcome"] == "compared"]
        flagged = sum(1 for r in rows if r["flagged"])
        role = " (noise floor: a second reference instance)" if cand.noise_floor else ""
        served = ", ".join(f"{k} -> {v}" for k, v in cand.model_map.items())
        print(f"\n{cand.name}{role}  [{served or cand.url}]")
        share = flagged / len(rows) if rows else 0.0
        protocols = by_protocol.get(cand.name, Counter())
        order = ("REST", "gRPC", *sorted(set(protocols) - {"REST", "gRPC"}))
        split = " + ".join(f"{protocols[p]} {p}" for p in order if protocols[p]) or "none"
        print(f"  samples compared {len(compared)} ({split}), flagged {flagged} ({share:.0%})")
        # Per output: severity quantiles (0 = identical, larger = worse, the same scale for
        # every metric) and the comparator's own headline score at its worst.
        severities: dict[tuple[str, str], list[float]] = defaultdict(list)
        headlines: dict[tuple[str, str], tuple[str, list[float]]] = {}
        for r in compared:
            for out in r["outputs"]:
                if out["validity"] != "ok":
                    continue
                key = (out["output"], out["metric"])
                severities[key].append(float(out["severity"]))
                if out["headline"]:
                    name, vals = headlines.setdefault(key, (out["headline"], []))
                    vals.append(float(out["scores"][name]))
        for (output, metric), sev in sorted(severities.items()):
            line = (
                f"  {output:<13} {metric:<13} divergence p50 {_q(sev, 0.5):<9.2e}"
                f" p99 {_q(sev, 0.99):<9.2e} max {max(sev):<9.2e}"
            )
            if (output, metric) in headlines:
                name, vals = headlines[(output, metric)]
                line += f"  worst {name} {_worst(name, vals):.6g}"
            print(line)
        for line in llm_lines(compared):
            print(line)
        extra = Counter({what: n for (c, what), n in tally.items() if c == cand.name and n})
        skipped = sum(n for what, n in extra.items() if what.startswith("skipped:"))
        drops = {w.removeprefix("dropped_"): n for w, n in extra.items() if w.startswith("dropped")}
        dropped = sum(drops.values())
        others = {
            w: n
            for w, n in extra.items()
            if not w.startswith(("skipped:", "dropped")) and w not in ("compared", "stored")
        }
        print(
            f"  skipped {skipped}, dropped {dropped}"
            + (f" ({', '.join(f'{w} {n}' for w, n in sorted(drops.items()))})" if drops else "")
            + (f", other outcomes {others}" if others else "")
        )
        cov = coverage.get(cand.name)
        if cov is not None:
            ratio = f"{cov['coverage']:.0%}" if cov["coverage"] is not None else "-"
            print(f"  coverage: {cov['compared']} of {cov['sampled']} copies compared ({ratio})")
            if cov["warning"]:
                print(f"  WARNING {cov['warning']}")


def _worst(headline: str, vals: list[float]) -> float:
    # Similarities and agreements are worst at their minimum; divergences at their maximum.
    low_is_bad = any(
        w in headline for w in ("cosine", "agreement", "similarity", "sqnr", "overlap", "exact")
    )
    return min(vals) if low_is_bad else max(vals)


def replay_line(version: str, run: Mapping[str, Any]) -> str:
    """``v1 (build 0123abcd4567): 0 of 40 diverge; regressions still diverging 0 of 9``."""
    samples = run["samples"]
    regressions = sum(1 for s in samples if s["label"] == "regression")
    diverging = sum(1 for s in samples if s["diverges"])
    return (
        f"  v{version} (build {run['build']}): {diverging} of {len(samples)} diverge; "
        f"regressions still diverging {run['still_diverging']} of {regressions}"
    )


def print_builds(
    rows: list[dict[str, Any]],
    diff: Mapping[str, Any] | None,
    runs: Mapping[str, Mapping[str, Any]],
    rollout: str,
) -> None:
    """The builds section: ``builds list`` of this run, the replays, ``builds diff`` v1 v2."""
    print("\n=== builds (shadowproxy builds list) ===")
    print(render_list(rows))
    print(f"\n{rollout}")
    if runs:
        first = next(iter(runs.values()))
        labels = Counter(s["label"] for s in first["samples"])
        split = ", ".join(f"{n} {label}" for label, n in sorted(labels.items()))
        size = f"{first['golden_size']} samples: {split}"
        print(f"golden set {first['golden_id']} ({size}) replayed:")
        for version, run in runs.items():
            print(replay_line(version, run))
    if diff is not None:
        print(f"\n=== shadowproxy builds diff {diff['a']['id']} {diff['b']['id']} ===")
        print(render_diff(dict(diff)))
