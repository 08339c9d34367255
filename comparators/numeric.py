"""Dense-tensor comparators: element-wise tolerance, SQNR and per-row cosine similarity."""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from comparators.base import (
    BLOCK,
    F64,
    SAFE_LO,
    SEVERITY_CAP,
    SMALL,
    Array,
    Scored,
    as_rows_leading_axis,
    clamp,
    db_from,
    energies_scaled,
    energies_usable,
    energy_pass,
    fmt,
    param,
    quiet,
    source,
    sqnr_db,
    widen,
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


_QUANTILES = np.array([0.5, 0.99])
_QUANTILE_LIST: tuple[float, ...] = tuple(_QUANTILES.tolist())
# The quantiles are exact order statistics found without sorting everything: a strided sample of
# the errors brackets each wanted rank (``_Z`` standard deviations of the sample rank either side),
# the one pass counts the errors under each bracket and keeps those inside, and only those are
# partitioned. A bracket that misses (possible only for adversarial orderings) falls back to a
# full partition, so the result never depends on the sample.
_SAMPLE = 32768
_Z = 4.5
_F64 = np.dtype(np.float64)


def _flat(x: Array) -> Array:
    return source(x).reshape(-1)


def quantile_positions(n: int) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], F64]:
    """``np.quantile``'s linear-method indices and weights for :data:`_QUANTILES`, with its
    arithmetic, so the interpolated values match it bit for bit."""
    virtual = (n - 1) * _QUANTILES
    prev = np.floor(virtual).astype(np.intp)
    nxt = prev + 1
    top = virtual >= n - 1
    prev[top], nxt[top] = n - 1, n - 1
    gamma: F64 = virtual - prev
    return prev, nxt, gamma


def lerp(a: F64, b: F64, t: F64) -> F64:
    # numpy's _lerp: from the nearer end, so t=0 and t=1 give a and b exactly.
    d = b - a
    out: F64 = np.where(t >= 0.5, b - d * (1 - t), a + d * t)
    return out


def _positions(n: int) -> tuple[list[int], list[int], list[float]]:
    """:func:`quantile_positions` in Python numbers: the same float64 operations one element at
    a time (IEEE arithmetic rounds alike in both), without a dozen tiny-array calls."""
    prev, nxt, gamma = [], [], []
    for q in _QUANTILE_LIST:
        virtual = (n - 1) * q
        lo = math.floor(virtual)
        hi = lo + 1
        if virtual >= n - 1:
            lo = hi = n - 1
        prev.append(lo)
        nxt.append(hi)
        gamma.append(virtual - lo)
    return prev, nxt, gamma


def _lerp1(a: float, b: float, t: float) -> float:
    """:func:`lerp` of one element, with its operations in its order."""
    d = b - a
    return b - d * (1 - t) if t >= 0.5 else a + d * t


