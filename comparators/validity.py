"""The validity gate run before any metric: conversion, shape, dtype, emptiness and NaN/Inf.

A pair that cannot be scored becomes an :class:`~comparators.types.OutputVerdict` with a reason;
a pair that can is returned as :class:`Prepared`. numpy's float16/32/64 arrays are passed on as
they are (the caller's memory, read-only: metrics widen them to float64 a cache-sized block at a
time, which is exact and avoids a full-size float64 copy); other floats (bf16, float8) are
widened to float64 copies here.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from comparators.base import SEVERITY_CAP, SMALL, Array, Quiet, all_finite_small, source
from comparators.types import OutputVerdict, Validity

Group = Literal["float", "int", "bool", "text", "unsupported"]
_COUNT_KEYS = ("ref_nan", "cand_nan", "ref_inf", "cand_inf")
TEXT_METRICS = frozenset({"exact_text", "exact"})
_GROUP_WORDS = {
    "float": "floating point",
    "int": "integer",
    "bool": "boolean",
    "text": "text/bytes",
    "unsupported": "unsupported",
}


def to_numpy(x: Any) -> Array:
    """A numpy view of ``x``; torch tensors are converted without importing torch here."""
    if type(x).__module__.startswith("torch"):
        t = x.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            # numpy has no bf16: go through fp32 (exact) and back to ml_dtypes' bf16 when it is
            # installed, so the bf16 tolerance defaults still apply.
            arr = np.asarray(t.float().numpy())
            try:
                import ml_dtypes
            except ImportError:
                return arr
            return arr.astype(ml_dtypes.bfloat16)
        return np.asarray(t.numpy())
    return np.asarray(x)


def group_of(dtype: np.dtype[Any]) -> Group:
    kind = dtype.kind
    if kind in "OSU":
        return "text"
    if kind == "b":
        return "bool"
    if kind in "iu":
        return "int"
    if kind == "f":
        return "float"
    if kind == "V":
        # ml_dtypes (bfloat16, float8_*, int4) register as void-kind dtypes.
        if dtype.name.startswith(("bfloat", "float")):
            return "float"
        if dtype.name.startswith(("int", "uint")):
            return "int"
    return "unsupported"


# Float families from the least precise: the first one present among a pair's dtypes wins.
_PRECISIONS = ("float8", "bfloat16", "float16", "full")
# dtype -> the index of its family; dtype.name costs microseconds in numpy 1.x and every float
# pair asks.
_RANK: dict[np.dtype[Any], int] = {}


def _rank(dtype: np.dtype[Any]) -> int:
    name = dtype.name
    if name.startswith("float8"):
        return 0
    return {"bfloat16": 1, "float16": 2}.get(name, 3)


def precision_of(*dtypes: np.dtype[Any]) -> str:
    """The least precise float family among ``dtypes``: it decides the tolerance defaults."""
    best = 3
    for d in dtypes:
        rank = _RANK.get(d)
        if rank is None:
            rank = _RANK[d] = _rank(d)
        best = min(best, rank)
    return _PRECISIONS[best]


class Prepared(NamedTuple):
    """A pair that passed the gate. ``matched`` marks positions non-finite identically on both
    sides (None when there are none); ``counts`` holds the per-side NaN/Inf counts. A named
    tuple: immutable, and built in a fraction of a frozen dataclass's time (one per output)."""

    ref: Array
    cand: Array
    group: Group
    precision: str
    counts: dict[str, float]
    matched: npt.NDArray[np.bool_] | None


def invalid(
    name: str, metric: str, validity: Validity, reason: str, **scores: float
) -> OutputVerdict:
    return OutputVerdict(
        output=name,
        metric=metric,
        validity=validity,
        scores=dict(scores),
        severity=SEVERITY_CAP,
        flagged=True,
        reason=reason,
    )


def _to_text(a: Array) -> npt.NDArray[np.object_]:
    # tritonclient yields bytes for binary BYTES and str for JSON BYTES: one representation.
    flat = [
        v.decode("utf-8", errors="replace") if isinstance(v, bytes | bytearray) else str(v)
        for v in a.reshape(-1).tolist()
    ]
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(a.shape)


def _first(mask: npt.NDArray[np.bool_]) -> int:
    return int(np.flatnonzero(mask)[0])


_F16 = np.dtype(np.float16)
_F32 = np.dtype(np.float32)


