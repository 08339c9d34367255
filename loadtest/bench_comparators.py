"""Comparator speed: ours against Polygraphy, and the element-wise metrics against memory bandwidth.

``python -m loadtest.bench_comparators [--seed 0] [--budget 0.4] [--torch] [--out DIR]``

On the same seeded fp32 reference/candidate pairs (candidate = reference + small noise), in the
same run:

- each of our metrics through :func:`comparators.compare_output` (the entry point the proxy calls:
  the validity gate and the float64 widening are part of the time);
- Polygraphy's equivalent where it has one: ``SimpleCompareFunc`` (what ``CompareFunc.simple()``
  returns, default ``check_error_stat="elemwise"``) for ``tolerance``, ``SnrCompareFunc`` for
  ``sqnr``, ``CosineSimilarityCompareFunc`` for ``cosine`` (whole tensor, where ours is per row),
  and ``TopKPostprocessFunc`` + ``IndicesCompareFunc`` (``CompareFunc.indices``) for ``argmax``
  (top-1) and ``logits`` (top-5; ours also computes the full-vocabulary KL);
- a plain ``np.copyto`` of both arrays, the memory-bandwidth yardstick: an element-wise metric
  reads ``ref.nbytes + cand.nbytes``; its GB/s is shown next to the copy's on the same bytes.

Polygraphy computes and formats its error statistics eagerly whatever the log level, so its log
severity is set to CRITICAL: the computation a user pays for is measured, the terminal is not.

Goals (from the issue): ``ratio = polygraphy / ours >= 2`` where both have the metric, and the
element-wise metrics (tolerance, sqnr, cosine) at ``>= 30 %`` of the copy bandwidth. Each time is
the median of repeated runs after a warm-up, single process, with numpy's thread pools as the
environment leaves them (the proxy scores in worker threads; the pools are reported, not changed).
Writes the table to stdout and to ``DIR/bench_comparators.md`` (``loadtest/out`` by default).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from comparators import MetricSpec, compare_output

F32 = npt.NDArray[np.float32]
SHAPES: dict[str, tuple[int, int]] = {
    "embeddings": (32, 384),
    "class scores": (64, 1000),
    "LLM logits": (128, 32000),
}
# Which of our metrics run on which output kind; probabilities get softmaxed copies of the pair.
METRICS_FOR: dict[str, tuple[str, ...]] = {
    "embeddings": ("tolerance", "sqnr", "cosine"),
    "class scores": ("tolerance", "sqnr", "cosine", "argmax", "logits", "probabilities"),
    "LLM logits": ("tolerance", "sqnr", "cosine", "argmax", "logits", "probabilities"),
}
ELEMENTWISE = frozenset({"tolerance", "sqnr", "cosine"})
MIN_RATIO = 2.0
MIN_BANDWIDTH_FRACTION = 0.30
_ENV_THREADS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True, slots=True)
class Row:
    shape: str
    metric: str
    ours_s: float
    poly_s: float | None
    poly_what: str
    gbps: float | None
    copy_gbps: float | None
    torch_s: float | None = None

    @property
    def ratio(self) -> float | None:
        return None if self.poly_s is None else self.poly_s / self.ours_s

    @property
    def bw_fraction(self) -> float | None:
        if self.gbps is None or not self.copy_gbps:
            return None
        return self.gbps / self.copy_gbps

    def verdict(self) -> str:
        checks = []
        if self.ratio is not None:
            checks.append(self.ratio >= MIN_RATIO)
        if self.bw_fraction is not None:
            checks.append(self.bw_fraction >= MIN_BANDWIDTH_FRACTION)
        if not checks:
            return "-"
        return "PASS" if all(checks) else "FAIL"


def make_pair(shape: tuple[int, int], seed: int, scale: float) -> tuple[F32, F32]:
    """A reference and a candidate that differs by noise at ~1e-4 of the reference's spread (an
    fp16-ish deviation: most elements fail fp32 tolerances, nothing flips a clear top-1)."""
    rng = np.random.default_rng(seed)
    ref = (scale * rng.standard_normal(shape)).astype(np.float32)
    noise = (1e-4 * scale * rng.standard_normal(shape)).astype(np.float32)
    return ref, (ref + noise).astype(np.float32)


def softmax32(x: F32) -> F32:
    e = np.exp(x.astype(np.float64) - x.max(axis=1, keepdims=True))
    out: F32 = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return out


def timeit(fn: Callable[[], object], budget_s: float, min_runs: int = 5) -> float:
    """Median seconds per call: two warm-up calls, then runs until ``budget_s`` is spent (at least
    ``min_runs``, at most 2000)."""
    fn()
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < 2000):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _polygraphy() -> Any:
    try:
        import polygraphy.comparator.compare as pc
        from polygraphy.comparator import postprocess
        from polygraphy.comparator.struct import IterationResult
        from polygraphy.logger import G_LOGGER
    except ImportError:
        return None
    G_LOGGER.module_severity = G_LOGGER.CRITICAL
    return pc, postprocess, IterationResult


def polygraphy_call(
    poly: Any, metric: str, ref: F32, cand: F32
) -> tuple[Callable[[], object], str]:
    """A zero-argument call of Polygraphy's equivalent of ``metric`` (None if it has none).
    Runner 1 divides in Polygraphy's relative error, so the reference goes second."""
    pc, post, iteration_result = poly

    def pair() -> tuple[Any, Any]:
        return (
            iteration_result({"out": cand}, runner_name="candidate"),
            iteration_result({"out": ref}, runner_name="reference"),
        )

    if metric == "tolerance":
        simple = pc.SimpleCompareFunc()
        return (lambda: simple(*pair())), "simple (elemwise)"
    if metric == "sqnr":
        snr = pc.SnrCompareFunc()
        return (lambda: snr(*pair())), "SnrCompareFunc"
    if metric == "cosine":
        cos = pc.CosineSimilarityCompareFunc()
        return (lambda: cos(*pair())), "CosineSimilarity (flat)"
    k = {"argmax": 1, "logits": 5}.get(metric)
    if k is None:
        raise KeyError(metric)
    topk, indices = post.TopKPostprocessFunc(k=k), pc.IndicesCompareFunc()

    def run() -> object:
        a, b = pair()
        return indices(topk(a), topk(b))

    return run, f"top-{k} + indices"


