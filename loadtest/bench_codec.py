"""CPU cost of the shadow side's decode -> compare stage, ours against tritonclient's decoder.

``python -m loadtest.bench_codec [--seed 0] [--reps 9] [--budget 0.25] [--out DIR]``

Two answer pairs, as a compare worker gets them (bodies and headers as bytes):

- **small JSON**: the light model's answer (``deploy/models/light_*``): ``scores`` FP32 [1, 4],
  ``probs`` FP32 [1, 4] (softmax) and ``label`` INT64 [1], in V2 JSON (~0.4 KiB a body). Two
  candidates: bit-identical (most comparisons) and diverging (the planted boost: every output
  differs and is flagged). With ``metric: auto`` the outputs get tolerance, probabilities and
  exact.
- **1 MiB binary**: ``embedding`` FP32 [1, 262144] in the binary-data extension (scored by
  cosine), the candidate the reference plus small noise.

Rows, in CPU microseconds per call (``time.process_time``, so BLAS threads count too):

- ``decode``: :func:`proxy.protocols.v2_rest.codec.decode_infer_response` of one body, against
  tritonclient's ``InferResult.from_response_body`` + ``as_numpy`` per output (what the decoder
  called before);
- ``analyze()``: :func:`proxy.shadow.analysis.analyze` of the pair (both decodes, every
  comparison, the previews) with the default table ``{"*": {"*": {"metric": "auto"}}}``;
- ``copy both arrays`` (binary pair): ``np.copyto`` of both arrays, the memory-bandwidth yardstick
  (it reads and writes each array once); the other binary rows show their GB/s over the same two
  arrays' bytes and their cost in copies.

Each cell is the median of ``--reps`` repetitions, each repetition the mean of a batch of calls
sized to ``--budget`` seconds over all repetitions; the spread is the fastest and slowest
repetition. Both decoders are timed in the same run, interleaved repetition by repetition, so a
busy host slows both alike. Goal (from the issue): analyze() of the small pair at most ~150 us.
Writes the table to stdout and to ``DIR/bench_codec.md`` (``loadtest/out`` by default).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from multidict import CIMultiDict

from proxy.protocols.v2_rest.codec import HEADER_LENGTH, decode_infer_response
from proxy.shadow.analysis import Exchange, analyze

F32 = npt.NDArray[np.float32]
COMPARISONS: Mapping[str, Mapping[str, Mapping[str, Any]]] = {"*": {"*": {"metric": "auto"}}}
SMALL_GOAL_US = 150.0
EMBEDDING = 262_144  # FP32 elements: 1 MiB


@dataclass(frozen=True, slots=True)
class Timing:
    """CPU seconds per call: the median repetition and the fastest and slowest."""

    median: float
    low: float
    high: float


@dataclass(frozen=True, slots=True)
class Row:
    pair: str
    what: str
    ours: Timing | None
    tritonclient: Timing | None = None
    nbytes: int = 0  # bytes the GB/s figure counts (0: no figure)
    copy: Timing | None = None  # the copy of both arrays, for "copies" (binary pair)


def _light_answer(seed: int, planted: bool) -> bytes:
    """The light model's V2 JSON answer for one row of features."""
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((1, 4)).astype(np.float32)
    if planted:  # as light_cand does on a planted row: boost the class after the top one
        scores[0, (int(scores.argmax()) + 1) % 4] += np.float32(4.0)
    e = np.exp(scores.astype(np.float64) - scores.max())
    probs = (e / e.sum()).astype(np.float32)
    outputs = [
        {"name": "scores", "datatype": "FP32", "shape": [1, 4], "data": scores[0].tolist()},
        {"name": "probs", "datatype": "FP32", "shape": [1, 4], "data": probs[0].tolist()},
        {"name": "label", "datatype": "INT64", "shape": [1], "data": [int(scores.argmax())]},
    ]
    body = {"model_name": "light_ref", "model_version": "1", "outputs": outputs}
    return json.dumps(body).encode()


def _binary_answer(values: F32) -> tuple[bytes, CIMultiDict[str]]:
    """A V2 answer with one FP32 output in the binary-data extension."""
    params = {"binary_data_size": values.nbytes}
    out = {"name": "embedding", "datatype": "FP32", "shape": [1, values.size], "parameters": params}
    head = json.dumps({"model_name": "m", "model_version": "1", "outputs": [out]}).encode()
    headers = CIMultiDict(
        {HEADER_LENGTH: str(len(head)), "Content-Type": "application/octet-stream"}
    )
    return head + values.tobytes(), headers


def tritonclient_decode(body: bytes, headers: Mapping[str, str]) -> dict[str, Any]:
    """Every output as tritonclient's InferResult gives it (the previous decoder's calls)."""
    from tritonclient.http import InferResult

    length = headers.get(HEADER_LENGTH)
    result = InferResult.from_response_body(
        body,
        header_length=int(length) if length else None,
        content_encoding=headers.get("Content-Encoding"),
    )
    return {o["name"]: result.as_numpy(o["name"]) for o in result.get_response()["outputs"]}


def _batch_size(fn: Callable[[], object], seconds: float) -> int:
    """Calls that take about ``seconds`` of CPU (at least 1), after two warm-up calls."""
    fn()
    fn()
    n, spent = 1, 0.0
    while spent < seconds / 8 and n < 1_000_000:
        t0 = time.process_time()
        for _ in range(n):
            fn()
        spent = time.process_time() - t0
        if spent < seconds / 8:
            n *= 4
    return max(1, int(n * seconds / max(spent, 1e-9)))


