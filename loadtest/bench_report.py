"""The ``make bench`` report: one table of figures and ratios, the goals, a latency CDF plot."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .mirror_overhead import md_table, text_table

if TYPE_CHECKING:
    from .bench import Point, Results

ADDED_P50_MS, ADDED_P99_MS = 0.5, 2.0
SATURATION_SHARE = 0.5
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
        peer = results.get(PEER, "saturation")
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
    direct = results.get("direct", point.name)
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


def table(results: Results) -> tuple[list[str], list[list[str]]]:
    header = [
        "target",
        "measurement",
        "ok req/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "errors",
        "vs (added p50 / p99 over direct, or ratio)",
        "other CPU %",
    ]
    rows = []
    for point in results.points:
        if point.saturation is not None:
            sat = point.saturation
            figures = [f"{sat.requests_per_s:.0f} (wrk)", "-", "-", "-", "-", str(sat.errors)]
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
        rows.append([point.target, point.name, *figures, _ratio(results, point), other])
    return header, rows


def goals(results: Results, targets: Sequence[str]) -> list[str]:
    lines = []
    for target in targets:
        here, direct = results.get(target, "small@1000"), results.get("direct", "small@1000")
        if here and direct and here.run and direct.run:
            a50 = (_p(here, "p50") or 0) - (_p(direct, "p50") or 0)
            a99 = (_p(here, "p99") or 0) - (_p(direct, "p99") or 0)
            ok = a50 <= ADDED_P50_MS and a99 <= ADDED_P99_MS and not here.run.errors
            lines.append(
                f"{'PASS' if ok else 'FAIL'} {target}: added latency at 1000 req/s, 100% mirrored: "
                f"p50 {a50:+.2f} ms (goal {ADDED_P50_MS}), p99 {a99:+.2f} ms (goal {ADDED_P99_MS})"
            )
        sat, peer = results.get(target, "saturation"), results.get(PEER, "saturation")
        if sat and peer and sat.saturation and peer.saturation and peer.saturation.requests_per_s:
            share = sat.saturation.requests_per_s / peer.saturation.requests_per_s
            lines.append(
                f"{'PASS' if share >= SATURATION_SHARE else 'FAIL'} {target}: saturation "
                f"{sat.saturation.requests_per_s:.0f} req/s = {share:.2f}x {PEER} "
                f"{peer.saturation.requests_per_s:.0f} (goal >= {SATURATION_SHARE}x, aim 1x)"
            )
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


def plot(results: Results, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    panels = (
        ("small JSON at 1000 requests/s", lambda p: p.name == "small@1000"),
        ("slow / dead candidate", lambda p: "-candidate@" in p.name),
    )
    for ax, (title, keep) in zip(axes, panels, strict=True):
        for point in results.points:
            if point.run is None or not point.run.ok or not keep(point):
                continue
            xs, ys = point.run.cdf()
            label = point.target if "@" not in point.name[:5] else f"{point.target} {point.name}"
            if "-candidate@" in point.name:
                label = f"{point.target} {point.name.split('@')[0]}"
            ax.plot(xs, ys, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("latency from the intended send time, ms (log)")
        ax.set_ylabel("share of requests")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(results: Results, args: argparse.Namespace, elapsed_s: float, env: str) -> str:
    proxies = sorted({p.target for p in results.points if p.target.startswith("shadowproxy")})
    intro = (
        f"open loop: {args.duration:g} s measured after {args.warmup:g} s warmup per point; "
        "latency from each request's intended send time (HDR histogram), status 200 only; "
        f"saturation: wrk, 1 thread, 32 connections, {args.sat_duration:g} s, small JSON; "
        f"faults at {args.fault_rate:g} req/s; the slow candidate answers after 200 ms; "
        f"whole run {elapsed_s:.0f} s"
    )
    other = [p.other_cpu for p in results.points if p.other_cpu is not None]
    quiet = (
        f"CPU used by processes outside the benchmark (100 = one core): median "
        f"{sorted(other)[len(other) // 2]:.0f}%, max {max(other):.0f}%"
        if other
        else ""
    )
    png = args.out / "bench_cdf.png"
    has_plot = plot(results, str(png))
    parts_text = [intro, text_table(*table(results)), "Goals:", *goals(results, proxies)]
    parts_text += ["Copies (proxy /metrics):", *copies(results), quiet, *results.notes]
    md = [
        "# shadowproxy vs NGINX mirror",
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}; {env}.",
        intro,
        md_table(*table(results)),
        "## Goals",
        "\n".join(f"- {line}" for line in goals(results, proxies)),
        "## Copies",
        "\n".join(f"- {line}" for line in copies(results)),
        quiet,
        *results.notes,
    ]
    if has_plot:
        md.append(f"![latency CDF]({png.name})")
    (args.out / "bench.md").write_text("\n\n".join(md) + "\n")
    return "\n".join(parts_text) + "\n"
