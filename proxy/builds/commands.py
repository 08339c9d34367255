"""``shadowproxy builds list|show ID|diff A B``: the builds ledger from a terminal, read from the
Redis the proxies write to (any number running, or none)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..buffer.store import SampleStore
from ..settings import Settings
from .evidence import builds_view


def add_parser(sub: Any) -> None:
    builds = sub.add_parser("builds", help="the model builds ledger: list, show, diff")
    bsub = builds.add_subparsers(dest="builds_command", required=True, metavar="ACTION")
    lst = bsub.add_parser("list", help="every build, per model, with its evidence")
    show = bsub.add_parser("show", help="one build: fingerprint, evidence, labels, replays")
    show.add_argument("id", help="a build id (or an unambiguous prefix)")
    diff = bsub.add_parser("diff", help="two builds side by side, with significance tests")
    diff.add_argument("a", help="the baseline build")
    diff.add_argument("b", help="the build to judge against it")
    for p in (lst, show, diff):
        p.add_argument("--json", action="store_true", help="JSON for scripts")
        p.add_argument("--config", required=True, type=Path, metavar="FILE")


async def run(args: argparse.Namespace, settings: Settings, store: SampleStore) -> int:
    view = builds_view(settings, store)
    ledger = view.ledger
    if args.builds_command == "list":
        rows = await view.list_builds()
        print(json.dumps(rows, indent=2) if args.json else render_list(rows))
        return 0
    if args.builds_command == "show":
        build = await view.show(await ledger.resolve(args.id))
        assert build is not None  # resolve found it
        print(json.dumps(build, indent=2) if args.json else render_show(build))
        return 0
    a, b = await ledger.resolve(args.a), await ledger.resolve(args.b)
    diff = await view.diff(a, b)
    print(json.dumps(diff, indent=2) if args.json else render_diff(diff))
    return 0


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _rate(e: dict[str, Any] | None) -> str:
    if not e or not e["copies"]:
        return "-"
    lo, hi = e["flagged_rate_ci95"]
    return f"{e['flagged']}/{e['copies']} = {e['flagged_rate']:.1%} [{lo:.1%}, {hi:.1%}]"


def render_list(rows: list[dict[str, Any]]) -> str:
    lines = []
    model = None
    width = max((len(r["hardware"] or "-") for r in rows), default=1)
    for r in rows:
        if r["model"] != model:
            model = r["model"]
            lines.append(f"model {model}")
        mark = "*" if r["current"] else " "
        lines.append(
            f" {mark} {r['id']}  {r['role']:9} {r['upstream']:12} v{r['version'] or '?':4} "
            f"{r['hardware'] or '-':{width}} since {_when(r['first_seen'])}  "
            f"flagged {_rate(r['evidence'])}"
        )
    lines.append("(* serves now)")
    return "\n".join(lines)


def render_show(b: dict[str, Any]) -> str:
    lines = [
        f"build {b['id']}  {b['role']} {b['upstream']}  model {b['model']} v{b['version'] or '?'}",
        f"  hardware: {b['hardware'] or '-'}  gpus: {b['gpus'] or '-'}",
        f"  first seen {_when(b['first_seen'])}, last {_when(b['last_seen'])}"
        + ("  (serves now)" if b["current"] else ""),
        f"  flagged: {_rate(b['evidence'])}  severity {_severity(b['evidence'])}",
    ]
    for o in b["outputs"]:
        if o["output"] != "*":
            lines.append(
                f"  output {o['output']} [{o['metric']}]: {o['flagged']}/{o['samples']} flagged, "
                f"severity p50 {o['severity']['p50']} p99 {o['severity']['p99']}"
            )
    lines.append(f"  labels: {b['labels'] or '-'}")
    for run in b["replays"]:
        lines.append(
            f"  replay {_when(run['ts'])} golden {run['golden_id']} ({run['golden_size']}): "
            f"{run.get('still_diverging', '?')} still diverge"
        )
    return "\n".join(lines)


def render_diff(d: dict[str, Any]) -> str:
    lines = [
        f"{side}: {x['id']} {x['upstream']} {x['model']} v{x['version'] or '?'} "
        f"({x['hardware'] or '-'})"
        for side, x in (("a", d["a"]), ("b", d["b"]))
    ]
    lines.append("fingerprint:")
    fp = d["fingerprint"]
    for field, (va, vb) in fp["fields"].items():
        lines.append(f"  {field}: {json.dumps(va)} -> {json.dumps(vb)}")
    lines += [f"  - config {line}" for line in fp["config_only_a"]]
    lines += [f"  + config {line}" for line in fp["config_only_b"]]
    if not (fp["fields"] or fp["config_only_a"] or fp["config_only_b"]):
        lines.append("  identical")
    ev = d["evidence"]
    test = d["flagged_rate_test"]
    lines.append(f"flagged: a {_rate(ev['a'])}; b {_rate(ev['b'])}; p = {_p(test['p'])}")
    sev = d["severity_test"]
    lines.append(
        f"severity: a {_severity(ev['a'])}; b {_severity(ev['b'])}; rank test p = {_p(sev['p'])}"
        + (f", P(b > a) = {sev['prob_b_greater']:.2f}" if sev["prob_b_greater"] is not None else "")
    )
    verdict = [
        name
        for name, p in (("flagged rate", test["p"]), ("severity", sev["p"]))
        if p is not None and p < 0.05
    ]
    lines.append(
        "matters: "
        + (", ".join(verdict) + " differ (p < 0.05)" if verdict else "no significant change")
    )
    for c in d["golden_changes"]:
        now = "now diverges" if c["b_diverges"] else "no longer diverges"
        lines.append(f"golden {c['sample']} [{c['label']}]: {now}")
    return "\n".join(lines)


def _severity(e: dict[str, Any] | None) -> str:
    """Severity quantiles, or why there are none (the reference is compared against, not
    judged)."""
    if e is None:
        return "- (the reference)"
    return ", ".join(f"{q} {_num(v)}" for q, v in e["severity"].items())


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def _p(p: float | None) -> str:
    return "-" if p is None else f"{p:.3g}"
