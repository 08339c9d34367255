"""The ``make bench`` report: tables of figures and ratios, the goals, a latency CDF plot, JSON.

Tables: the live path (medians of the interleaved rounds, ``rounds.py``), every other point
(with each point's coverage), the dedicated coverage runs (``coverage.py``); then the goals,
PASS or FAIL, including CPU per compared copy (``shadow_cpu.py``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .coverage import coverage_goals, coverage_rows
from .grpc_bench import FAST, TRITON, ceiling_table, grpc_goals, grpc_table
from .mirror_overhead import md_table, text_table
from .openloop import Run
from .rounds import LIVE_POINT, live_goals, live_table
from .shadow_cpu import cpu_goals

if TYPE_CHECKING:
    from .bench import Point, Results

FAULT_RATIO = 1.2
MEMORY_GROWTH = 1.10
"""Flat: the peak RSS of the run's second half is at most this times the first half's."""
PEER = "nginx-mirror"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def _p(point: Point | None, key: str) -> float | None:
    return point.run.figures()[key] if point and point.run else None


def _ratio(results: Results, point: Point) -> str:
    """What the row is compared with, and how it compares."""
    if point.saturation is not None:
        peer = results.get(PEER, "saturation", point.round)
        if peer is None or peer.saturation is None or not peer.saturation.requests_per_s:
            return "-"
        return f"{point.saturation.requests_per_s / peer.saturation.requests_per_s:.2f}x {PEER}"
    if point.memory:
        first, last = _halves(point)
        return f"RSS MiB start {point.memory[0][1]:.0f}, peak 1st half {first:.0f}, 2nd {last:.0f}"
    if "-candidate@" in point.name:
        if point.target.startswith("nginx"):
            base = results.get("nginx", f"small@{point.name.split('@')[1]}")
            label = "nginx"
        else:
            base, label = results.get(point.target, f"no-candidate@{point.name.split('@')[1]}"), ""
            label = "no mirroring"
        if base is None or point is base or not _p(base, "p99"):
            return "-"
        return f"p99 {(_p(point, 'p99') or 0) / (_p(base, 'p99') or 1):.2f}x {label}"
    direct = results.get("direct", point.name, point.round)
    if point.target == "direct" or direct is None:
        return "-"
    d50, d99 = _p(point, "p50"), _p(point, "p99")
    if d50 is None or d99 is None:
        return "-"
    return f"{d50 - (_p(direct, 'p50') or 0):+.2f} / {d99 - (_p(direct, 'p99') or 0):+.2f} ms"


def _halves(point: Point) -> tuple[float, float]:
    values = [rss for _, rss in point.memory]
    mid = max(1, len(values) // 2)
    return max(values[:mid]), max(values[mid:] or values[:mid])


def table(
    results: Results, rounds: bool = True, grpc: bool = False
) -> tuple[list[str], list[list[str]]]:
    """Every point, one row each; ``rounds=False`` leaves out the live-path rounds (their
    medians have a table of their own); ``grpc=True``: the gRPC section's points instead."""
    header = [
        "target",
        "measurement",
        "backend",
        "ok req/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "errors",
        "vs (added p50 / p99 over direct, or ratio)",
        "coverage",
        "other CPU %",
    ]
    rows = []
    for point in results.grpc if grpc else results.points:
        if point.round and not rounds:
            continue
        if point.saturation is not None:
            sat = point.saturation
            figures = [
                f"{sat.requests_per_s:.0f} ({sat.tool})",
                "-",
                "-",
                "-",
                "-",
                str(sat.errors),
            ]
        else:
            assert point.run is not None
            run = point.run
            f = run.figures()
            errs = sum(run.errors.values())
            figures = [
                f"{run.ok / run.duration_s:.0f}",
                *(_ms(f[k]) for k in ("p50", "p99", "p99.9", "max")),
                f"{errs}"
                + (f" ({', '.join(f'{k}: {v}' for k, v in run.errors.items())})" if errs else ""),
            ]
        other = "-" if point.other_cpu is None else f"{point.other_cpu:.0f}"
        cov = f"{point.copies.share:.1%}" if point.copies else "-"
        if point.received is not None and point.run is not None and point.run.sent:
            cov += f" (candidate got {point.received / point.run.sent:.0%})"
        name = f"{point.name} r{point.round}" if point.round else point.name
        row = [point.target, name, point.backend, *figures, _ratio(results, point), cov, other]
        rows.append(row)
    return header, rows


