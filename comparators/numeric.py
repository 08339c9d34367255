"""Dense-tensor comparators: element-wise tolerance, SQNR and per-row cosine similarity."""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

from comparators.base import (
    F64,
    SEVERITY_CAP,
    Array,
    Scored,
    as_rows_leading_axis,
    clamp,
    energies,
    fmt,
    param,
    sqnr_db,
)

# Polygraphy replaces exact zeros of the dividing side with machine epsilon; so do we.
_EPS = float(np.finfo(np.float64).eps)

TOLERANCE_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {"atol": 1e-5, "rtol": 1e-5, "max_fail_fraction": 0.0}
)
# (atol, rtol) when either side is stored in a narrow float: the rounding of the format alone
# would fail the fp32 defaults. fp16/bf16 rtol follow torch.testing's table; atol is raised to
# match, since under the AND rule atol only matters where the reference is near zero.
PRECISION_TOLERANCES: Mapping[str, tuple[float, float]] = MappingProxyType(
    {
        "full": (1e-5, 1e-5),
        "float16": (1e-3, 1e-3),
        "bfloat16": (1.6e-2, 1.6e-2),
        "float8": (1.25e-1, 1.25e-1),
    }
)
SQNR_DEFAULTS: Mapping[str, Any] = MappingProxyType({"min_sqnr_db": 30.0})
COSINE_DEFAULTS: Mapping[str, Any] = MappingProxyType({"min_cosine": 0.999})


def _flat(x: Array) -> F64:
    return np.asarray(x, dtype=np.float64).reshape(-1)


@np.errstate(all="ignore")
def tolerance(ref: Array, cand: Array, params: Mapping[str, Any]) -> Scored:
    """Polygraphy ``CompareFunc.simple`` (elemwise): an element fails when ``|a-b| > atol`` and
    ``|a-b|/|ref| > rtol``. Severity is the worst ``|a-b| / max(atol, rtol*|ref|)``, so an element
    fails exactly when its ratio exceeds 1."""
    atol = float(param(params, TOLERANCE_DEFAULTS, "atol"))
    rtol = float(param(params, TOLERANCE_DEFAULTS, "rtol"))
    max_fail = float(param(params, TOLERANCE_DEFAULTS, "max_fail_fraction"))
    r, c = _flat(ref), _flat(cand)
    names = ("max_abs", "mean_abs", "median_abs", "p99_abs", "max_rel", "mean_rel")
    if r.size == 0:
        zero = dict.fromkeys((*names, "fail_fraction", "argmax_abs", "tol_ratio"), 0.0)
        return Scored({**zero, "sqnr_db": sqnr_db(r, c)}, "max_abs", 0.0, False)
    diff = np.abs(r - c)
    mag = np.abs(r)
    rel = diff / np.where(mag == 0.0, _EPS, mag)
    fails = (diff > atol) & (rel > rtol)
    limit = np.maximum(atol, rtol * mag)
    ratio = np.where(diff == 0.0, 0.0, diff / limit)
    worst = int(np.argmax(diff))
    n_fail = int(np.count_nonzero(fails))
    fail_fraction = n_fail / r.size
    severity = clamp(float(np.max(ratio)))
    # One selection pass for both quantiles instead of two.
    median, p99 = np.quantile(diff, [0.5, 0.99])
    scores = {
        "max_abs": float(diff[worst]),
        "mean_abs": float(np.mean(diff)),
        "median_abs": float(median),
        "p99_abs": float(p99),
        "max_rel": float(np.max(rel)),
        "mean_rel": float(np.mean(rel)),
        "fail_fraction": fail_fraction,
        "argmax_abs": float(worst),
        "tol_ratio": severity,
        "sqnr_db": sqnr_db(r, c),
    }
    flagged = fail_fraction > max_fail
    reason = ""
    if flagged:
        reason = (
            f"{n_fail} of {r.size} elements exceed atol={atol:g} and rtol={rtol:g}; "
            f"max abs error {fmt(scores['max_abs'])} at flat index {worst} "
            f"(reference {fmt(float(r[worst]))}, candidate {fmt(float(c[worst]))})"
        )
    return Scored(scores, "max_abs", severity, flagged, reason)