def torch_call(metric: str, ref: F32, cand: F32) -> Callable[[], object] | None:
    try:
        import torch
    except ImportError:
        return None
    tr, tc = torch.from_numpy(ref), torch.from_numpy(cand)
    spec = MetricSpec(metric=metric)
    return lambda: compare_output("out", tr, tc, spec)


def bench(seed: int, budget_s: float, with_torch: bool) -> list[Row]:
    poly = _polygraphy()
    rows: list[Row] = []
    for i, (kind, shape) in enumerate(SHAPES.items()):
        ref, cand = make_pair(shape, seed + i, 1.0 if kind == "embeddings" else 3.0)
        probs = softmax32(ref), softmax32(cand)
        dst = np.empty_like(ref), np.empty_like(cand)

        def copy_both(r: F32 = ref, c: F32 = cand, d: tuple[F32, F32] = dst) -> None:
            np.copyto(d[0], r)
            np.copyto(d[1], c)

        copy_s = timeit(copy_both, budget_s)
        nbytes = ref.nbytes + cand.nbytes
        copy_gbps = nbytes / copy_s / 1e9
        for metric in METRICS_FOR[kind]:
            r, c = probs if metric == "probabilities" else (ref, cand)
            spec = MetricSpec(metric=metric)
            ours_s = timeit(lambda r=r, c=c, s=spec: compare_output("out", r, c, s), budget_s)
            poly_s, what = None, "-"
            if poly is not None and metric != "probabilities":
                fn, what = polygraphy_call(poly, metric, r, c)
                poly_s = timeit(fn, budget_s)
            torch_s = None
            if with_torch:
                tfn = torch_call(metric, r, c)
                torch_s = None if tfn is None else timeit(tfn, budget_s)
            elementwise = metric in ELEMENTWISE
            rows.append(
                Row(
                    shape=f"{kind} {shape[0]}x{shape[1]}",
                    metric=metric,
                    ours_s=ours_s,
                    poly_s=poly_s,
                    poly_what=what,
                    gbps=nbytes / ours_s / 1e9 if elementwise else None,
                    copy_gbps=copy_gbps if elementwise else None,
                    torch_s=torch_s,
                )
            )
    return rows


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def render(rows: list[Row], with_torch: bool) -> str:
    head = [
        "shape",
        "metric",
        "ours ms",
        "polygraphy ms",
        "polygraphy func",
        "ratio",
        "GB/s",
        "copy GB/s",
        "% of copy",
        "goal",
    ]
    if with_torch:
        head.insert(3, "torch-cpu ms")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r.shape,
            r.metric,
            f"{r.ours_s * 1e3:.3f}",
            _num(None if r.poly_s is None else r.poly_s * 1e3, ".3f"),
            r.poly_what,
            _num(r.ratio, ".2f"),
            _num(r.gbps, ".2f"),
            _num(r.copy_gbps, ".2f"),
            _num(None if r.bw_fraction is None else 100 * r.bw_fraction, ".0f"),
            r.verdict(),
        ]
        if with_torch:
            cells.insert(3, _num(None if r.torch_s is None else r.torch_s * 1e3, ".3f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment() -> str:
    try:
        from threadpoolctl import threadpool_info

        pools = "; ".join(
            f"{p.get('internal_api')} {p.get('version')} threads={p.get('num_threads')}"
            for p in threadpool_info()
        )
    except ImportError:
        pools = "threadpoolctl not installed"
    env = ", ".join(f"{k}={os.environ.get(k, 'unset')}" for k in _ENV_THREADS)
    try:
        from importlib.metadata import version

        poly = version("polygraphy")
    except Exception:
        poly = "not installed"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"python {platform.python_version()}, numpy {np.__version__}, polygraphy {poly}, "
        f"{platform.machine()} {os.cpu_count()} CPU(s), load average {load}\n"
        f"thread pools: {pools or 'none loaded'}\nenv: {env}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=float, default=0.4, help="seconds of timed runs per cell")
    ap.add_argument("--torch", action="store_true", help="also time torch CPU tensors")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = ap.parse_args(argv)
    rows = bench(args.seed, args.budget, args.torch)
    table = render(rows, args.torch)
    failed = [r for r in rows if r.verdict() == "FAIL"]
    summary = (
        f"goals: ratio >= {MIN_RATIO:g} vs Polygraphy, element-wise >= "
        f"{100 * MIN_BANDWIDTH_FRACTION:.0f}% of copy bandwidth; "
        f"{len(failed)} of {sum(r.verdict() != '-' for r in rows)} rows miss a goal"
    )
    text = f"{environment()}\n\n{table}\n\n{summary}\n"
    sys.stdout.write(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_comparators.md").write_text(
        "# Comparator benchmark (`python -m loadtest.bench_comparators`)\n\n" + text
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