def goals(results: Results, targets: Sequence[str]) -> list[str]:
    """Faults and memory; the live path's, coverage's and CPU's goals come from their modules."""
    lines = []
    for target in targets:
        base = next(
            (p for p in results.points if p.target == target and p.name.startswith("no-")), None
        )
        for kind in ("slow", "dead"):
            fault = next(
                (p for p in results.points if p.target == target and p.name.startswith(kind)), None
            )
            if fault and base and _p(base, "p99"):
                ratio = (_p(fault, "p99") or 0) / (_p(base, "p99") or 1)
                ok = ratio <= FAULT_RATIO and fault.run is not None and not fault.run.errors
                lines.append(
                    f"{'PASS' if ok else 'FAIL'} {target}: live p99 with the {kind} candidate "
                    f"{_ms(_p(fault, 'p99'))} ms = {ratio:.2f}x no mirroring "
                    f"{_ms(_p(base, 'p99'))} ms (goal <= {FAULT_RATIO}x)"
                )
        mem = next((p for p in results.points if p.target == target and p.memory), None)
        if mem:
            first, last = _halves(mem)
            ok = last <= first * MEMORY_GROWTH
            lines.append(
                f"{'PASS' if ok else 'FAIL'} {target}: memory with the slow candidate "
                f"({mem.name}): peak RSS {first:.0f} MiB in the first half, {last:.0f} MiB in the "
                f"second (goal: flat, <= {MEMORY_GROWTH:.2f}x)"
            )
    return lines


def all_goals(results: Results) -> list[str]:
    proxies = sorted(
        {p.target for p in results.points if p.target.startswith("shadowproxy@")} | {"shadowproxy"}
    )
    lines = live_goals(results, proxies)
    lines += coverage_goals(results.coverage) + cpu_goals(results.cpu)
    return lines + goals(results, proxies) + grpc_goals(results)


def copies(results: Results) -> list[str]:
    lines = []
    for target, outcomes in results.mirror.items():
        total = sum(v for k, v in outcomes.items() if not k.startswith("skipped:"))
        if not total:
            continue
        compared = outcomes.get("compared", 0)
        other = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()) if k != "compared")
        lines.append(
            f"{target}: {compared} of {total} copies compared ({compared / total:.0%}); "
            f"{other or 'nothing else'}"
        )
    return lines


def _live(point: Point) -> bool:
    return point.name == LIVE_POINT and point.round is not None


def _curves(results: Results, keep: Any) -> list[tuple[str, Run]]:
    """(label, run) per curve: one per target, the live-path rounds' histograms merged."""
    curves: dict[str, Run] = {}
    for point in results.points:
        if point.run is None or not point.run.ok or not keep(point):
            continue
        label = point.target
        if "-candidate@" in point.name:
            label = f"{point.target} {point.name.split('@')[0]}"
        if label not in curves:
            curves[label] = Run(point.run.rate, point.run.duration_s)
        curves[label].latency.add(point.run.latency)
    return list(curves.items())