def time_together(fns: list[Callable[[], object]], reps: int, budget_s: float) -> list[Timing]:
    """CPU seconds per call of each of ``fns``, their repetitions interleaved."""
    sizes = [_batch_size(fn, budget_s / reps) for fn in fns]
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, n, out in zip(fns, sizes, samples, strict=True):
            t0 = time.process_time()
            for _ in range(n):
                fn()
            out.append((time.process_time() - t0) / n)
    return [Timing(statistics.median(s), min(s), max(s)) for s in samples]


def bench(seed: int, reps: int, budget_s: float) -> list[Row]:
    rows: list[Row] = []
    json_headers = CIMultiDict({"Content-Type": "application/json"})
    ref_body = _light_answer(seed, planted=False)
    ref = Exchange("reference", 200, json_headers, ref_body, 0.001)
    ours, theirs = time_together(
        [
            lambda: decode_infer_response(ref_body, json_headers),
            lambda: tritonclient_decode(ref_body, json_headers),
        ],
        reps,
        budget_s,
    )
    rows.append(Row("small JSON", f"decode ({len(ref_body)} B)", ours, theirs))
    for label, planted in (("identical", False), ("diverging", True)):
        cand = Exchange("candidate", 200, json_headers, _light_answer(seed, planted), 0.001)
        flagged = analyze(ref, cand, "light_ref", COMPARISONS).flagged
        assert flagged is planted, "the small pair is not the pair described"
        (t,) = time_together(
            [partial(analyze, ref, cand, "light_ref", COMPARISONS)], reps, budget_s
        )
        rows.append(Row("small JSON", f"analyze(), {label}", t))

    rng = np.random.default_rng(seed)
    a = rng.standard_normal(EMBEDDING).astype(np.float32)
    b = (a + np.float32(1e-3) * rng.standard_normal(EMBEDDING).astype(np.float32)).astype(
        np.float32
    )
    (a_body, a_headers), (b_body, b_headers) = _binary_answer(a), _binary_answer(b)
    pair_bytes = a.nbytes + b.nbytes
    dst = np.empty_like(a), np.empty_like(b)

    def copy_both() -> None:
        np.copyto(dst[0], a)
        np.copyto(dst[1], b)

    big_ref = Exchange("reference", 200, a_headers, a_body, 0.001)
    big_cand = Exchange("candidate", 200, b_headers, b_body, 0.001)
    copy_t, ours, theirs, whole = time_together(
        [
            copy_both,
            lambda: decode_infer_response(a_body, a_headers),
            lambda: tritonclient_decode(a_body, a_headers),
            lambda: analyze(big_ref, big_cand, "m", COMPARISONS),
        ],
        reps,
        budget_s,
    )
    pair = "1 MiB binary"
    rows.append(Row(pair, "copy both arrays", copy_t, nbytes=pair_bytes, copy=copy_t))
    rows.append(Row(pair, "decode (one body)", ours, theirs, nbytes=a.nbytes, copy=copy_t))
    rows.append(Row(pair, "analyze() (cosine)", whole, nbytes=pair_bytes, copy=copy_t))
    return rows


def _us(t: Timing | None) -> str:
    if t is None:
        return "-"
    return f"{t.median * 1e6:.1f} ({t.low * 1e6:.1f}-{t.high * 1e6:.1f})"


def render(rows: list[Row]) -> str:
    head = ["pair", "what", "ours CPU us", "tritonclient CPU us", "ratio", "GB/s", "copies", "goal"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ratio = "-"
        if r.ours is not None and r.tritonclient is not None:
            ratio = f"{r.tritonclient.median / r.ours.median:.1f}x"
        gbps = "-" if not (r.nbytes and r.ours) else f"{r.nbytes / r.ours.median / 1e9:.2f}"
        copies = "-"
        if r.copy is not None and r.ours is not None and r.what != "copy both arrays":
            copies = f"{r.ours.median / r.copy.median:.2f}"
        goal = "-"
        if r.what.startswith("analyze()") and r.pair == "small JSON" and r.ours is not None:
            goal = "PASS" if r.ours.median * 1e6 <= SMALL_GOAL_US else "FAIL"
        cells = [r.pair, r.what, _us(r.ours), _us(r.tritonclient), ratio, gbps, copies, goal]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    try:
        from importlib.metadata import version

        versions = f"orjson {version('orjson')}, tritonclient {version('tritonclient')}"
    except Exception:
        versions = "versions unknown"
    return (
        f"python {platform.python_version()}, numpy {np.__version__}, {versions}, "
        f"{platform.machine()} {os.cpu_count()} CPU(s), load average {load}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=9, help="repetitions per cell")
    ap.add_argument("--budget", type=float, default=0.25, help="CPU seconds of calls per cell")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = ap.parse_args(argv)
    rows = bench(args.seed, args.reps, args.budget)
    text = (
        f"{environment()}\n\n{render(rows)}\n\nCPU us per call: median (fastest-slowest) of "
        f"{args.reps} repetitions. Goal: analyze() of the small pair <= {SMALL_GOAL_US:g} us; "
        "the binary pair close to a few copies of both arrays.\n"
    )
    sys.stdout.write(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_codec.md").write_text(
        "# Decode -> compare benchmark (`python -m loadtest.bench_codec`)\n\n" + text
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