def _sum(a: Array) -> float:
    # np.add.reduce over every axis is what np.sum runs, without its Python wrapper.
    return float(np.add.reduce(a, axis=None, dtype=_F32 if a.dtype == _F16 else None))


def _nonfinite(name: str, metric: str, r: Array, c: Array) -> OutputVerdict | Prepared:
    ref, cand = source(r), source(c)
    prec = precision_of(r.dtype, c.dtype)
    # Fast path without temporaries: a finite sum proves every element finite (NaN and Inf
    # propagate); a non-finite sum (or one that overflowed, then exactly re-checked) falls
    # through to the element-wise check. float16 sums in float32, whose range it cannot exceed.
    # A few elements are checked one by one instead, which is cheaper than two numpy sums.
    if ref.size <= SMALL:
        finite = all_finite_small(ref) and all_finite_small(cand)
    else:
        with Quiet():
            finite = math.isfinite(_sum(ref)) and math.isfinite(_sum(cand))
    if finite:
        return Prepared(ref, cand, "float", prec, dict.fromkeys(_COUNT_KEYS, 0.0), None)
    fr, fc = np.isfinite(ref), np.isfinite(cand)
    counts = {
        "ref_nan": float(np.count_nonzero(np.isnan(ref))),
        "cand_nan": float(np.count_nonzero(np.isnan(cand))),
        "ref_inf": float(np.count_nonzero(np.isinf(ref))),
        "cand_inf": float(np.count_nonzero(np.isinf(cand))),
    }
    if fr.all() and fc.all():
        return Prepared(ref, cand, "float", prec, counts, None)
    only_cand = fr & ~fc
    if only_cand.any():
        n = int(np.count_nonzero(only_cand))
        return invalid(
            name,
            metric,
            Validity.NON_FINITE,
            f"candidate has {n} NaN/Inf value(s) where the reference is finite "
            f"(first at flat index {_first(only_cand)})",
            **counts,
        )
    only_ref = fc & ~fr
    if only_ref.any():
        # Not the candidate's fault, but a divergence a reviewer must see.
        n = int(np.count_nonzero(only_ref))
        return invalid(
            name,
            metric,
            Validity.NON_FINITE,
            f"reference has {n} NaN/Inf value(s) where the candidate is finite "
            f"(first at flat index {_first(only_ref)})",
            **counts,
        )
    both = ~fr
    same = (np.isnan(ref) & np.isnan(cand)) | (ref == cand)
    differ = both & ~same
    if differ.any():
        return invalid(
            name,
            metric,
            Validity.NON_FINITE,
            f"{int(np.count_nonzero(differ))} position(s) are non-finite on both sides but differ "
            f"(NaN vs Inf or opposite infinities; first at flat index {_first(differ)})",
            **counts,
        )
    return Prepared(ref, cand, "float", prec, counts, both)


def check_pair(name: str, metric: str, ref: Array, cand: Array) -> OutputVerdict | Prepared:
    """Run the gate; ``metric`` is the resolved metric name (never ``"auto"``)."""
    if ref.shape != cand.shape:
        return invalid(
            name,
            metric,
            Validity.SHAPE_MISMATCH,
            f"shape {ref.shape} in the reference, {cand.shape} in the candidate",
        )
    gr, gc = group_of(ref.dtype), group_of(cand.dtype)
    if "unsupported" in (gr, gc):
        bad = ref.dtype if gr == "unsupported" else cand.dtype
        return invalid(name, metric, Validity.UNSUPPORTED, f"dtype {bad} is not supported")
    if gr != gc:
        return invalid(
            name,
            metric,
            Validity.DTYPE_MISMATCH,
            f"reference dtype {ref.dtype} ({_GROUP_WORDS[gr]}), "
            f"candidate dtype {cand.dtype} ({_GROUP_WORDS[gc]})",
        )
    if ref.size == 0:
        return OutputVerdict(output=name, metric=metric, validity=Validity.EMPTY, scores={})
    if (gr == "text" and metric not in TEXT_METRICS) or (gr != "text" and metric == "exact_text"):
        return invalid(
            name,
            metric,
            Validity.UNSUPPORTED,
            f"metric '{metric}' cannot score {_GROUP_WORDS[gr]} outputs (dtype {ref.dtype})",
        )
    if gr == "text":
        return Prepared(_to_text(ref), _to_text(cand), "text", "full", {}, None)
    if gr == "float":
        return _nonfinite(name, metric, ref, cand)
    return Prepared(ref, cand, gr, "full", {}, None)