def plot(results: Results, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    panels = (
        ("small JSON at 1000 requests/s, static NGINX backend, all rounds", _live),
        ("slow / dead candidate", lambda p: "-candidate@" in p.name),
    )
    for ax, (title, keep) in zip(axes, panels, strict=True):
        for label, run in _curves(results, keep):
            xs, ys = run.cdf()
            ax.plot(xs, ys, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("latency from the intended send time, ms (log)")
        ax.set_ylabel("share of requests")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # none with --only grpc (and the like)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(results: Results, args: argparse.Namespace, elapsed_s: float, env: str) -> str:
    intro = (
        f"live path: {args.rounds} interleaved rounds, static NGINX reference and candidate, "
        f"medians (min-max); other points: {args.duration:g} s measured after {args.warmup:g} s "
        "warmup each; latency from each request's intended send time (HDR histogram), status "
        f"200 only; saturation: wrk, 1 thread, 32 connections, {args.sat_duration:g} s, small "
        f"JSON; faults at {args.fault_rate:g} req/s, the slow candidate answers after 200 ms; "
        "coverage = copies compared / requests sent, counted once the copies settled; "
        f"whole run {elapsed_s:.0f} s"
    )
    if results.grpc:
        intro += (
            f"; gRPC: {args.rounds} interleaved rounds of ModelInfer (small 1x8 FP32 request) at "
            f"500 and 1000 calls/s open loop ({args.duration:g} s after {args.warmup:g} s "
            f"warmup; Triton at {args.grpc_triton_rate:g}/s), saturation by 32 grpc.aio callers "
            f"for {args.sat_duration:g} s; 'mirrored' = calls the candidate received / calls sent"
        )
    other = [p.other_cpu for p in results.points + results.grpc if p.other_cpu is not None]
    quiet = (
        f"CPU used by processes outside the benchmark (100 = one core): median "
        f"{sorted(other)[len(other) // 2]:.0f}%, max {max(other):.0f}%"
        if other
        else ""
    )
    png = args.out / "bench_cdf.png"
    has_plot = plot(results, str(png))
    goal_lines = all_goals(results)
    sections = [
        ("Live path (interleaved rounds)", live_table(results)),
        ("Points", table(results, rounds=False)),
        ("Coverage runs", coverage_rows(results.coverage)),
        ("gRPC ModelInfer (interleaved rounds)", grpc_table(results, FAST)),
        ("gRPC ModelInfer against real Triton (interleaved rounds)", grpc_table(results, TRITON)),
        (
            "gRPC backends at saturation, direct (what limits a proxy behind them)",
            ceiling_table(results),
        ),
    ]
    parts_text = [intro]
    for title, (header, rows) in sections:
        if rows:
            parts_text += [f"{title}:", text_table(header, rows)]
    parts_text += ["Goals:", *goal_lines, "Copies (proxy /metrics):", *copies(results)]
    parts_text += [quiet, *results.notes]
    md = ["# shadowproxy vs NGINX mirror", f"{time.strftime('%Y-%m-%d %H:%M:%S')}; {env}.", intro]
    every = [("Every point", table(results)), ("Every gRPC point", table(results, grpc=True))]
    for title, (header, rows) in [*sections, *every]:
        if rows:
            md += [f"## {title}", md_table(header, rows)]
    md += [
        "## Goals",
        "\n".join(f"- {line}" for line in goal_lines),
        "## Copies",
        "\n".join(f"- {line}" for line in copies(results)),
        quiet,
        *results.notes,
    ]
    if has_plot:
        md.append(f"![latency CDF]({png.name})")
    (args.out / "bench.md").write_text("\n\n".join(md) + "\n")
    return "\n".join(parts_text) + "\n"


def _point_json(p: Point) -> dict[str, Any]:
    """What every point of every section records (REST and gRPC alike)."""
    return {
        "target": p.target,
        "name": p.name,
        "round": p.round,
        "backend": p.backend,
        "latency_ms": p.run.figures() if p.run else None,
        "ok": p.run.ok if p.run else None,
        "sent": p.run.sent if p.run else None,
        "errors": dict(p.run.errors) if p.run else None,
        "compared": p.copies.compared if p.copies else None,
        "saturation_rps": p.saturation.requests_per_s if p.saturation else None,
        "other_cpu_percent": p.other_cpu,
    }


def to_json(results: Results) -> dict[str, Any]:
    return {
        "points": [
            {
                **_point_json(p),
                "coverage": p.copies.share if p.copies else None,
                "memory_mb": p.memory or None,
            }
            for p in results.points
        ],
        "coverage_runs": [
            {
                "target": r.target,
                "kind": r.kind,
                "backend": r.backend,
                "rate": r.rate,
                "duration_s": r.duration_s,
                "sent": r.copies.sent,
                "compared": r.copies.compared,
                "coverage": r.copies.share,
                "outcomes": r.copies.outcomes,
                "planted": len(r.planted),
                "flagged": len(r.flagged),
                "recall": r.recall,
                "precision": r.precision,
                "live_p50_ms": r.p50_ms,
                "live_p99_ms": r.p99_ms,
                "errors": r.errors,
            }
            for r in results.coverage
        ],
        "cpu_runs": [
            {
                "target": r.target,
                "rate": r.rate,
                "duration_s": r.duration_s,
                "sent": r.sent,
                "compared": r.compared,
                "not_compared": r.not_compared,
                "live_cpu_s": r.cpu.live_s,
                "shadow_cpu_s": r.cpu.shadow_s,
                "shadow_processes": r.cpu.shadow_processes,
                "shadow_cpu_s_by_process": r.cpu.by_name,
                "shadow_exited": r.cpu.exited,
                "idle_shadow_cores": r.idle_shadow_share,
                "shadow_ms_per_compared_copy": r.shadow_ms_per_copy,
                "live_ms_per_request": r.live_ms_per_request,
            }
            for r in results.cpu
        ],
        "grpc_points": [
            {
                **_point_json(p),
                "candidate_received": p.received,
                "generator_cores": getattr(p.saturation, "client_cores", None),
            }
            for p in results.grpc
        ],
        "mirror": results.mirror,
        "notes": results.notes,
    }