class _Brackets:
    """Per wanted rank pair, ``[lo, hi]`` value bounds from a sample; collects the errors inside
    and counts those below during the blocked pass."""

    def __init__(self, r: Array, c: Array, ranks: npt.NDArray[np.intp]) -> None:
        n = r.size
        step = max(1, n // _SAMPLE)
        s = np.abs(np.subtract(r[::step], c[::step], dtype=np.float64))
        m = s.size
        pos = ranks * ((m - 1) / max(1, n - 1))
        p = ranks / max(1, n - 1)
        half = _Z * np.sqrt(m * p * (1 - p)) + 2
        lo_at = np.clip(np.floor(pos - half), 0, m - 1).astype(np.intp)
        hi_at = np.clip(np.ceil(pos + half), 0, m - 1).astype(np.intp)
        s.partition(np.unique(np.concatenate((lo_at, hi_at))))
        self.lo, self.hi = s[lo_at], s[hi_at]
        # Ranks at the ends of the sample get open brackets: nothing is missed below or above.
        self.lo[lo_at == 0] = -np.inf
        self.hi[hi_at == m - 1] = np.inf
        self.below = np.zeros(len(ranks), dtype=np.intp)
        self.inside: list[list[F64]] = [[] for _ in ranks]

    def add(self, d: F64, under: npt.NDArray[np.bool_], within: npt.NDArray[np.bool_]) -> None:
        for j in range(len(self.lo)):
            np.less(d, self.lo[j], out=under)
            np.less_equal(d, self.hi[j], out=within)
            self.below[j] += np.count_nonzero(under)
            # Everything under lo is also <= hi: the XOR is exactly lo <= d <= hi.
            np.not_equal(under, within, out=within)
            self.inside[j].append(d[within])

    def values(self, ranks: npt.NDArray[np.intp]) -> F64 | None:
        out = np.empty(len(ranks))
        for j, k in enumerate(ranks):
            got = np.concatenate(self.inside[j]) if self.inside[j] else np.empty(0)
            local = int(k) - int(self.below[j])
            if not 0 <= local < got.size:
                return None
            got.partition(local)
            out[j] = got[local]
        return out


def _order_stats(r: Array, c: Array, ranks: list[int]) -> list[float]:
    """Fallback (and the small-input path): the order statistics of ``|r - c|`` by a full
    partition."""
    d = np.abs(np.subtract(r, c, dtype=np.float64))
    d.partition(sorted(set(ranks)))
    out: list[float] = d[ranks].tolist()
    return out


def _tolerance_small(r: Array, c: Array, atol: float, rtol: float) -> dict[str, float] | None:
    """:func:`_tolerance_pass` for a few elements, or None where it must run instead (NaN or
    Inf, squares that overflow, ``atol <= 0`` or ``rtol < 0``, where zero limits and signed
    zeros take numpy's rules). The sums and dot products are numpy's own calls on float64 arrays
    of the same values, so their rounding is unchanged; the rest (maxima, counts, ratios, order
    statistics) is exact arithmetic that Python floats carry out identically."""
    if not (atol > 0.0 and rtol >= 0.0):
        return None
    n = r.size
    rb = r if r.dtype == _F64 else r.astype(_F64)  # widening is exact
    cb = c if c.dtype == _F64 else c.astype(_F64)
    d = np.subtract(rb, cb)
    signal, noise = float(np.dot(rb, rb)), float(np.dot(d, d))
    if not (math.isfinite(signal) and math.isfinite(noise)):
        return None  # every value is finite past this point
    np.abs(d, out=d)
    errors = d.tolist()
    best, worst = -1.0, 0
    max_rel = max_ratio = 0.0
    n_fail = 0
    rel = []
    for i, (e, ref) in enumerate(zip(errors, rb.tolist(), strict=True)):
        m = abs(ref)
        # Polygraphy's rule: a zero reference divides by machine epsilon instead.
        q = e / m if m != 0.0 else e / _EPS
        rel.append(q)
        limit = m * rtol
        ratio = e / (limit if limit >= atol else atol)  # np.maximum(limit, atol), atol > 0
        if e > best:  # strictly: the first of equal maxima wins, as np.argmax does
            best, worst = e, i
        if q > max_rel:
            max_rel = q
        if ratio > max_ratio:
            max_ratio = ratio
        if q > rtol and e > atol:
            n_fail += 1
    prev, nxt, gamma = _positions(n)
    ordered = sorted(errors)
    quantiles = zip(prev, nxt, gamma, strict=True)
    median, p99 = (_lerp1(ordered[a], ordered[b], g) for a, b, g in quantiles)
    if not energies_usable(signal, noise, best):
        signal, noise = energies_scaled(r.astype(np.float64), c.astype(np.float64))
    # The blocked pass adds each block's sum to 0.0: so does this.
    sum_abs = 0.0 + float(np.add.reduce(d))
    sum_rel = 0.0 + float(np.add.reduce(np.array(rel)))
    return {
        "max_abs": best,
        "mean_abs": sum_abs / n,
        "median_abs": median,
        "p99_abs": p99,
        "max_rel": max_rel,
        "mean_rel": sum_rel / n,
        "fail_fraction": n_fail / n,
        "argmax_abs": float(worst),
        "tol_ratio": clamp(max_ratio),
        "sqnr_db": db_from(signal, noise),
    }


def _tolerance_pass(r: Array, c: Array, atol: float, rtol: float) -> dict[str, float]:
    """Every tolerance statistic in one blocked pass over the pair (float64 buffers that stay in
    cache); the per-element formulas are those of the docstring of :func:`tolerance`. Called by
    it only, with floating-point errors ignored."""
    n = r.size
    if n <= SMALL:  # a dozen numpy calls on a few elements cost more than the Python loop
        few = _tolerance_small(r, c, atol, rtol)
        if few is not None:
            return few
    prev, nxt, gamma = _positions(n)
    ranks = prev + nxt
    small = n <= 2 * _SAMPLE
    brackets = None if small else _Brackets(r, c, np.array(ranks, dtype=np.intp))
    size = min(BLOCK, n)
    buf = np.empty((4, size))
    under, within = np.empty(size, dtype=bool), np.empty(size, dtype=bool)
    best, worst = -1.0, 0
    sum_abs = sum_rel = signal = noise = 0.0
    max_rel = max_ratio = 0.0
    n_fail = 0
    for i in range(0, n, BLOCK):
        rb, cb = widen(r[i : i + BLOCK], buf[0]), widen(c[i : i + BLOCK], buf[1])
        m = rb.size
        d, t = buf[2, :m], buf[3, :m]
        np.subtract(rb, cb, out=d)
        signal += float(np.dot(rb, rb))
        noise += float(np.dot(d, d))
        np.abs(d, out=d)
        # The array methods run the reductions np.argmax/np.sum/np.max/np.min run, minus their
        # Python wrappers (microseconds each, the whole cost of a small output).
        at = int(d.argmax())
        if d[at] > best:  # strictly: the first of equal maxima wins, as np.argmax does
            best, worst = float(d[at]), i + at
        sum_abs += float(d.sum())
        # cb is done with: its buffer takes |ref| (cb itself may be the caller's array).
        mag = np.abs(rb, out=buf[1, :m])
        u, w = under[:m], within[:m]
        np.divide(d, mag, out=t)
        if mag.min() == 0.0:
            # Polygraphy's rule: a zero reference divides by machine epsilon instead.
            zero = mag == 0.0
            t[zero] = d[zero] / _EPS
        max_rel = max(max_rel, float(t.max()))
        sum_rel += float(t.sum())
        np.greater(t, rtol, out=u)
        np.greater(d, atol, out=w)
        n_fail += int(np.count_nonzero(np.logical_and(u, w, out=u)))
        np.multiply(mag, rtol, out=t)
        np.maximum(t, atol, out=t)
        np.divide(d, t, out=t)
        # 0/0 (identical where the limit is 0) is NaN and means ratio 0: fmax skips NaN.
        block_ratio = float(np.fmax.reduce(t)) if atol == 0.0 else float(t.max())
        if block_ratio > max_ratio:
            max_ratio = block_ratio
        if brackets is not None:
            brackets.add(d, u, w)
    found = None if brackets is None else brackets.values(np.array(ranks, dtype=np.intp))
    stats = _order_stats(r, c, ranks) if found is None else found.tolist()
    k = len(prev)
    median, p99 = (_lerp1(stats[j], stats[k + j], gamma[j]) for j in range(k))
    if not energies_usable(signal, noise, best):
        signal, noise = energies_scaled(r.astype(np.float64), c.astype(np.float64))
    return {
        "max_abs": best,
        "mean_abs": sum_abs / n,
        "median_abs": float(median),
        "p99_abs": float(p99),
        "max_rel": max_rel,
        "mean_rel": sum_rel / n,
        "fail_fraction": n_fail / n,
        "argmax_abs": float(worst),
        "tol_ratio": clamp(max_ratio),
        "sqnr_db": db_from(signal, noise),
    }


@quiet
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
    scores = _tolerance_pass(r, c, atol, rtol)
    severity = scores["tol_ratio"]
    worst = int(scores["argmax_abs"])
    fail_fraction = scores["fail_fraction"]
    flagged = fail_fraction > max_fail
    reason = ""
    if flagged:
        n_fail = round(fail_fraction * r.size)
        rv, cv = float(r[worst]), float(c[worst])
        reason = tolerance_reason(n_fail, r.size, atol, rtol, scores["max_abs"], worst, rv, cv)
    return Scored(scores, "max_abs", severity, flagged, reason)


def tolerance_reason(
    n_fail: int, n: int, atol: float, rtol: float, max_abs: float, worst: int, rv: float, cv: float
) -> str:
    return (
        f"{n_fail} of {n} elements exceed atol={atol:g} and rtol={rtol:g}; "
        f"max abs error {fmt(max_abs)} at flat index {worst} "
        f"(reference {fmt(rv)}, candidate {fmt(cv)})"
    )


def sqnr_reason(db: float, floor: float, severity: float) -> str:
    return f"SQNR {db:.2f} dB < {floor:g} dB (relative L2 error {fmt(severity)})"


@quiet
def rel_l2_severity(signal: float, noise: float) -> float:
    """``||ref-cand|| / ||ref||`` from the two energies (0 for identical, the cap for a zero
    reference with a nonzero difference)."""
    if noise == 0.0:
        return 0.0
    if signal == 0.0:
        return SEVERITY_CAP
    return clamp(math.sqrt(noise) / math.sqrt(signal))


def sqnr(ref: Array, cand: Array, params: Mapping[str, Any]) -> Scored:
    """Signal-to-quantization-noise ratio in dB, the reference as the signal. Severity is the
    relative L2 error ``||ref-cand|| / ||ref||`` (0.032 at 30 dB)."""
    floor = float(param(params, SQNR_DEFAULTS, "min_sqnr_db"))
    r, c = _flat(ref), _flat(cand)
    signal, noise, max_abs = energy_pass(r, c)
    db = db_from(signal, noise)
    severity = rel_l2_severity(signal, noise)
    scores = {"sqnr_db": db, "max_abs": max_abs, "rel_l2": severity}
    flagged = db < floor
    reason = sqnr_reason(db, floor, severity) if flagged else ""
    return Scored(scores, "sqnr_db", severity, flagged, reason)


def _row_scale(rows: F64) -> F64:
    # Cosine and the norm ratio are scale-free, so each row is divided by its largest magnitude
    # first: squares then neither overflow for huge values nor underflow for tiny ones.
    scale = np.max(np.abs(rows), axis=1) if rows.shape[1] else np.zeros(rows.shape[0])
    return np.where(scale > 0.0, scale, 1.0)


def _cosine_scaled(ref: Array, cand: Array) -> tuple[F64, F64, F64, F64, npt.NDArray[np.bool_]]:
    """``(cos, ratio, ||ref||, ||cand||, same)`` per row (cos unclipped, norms up to a per-row
    factor), each row rescaled by its largest magnitude: the path for float64 rows whose plain
    sums of squares over- or underflow."""
    r, c = as_rows_leading_axis(ref), as_rows_leading_axis(cand)
    sr, sc = _row_scale(r), _row_scale(c)
    rn, cn = r / sr[:, None], c / sc[:, None]
    nr, nc = np.linalg.norm(rn, axis=1), np.linalg.norm(cn, axis=1)
    cos = np.einsum("ij,ij->i", rn, cn) / (nr * nc)
    return cos, (nc * sc) / (nr * sr), nr, nc, np.all(r == c, axis=1)


def _rows_leading(x: Array) -> Array:
    a = source(x)
    return a.reshape(1, -1) if a.ndim < 2 else a.reshape(a.shape[0], -1)


def _cosine_sums(r: Array, c: Array) -> tuple[F64, F64, F64, npt.NDArray[np.bool_]]:
    """``(sum r*c, sum r^2, sum c^2, r == c)`` per row in float64, one blocked pass (column
    blocks within a row when a row is wider than a block)."""
    rows, width = r.shape
    dot, rr, cc = np.zeros(rows), np.zeros(rows), np.zeros(rows)
    same = np.ones(rows, dtype=bool)
    per = max(1, BLOCK // max(1, width))
    cols = min(width, BLOCK) if per == 1 else width
    bufs = np.empty((2, min(rows, per) * cols))
    eq = np.empty(bufs.shape[1], dtype=bool)
    for i in range(0, rows, per):
        rs = slice(i, min(rows, i + per))
        for j in range(0, max(width, 1), max(cols, 1)):
            rb, cb = widen(r[rs, j : j + cols], bufs[0]), widen(c[rs, j : j + cols], bufs[1])
            dot[rs] += np.einsum("ij,ij->i", rb, cb)
            rr[rs] += np.einsum("ij,ij->i", rb, rb)
            cc[rs] += np.einsum("ij,ij->i", cb, cb)
            e = np.equal(rb, cb, out=eq[: rb.size].reshape(rb.shape))
            same[rs] &= e.all(axis=1)
    return dot, rr, cc, same


def _sums_usable(r: Array, sq: F64) -> bool:
    """Plain per-row sums of squares are exact enough unless one overflowed, or may hold
    underflowed squares (tiny, or zero for a row that is not all zeros)."""
    if not np.isfinite(sq).all() or ((sq > 0.0) & (sq < SAFE_LO)).any():
        return False
    zero = np.flatnonzero(sq == 0.0)
    return not zero.size or not r[zero].any()


@quiet
def cosine(ref: Array, cand: Array, params: Mapping[str, Any]) -> Scored:
    """Per-row cosine similarity and norm ratio ``||cand||/||ref||``; rows are the leading axis
    when ``ndim >= 2``. Two zero rows count as identical, one zero row as orthogonal."""
    threshold = float(param(params, COSINE_DEFAULTS, "min_cosine"))
    r, c = _rows_leading(ref), _rows_leading(cand)
    dot, rr, cc, same = _cosine_sums(r, c)
    if _sums_usable(r, rr) and _sums_usable(c, cc):
        nr, nc = np.sqrt(rr), np.sqrt(cc)
        raw, norm_ratio = dot / (nr * nc), nc / nr
    else:
        raw, norm_ratio, nr, nc, same = _cosine_scaled(r, c)
    ref_zero, cand_zero = nr == 0.0, nc == 0.0
    cos = np.clip(np.where(ref_zero | cand_zero, 0.0, raw), -1.0, 1.0)
    # Rounding can leave identical rows a hair under 1: identical means severity exactly 0.
    cos = np.where(same | (ref_zero & cand_zero), 1.0, cos)
    ratio = np.where(ref_zero, np.where(cand_zero, 1.0, np.inf), norm_ratio)
    ratio = np.where(same, 1.0, ratio)
    return cosine_verdict(cos, ratio, ref_zero, cand_zero, threshold)


def cosine_verdict(
    cos: F64,
    ratio: F64,
    ref_zero: npt.NDArray[np.bool_],
    cand_zero: npt.NDArray[np.bool_],
    threshold: float,
) -> Scored:
    """The ``cosine`` verdict from its per-row values (shared with the torch backend)."""
    worst = int(cos.argmin())
    min_cos = float(cos[worst])
    scores = {
        "min_cosine": min_cos,
        "mean_cosine": float(cos.mean()),
        "min_norm_ratio": clamp(float(ratio.min())),
        "max_norm_ratio": clamp(float(ratio.max())),
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