@np.errstate(all="ignore")
def sqnr(ref: Array, cand: Array, params: Mapping[str, Any]) -> Scored:
    """Signal-to-quantization-noise ratio in dB, the reference as the signal. Severity is the
    relative L2 error ``||ref-cand|| / ||ref||`` (0.032 at 30 dB)."""
    floor = float(param(params, SQNR_DEFAULTS, "min_sqnr_db"))
    r, c = _flat(ref), _flat(cand)
    db = sqnr_db(r, c)
    signal, noise = energies(r, c)
    if noise == 0.0:
        severity = 0.0
    elif signal == 0.0:
        severity = SEVERITY_CAP
    else:
        severity = clamp(math.sqrt(noise) / math.sqrt(signal))
    max_abs = float(np.max(np.abs(r - c))) if r.size else 0.0
    scores = {"sqnr_db": db, "max_abs": max_abs, "rel_l2": severity}
    flagged = db < floor
    reason = (
        f"SQNR {db:.2f} dB < {floor:g} dB (relative L2 error {fmt(severity)})" if flagged else ""
    )
    return Scored(scores, "sqnr_db", severity, flagged, reason)


def _row_scale(rows: F64) -> F64:
    # Cosine and the norm ratio are scale-free, so each row is divided by its largest magnitude
    # first: squares then neither overflow for huge values nor underflow for tiny ones.
    scale = np.max(np.abs(rows), axis=1) if rows.shape[1] else np.zeros(rows.shape[0])
    return np.where(scale > 0.0, scale, 1.0)


@np.errstate(all="ignore")
def cosine(ref: Array, cand: Array, params: Mapping[str, Any]) -> Scored:
    """Per-row cosine similarity and norm ratio ``||cand||/||ref||``; rows are the leading axis
    when ``ndim >= 2``. Two zero rows count as identical, one zero row as orthogonal."""
    threshold = float(param(params, COSINE_DEFAULTS, "min_cosine"))
    r, c = as_rows_leading_axis(ref), as_rows_leading_axis(cand)
    sr, sc = _row_scale(r), _row_scale(c)
    rn, cn = r / sr[:, None], c / sc[:, None]
    nr, nc = np.linalg.norm(rn, axis=1), np.linalg.norm(cn, axis=1)
    dot = np.einsum("ij,ij->i", rn, cn)
    ref_zero, cand_zero = nr == 0.0, nc == 0.0
    cos = np.clip(np.where(ref_zero | cand_zero, 0.0, dot / (nr * nc)), -1.0, 1.0)
    # Rounding can leave identical rows a hair under 1: identical means severity exactly 0.
    same = np.all(r == c, axis=1)
    cos = np.where(same | (ref_zero & cand_zero), 1.0, cos)
    ratio = np.where(ref_zero, np.where(cand_zero, 1.0, np.inf), (nc * sc) / (nr * sr))
    ratio = np.where(same, 1.0, ratio)
    worst = int(np.argmin(cos))
    min_cos = float(cos[worst])
    scores = {
        "min_cosine": min_cos,
        "mean_cosine": float(np.mean(cos)),
        "min_norm_ratio": clamp(float(np.min(ratio))),
        "max_norm_ratio": clamp(float(np.max(ratio))),
        "argmin_cosine": float(worst),
    }
    flagged = min_cos < threshold
    reason = ""
    if flagged:
        if ref_zero[worst] != cand_zero[worst]:
            side = "reference" if ref_zero[worst] else "candidate"
            reason = f"row {worst}: the {side} vector is all zeros and the other is not"
        else:
            reason = (
                f"min cosine {min_cos:.6f} < {threshold:g} at row {worst} "
                f"(norm ratio {fmt(float(ratio[worst]))})"
            )
    return Scored(scores, "min_cosine", max(0.0, 1.0 - min_cos), flagged, reason)


def default_tolerances(precision: str) -> dict[str, float]:
    atol, rtol = PRECISION_TOLERANCES.get(precision, PRECISION_TOLERANCES["full"])
    return {"atol": atol, "rtol": rtol}
