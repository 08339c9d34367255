"""Comparators for class scores: logits, probabilities and plain argmax.

The last axis holds the classes and every leading axis is batch (``(B, V)`` or ``(B, T, V)``):
each row is scored on its own and the verdict reports the worst row plus means.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from comparators.base import (
    F64,
    SMALL,
    Array,
    Scored,
    as_rows_last_axis,
    clamp,
    fmt,
    mean64,
    param,
    quiet,
    row_blocks,
    rows_last_axis,
)

LOGITS_DEFAULTS: Mapping[str, Any] = MappingProxyType({"max_kl": 0.01, "k": 5, "tie_margin": 0.05})
PROBABILITIES_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {"tie_margin": 0.05, "max_delta_p": 0.05}
)
ARGMAX_DEFAULTS: Mapping[str, Any] = MappingProxyType({"tie_margin": 0.05})

I64 = npt.NDArray[np.intp]


# Up to this k, k argmax passes beat a full argpartition of every row.
_ARGMAX_LOOP_MAX = 16
_LN2 = float(np.log(2.0))  # the bound np.clip was given before, to the bit


@quiet
def softmax_parts(x: F64) -> tuple[F64, F64]:
    """Row-wise ``(log_softmax, softmax)``, shifted by the row max for stability and sharing one
    ``exp`` pass. Rows that are all ``-inf`` have no probability mass: ``-inf`` and 0, not NaN."""
    # Array methods: the reductions np.max/np.sum run, without their Python wrappers.
    m = x.max(axis=1, keepdims=True)
    if not np.isfinite(m).all():
        m = np.where(np.isfinite(m), m, 0.0)
    logp: F64 = x - m
    p: F64 = np.exp(logp)
    total = p.sum(axis=1, keepdims=True)
    logp -= np.log(total)
    p /= total
    dead = total[:, 0] == 0.0
    if dead.any():
        logp[dead] = -np.inf
        p[dead] = 0.0
    return logp, p


def log_softmax(x: F64) -> F64:
    return softmax_parts(x)[0]


def _argmax_first(row: list[float]) -> int:
    """``np.argmax`` of a list: the first maximum, or the first NaN if there is one."""
    best, top = 0, row[0]
    if top != top:
        return 0
    for i in range(1, len(row)):
        v = row[i]
        if v != v:
            return i
        if v > top:
            best, top = i, v
    return best


def _picks(rows: list[list[float]], k: int) -> list[list[int]]:
    """:func:`top_indices` of rows of Python floats (exact: every float dtype widens to a Python
    float without rounding): ``k`` argmax passes, each pick then marked -inf as numpy's loop does
    (so a row short of finite values repeats an index as it does)."""
    out = []
    for row in rows:
        work = list(row)
        picked = []
        for _ in range(k):
            at = _argmax_first(work)
            picked.append(at)
            work[at] = -math.inf
        out.append(picked)
    return out


def _small_rows(x: Array, k: int) -> bool:
    """Whether rows ``x`` (with ``k`` argmax passes) take the Python-float paths: at most
    :data:`~comparators.base.SMALL` elements, where numpy's per-call cost exceeds the loops."""
    return 0 < x.size <= SMALL and 0 < min(k, x.shape[1]) <= _ARGMAX_LOOP_MAX


def top_indices(x: F64, k: int) -> I64:
    """The ``k`` largest indices of each row, largest first; ties go to the lower index."""
    rows, width = x.shape
    if _small_rows(x, k):
        return np.array(_picks(x.tolist(), min(k, width)), dtype=np.intp).reshape(rows, -1)
    k = min(k, width)
    if k > _ARGMAX_LOOP_MAX:
        part = np.argpartition(x, width - k, axis=1)[:, width - k :]
        order = np.argsort(-np.take_along_axis(x, part, axis=1), axis=1, kind="stable")
        out: I64 = np.take_along_axis(part, order, axis=1)
        return out
    work = x.copy()
    picked = np.empty((rows, k), dtype=np.intp)
    at = np.arange(rows)
    for j in range(k):
        picked[:, j] = np.argmax(work, axis=1)
        work[at, picked[:, j]] = -np.inf
    return picked


def _at(p: F64, idx: I64) -> F64:
    """``p[i, idx[i]]`` per row (what take_along_axis gives, for a fraction of its cost)."""
    out: F64 = p[np.arange(idx.shape[0]), idx]
    return out


def _top1_margin(x: F64, top: I64) -> F64:
    """Top-1 minus top-2 per row from sorted top indices; one class is all margin."""
    if top.shape[1] < 2:
        return _at(x, top[:, 0])
    return _at(x, top[:, 0]) - _at(x, top[:, 1])


def _flip_reason(flips: npt.NDArray[np.bool_], ar: I64, ac: I64, margin: F64, tie: float) -> str:
    i = int(np.flatnonzero(flips)[0])
    n_flips = int(np.count_nonzero(flips))
    return _flip_text(n_flips, flips.size, i, int(ar[i]), int(ac[i]), float(margin[i]), tie)


def _flip_text(n_flips: int, rows: int, i: int, a: int, b: int, margin: float, tie: float) -> str:
    return (
        f"top-1 changed on {n_flips} of {rows} row(s) beyond the tie "
        f"margin {tie:g}: first at row {i}, class {a} -> {b} "
        f"(reference margin {fmt(margin)})"
    )


def _kl_rows(pr: F64, lr: F64, lc: F64) -> F64:
    diff = lr - lc
    kl: F64 = np.einsum("ij,ij->i", pr, diff)
    # Classes with no reference mass (masked, -inf on both sides) give 0 * NaN: redo those rows
    # with 0 log 0 = 0, which only they need.
    bad = ~np.isfinite(kl)
    if bad.any():
        kl[bad] = np.sum(np.where(pr[bad] > 0.0, pr[bad] * diff[bad], 0.0), axis=1)
    out: F64 = np.maximum(kl, 0.0)
    return out


def _margins(rows: list[list[float]], top: list[list[int]]) -> list[float]:
    """:func:`_top1_margin` on Python rows (float64 subtraction rounds alike)."""
    return [
        row[t[0]] - row[t[1]] if len(t) > 1 else row[t[0]] for row, t in zip(rows, top, strict=True)
    ]


def _logit_rows_small(lr: F64, pr: F64, lc: F64, pc: F64, k: int) -> tuple[I64, I64, F64, F64, F64]:
    """The index work of :func:`_logit_rows` on Python numbers, for a few small rows: each
    value is the one numpy computes (picks, float64 differences, exact counts over ``k``)."""
    top_r, top_c = _picks(lr.tolist(), min(max(k, 2), lr.shape[1])), _picks(lc.tolist(), k)
    rows_pr, rows_pc = pr.tolist(), pc.tolist()
    ar = [t[0] for t in top_r]
    delta = [c[i] - p[i] for p, c, i in zip(rows_pr, rows_pc, ar, strict=True)]
    overlap = [sum(j in tc for j in tr[:k]) / k for tr, tc in zip(top_r, top_c, strict=True)]
    return (
        np.array(ar, dtype=np.intp),
        np.array([t[0] for t in top_c], dtype=np.intp),
        np.array(_margins(rows_pr, top_r), dtype=np.float64),
        np.array(delta, dtype=np.float64),
        np.array(overlap, dtype=np.float64),
    )


def _logit_rows(r: F64, c: F64, k: int) -> tuple[F64, I64, I64, F64, F64, F64]:
    """Per row: KL, reference and candidate top-1, reference top-1 probability margin, change
    of that class's probability, top-k overlap."""
    lr, pr = softmax_parts(r)
    lc, pc = softmax_parts(c)
    kl = _kl_rows(pr, lr, lc)
    if _small_rows(lr, max(k, 2)):
        return (kl, *_logit_rows_small(lr, pr, lc, pc, k))
    top_r, top_c = top_indices(lr, max(k, 2)), top_indices(lc, k)
    ar, ac = top_r[:, 0], top_c[:, 0]
    margin = _top1_margin(pr, top_r)
    delta = _at(pc, ar) - _at(pr, ar)
    overlap = (top_r[:, :k, None] == top_c[:, None, :]).any(axis=2).sum(axis=1) / k
    return kl, ar, ac, margin, delta, overlap


def _columns(parts: list[tuple[Any, ...]]) -> list[Any]:
    """Per-row values of every row block, joined (one block, the usual case, needs no join)."""
    if len(parts) == 1:
        return list(parts[0])
    return [np.concatenate(col) for col in zip(*parts, strict=True)]


@quiet
def logits(ref: Array, cand: Array, params: Mapping[str, Any]) -> Scored:
    """KL(P_ref || P_cand) after log-softmax, top-1 agreement, top-k overlap and the signed
    change of the reference top class's probability (negative: the candidate is less sure)."""
    r, c = rows_last_axis(ref), rows_last_axis(cand)
    k = max(1, min(int(param(params, LOGITS_DEFAULTS, "k")), r.shape[1]))
    # Row blocks of a cache's size: the float64 softmax temporaries never reach main memory.
    parts = [
        _logit_rows(as_rows_last_axis(r[b]), as_rows_last_axis(c[b]), k)
        for b in row_blocks(*r.shape)
    ]
    return logits_verdict(*_columns(parts), params=params)


def logits_verdict(
    kl: F64, ar: I64, ac: I64, margin: F64, delta: F64, overlap: F64, *, params: Mapping[str, Any]
) -> Scored:
    """The ``logits`` verdict from its per-row values (shared with the torch backend)."""
    max_kl = float(param(params, LOGITS_DEFAULTS, "max_kl"))
    tie = float(param(params, LOGITS_DEFAULTS, "tie_margin"))
    flips = (ar != ac) & (margin > tie)
    worst = int(kl.argmax())
    scores = {
        "max_kl": clamp(float(kl[worst])),
        "mean_kl": clamp(mean64(kl)),
        "argmax_kl": float(worst),
        "top1_agreement": mean64(ar == ac),
        "non_tie_flips": float(np.count_nonzero(flips)),
        "min_topk_overlap": float(overlap.min()),
        "min_delta_p_top1": float(delta.min()),
        "mean_delta_p_top1": mean64(delta),
    }
    reasons = []
    if scores["max_kl"] > max_kl:
        reasons.append(f"KL {fmt(scores['max_kl'])} > {max_kl:g} at row {worst}")
    if flips.any():
        reasons.append(_flip_reason(flips, ar, ac, margin, tie))
    return Scored(scores, "max_kl", scores["max_kl"], bool(reasons), "; ".join(reasons))


def _all_positive(a: F64) -> bool:
    """``bool((a > 0.0).all())``; a few elements are compared as Python floats."""
    if a.size <= SMALL:
        return all(v > 0.0 for v in a.ravel().tolist())
    return bool((a > 0.0).all())


def _normalized(p: F64) -> F64:
    out: F64 = np.maximum(p, 0.0)
    total = out.sum(axis=1, keepdims=True)
    # Rows without mass are divided by 1; when every row has mass (the usual case) the divisor
    # is ``total`` itself, without building it anew.
    out /= total if _all_positive(total) else np.where(total > 0.0, total, 1.0)
    return out


def _kl_to_mixture(p: F64, total: F64) -> F64:
    """``sum p log(p/m)`` with ``m = total/2``, as ``log(2p/total)``: ``total >= p`` never
    underflows where ``total/2`` can (subnormals), so each log stays <= ln 2. Where ``p == 0``
    the ratio is set to 1, giving 0 log 0 = 0 without a NaN from 0/0 (whose warning the caller
    ignores)."""
    # p + p is 2p exactly (doubling is exact, and overflows where 2.0 * p does).
    ratio = np.divide(p + p, total)
    if not _all_positive(p):
        ratio[~(p > 0.0)] = 1.0
    np.log(ratio, out=ratio)
    out: F64 = np.einsum("ij,ij->i", p, ratio)
    return out


def _clip_js(x: float) -> float:
    """``np.clip(x, 0.0, ln 2)`` as numpy computes it: min(max(x, 0), ln 2), NaN kept."""
    x = x if x > 0.0 or x != x else 0.0
    return x if x < _LN2 or x != x else _LN2


def _normalized_small(flat: list[float], rows: int, width: int) -> list[float]:
    """:func:`_normalized` of row-major Python floats: the row sums are numpy's on a float64
    array of the same values and shape; the rest is exact."""
    # np.maximum(x, 0.0); NaN propagates. (A zero's sign may differ from numpy's SIMD choice:
    # it never reaches the JS divergence, whose clip makes every zero +0.0.)
    kept = [x if x >= 0.0 or x != x else 0.0 for x in flat]
    # np.add.reduce is the reduction ndarray.sum runs, minus its Python wrapper.
    totals = np.add.reduce(np.array(kept).reshape(rows, width), axis=1).tolist()
    if rows == 1:
        t = totals[0]
        return [x / t for x in kept] if t > 0.0 else kept
    out: list[float] = []
    for i, t in enumerate(totals):
        row = kept[i * width : (i + 1) * width]
        out.extend([x / t for x in row] if t > 0.0 else row)  # no mass: divided by 1
    return out


def _js_small(p: list[float], q: list[float], rows: int, width: int) -> list[float]:
    """:func:`jensen_shannon` of a few small rows, given row-major as Python floats. The row
    sums, logs and einsum products are numpy's own calls on float64 arrays of the same values
    and shapes as in :func:`_normalized` and :func:`_kl_to_mixture`; the element-wise arithmetic
    between them is exact and done on Python floats."""
    pn, qn = _normalized_small(p, rows, width), _normalized_small(q, rows, width)
    totals = [a + b for a, b in zip(pn, qn, strict=True)]
    kl = []
    for side in (pn, qn):
        # 2p / (p + q) where p > 0 (then p + q >= p > 0), else 1: log 1 = 0 adds nothing.
        ratio = [(a + a) / t if a > 0.0 else 1.0 for a, t in zip(side, totals, strict=True)]
        logs = np.log(np.array(ratio).reshape(rows, width))
        kl.append(np.einsum("ij,ij->i", np.array(side).reshape(rows, width), logs).tolist())
    return [_clip_js(0.5 * (a + b)) for a, b in zip(*kl, strict=True)]


@quiet
def jensen_shannon(p: F64, q: F64) -> F64:
    """Row-wise JS divergence (nats, in [0, ln 2]) of the rows normalised to sum 1."""
    pn, qn = _normalized(p), _normalized(q)
    total = pn + qn
    js = 0.5 * (_kl_to_mixture(pn, total) + _kl_to_mixture(qn, total))
    out: F64 = js.clip(0.0, _LN2)
    return out


@quiet
def probabilities(ref: Array, cand: Array, params: Mapping[str, Any]) -> Scored:
    """Top-1 flips beyond the tie margin, |delta p| of the reference top class and JS divergence.
    Severity is the larger of max |delta p| and max JS, so single-column sigmoid outputs (where JS
    of the normalised rows is always 0) still rank by how far the probability moved."""
    r, c = rows_last_axis(ref), rows_last_axis(cand)
    if _small_rows(r, 2):
        return _probabilities_small(r, c, params)
    # Row blocks of a cache's size: the float64 temporaries never reach main memory.
    parts = [
        _probability_rows(as_rows_last_axis(r[b]), as_rows_last_axis(c[b]))
        for b in row_blocks(*r.shape)
    ]
    return probabilities_verdict(*_columns(parts), params=params)


def _probabilities_small(r: Array, c: Array, params: Mapping[str, Any]) -> Scored:
    """:func:`probabilities` of a few small rows (one row block) of any float dtype, read as
    Python floats (the exact float64 widening of every value). The index work and the verdict
    run on them, each value the one :func:`_probability_rows` and
    :func:`probabilities_verdict` compute (comparisons, float64 differences, exact counts; the
    mean is numpy's reduction on the same array), and so does :func:`_js_small`."""
    tie = float(param(params, PROBABILITIES_DEFAULTS, "tie_margin"))
    max_dp = float(param(params, PROBABILITIES_DEFAULTS, "max_delta_p"))
    rows_r, rows_c = r.tolist(), c.tolist()
    n, width = r.shape
    js = _js_small(r.ravel().tolist(), c.ravel().tolist(), n, width)
    two = width > 1
    ar, margin, delta = [], [], []
    agree = 0
    flips: list[tuple[int, int, int, float]] = []  # (row, ref class, cand class, margin)
    for i, (rr, cr) in enumerate(zip(rows_r, rows_c, strict=True)):
        a, b = _argmax_first(rr), _argmax_first(cr)
        m = rr[a]
        if two:  # top_indices(r, 2): the second pick after the first is marked -inf
            rest = list(rr)
            rest[a] = -math.inf
            m -= rr[_argmax_first(rest)]
        ar.append(a)
        margin.append(m)
        delta.append(abs(cr[a] - rr[a]))
        agree += a == b
        if a != b and m > tie:
            flips.append((i, a, b, m))
    worst = _argmax_first(delta)
    scores = {
        "top1_agreement": agree / n,
        "non_tie_flips": float(len(flips)),
        "max_abs_delta_p": delta[worst],
        # np.max propagates NaN (js is never -0.0: the clip makes it 0.0).
        "max_js": math.nan if any(v != v for v in js) else max(js),
        # numpy's mean of one value is that value; of more, its reduction of the same array.
        "mean_js": js[0] if n == 1 else mean64(np.array(js)),
    }
    reasons = []
    if flips:
        i, a, b, m = flips[0]
        reasons.append(_flip_text(len(flips), n, i, a, b, m, tie))
    if scores["max_abs_delta_p"] > max_dp:
        reasons.append(_delta_p_text(scores["max_abs_delta_p"], max_dp, worst, ar[worst]))
    severity = clamp(max(scores["max_abs_delta_p"], scores["max_js"]))
    return Scored(scores, "max_abs_delta_p", severity, bool(reasons), "; ".join(reasons))


def _delta_p_text(delta: float, max_dp: float, row: int, cls: int) -> str:
    return (
        f"|delta p| of the reference top class {fmt(delta)} > {max_dp:g} at row {row} (class {cls})"
    )


def _probability_rows(r: F64, c: F64) -> tuple[I64, I64, F64, F64, F64]:
    """Per row: reference and candidate top-1, reference top-2 gap, |delta p| of the reference
    top class, JS divergence."""
    top_r = top_indices(r, 2)
    ar, ac = top_r[:, 0], c.argmax(axis=1)
    margin = _top1_margin(r, top_r)
    delta = np.abs(_at(c, ar) - _at(r, ar))
    return ar, ac, margin, delta, jensen_shannon(r, c)


def probabilities_verdict(
    ar: I64, ac: I64, margin: F64, delta: F64, js: F64, *, params: Mapping[str, Any]
) -> Scored:
    """The ``probabilities`` verdict from its per-row values (shared with the torch backend)."""
    tie = float(param(params, PROBABILITIES_DEFAULTS, "tie_margin"))
    max_dp = float(param(params, PROBABILITIES_DEFAULTS, "max_delta_p"))
    flips = (ar != ac) & (margin > tie)
    worst = int(delta.argmax())
    scores = {
        "top1_agreement": mean64(ar == ac),
        "non_tie_flips": float(np.count_nonzero(flips)),
        "max_abs_delta_p": float(delta[worst]),
        "max_js": float(js.max()),
        "mean_js": mean64(js),
    }
    reasons = []
    if flips.any():
        reasons.append(_flip_reason(flips, ar, ac, margin, tie))
    if scores["max_abs_delta_p"] > max_dp:
        reasons.append(_delta_p_text(scores["max_abs_delta_p"], max_dp, worst, int(ar[worst])))
    severity = clamp(max(scores["max_abs_delta_p"], scores["max_js"]))
    return Scored(scores, "max_abs_delta_p", severity, bool(reasons), "; ".join(reasons))


@quiet
def argmax(ref: Array, cand: Array, params: Mapping[str, Any]) -> Scored:
    """Top-1 agreement on raw class scores; a changed top-1 is flagged unless the reference's
    top-2 gap, in the scores' own units, is within ``tie_margin``."""
    # Widening to float64 is exact and keeps the order: the indices come from the inputs as they
    # are, only the margin is computed in float64.
    r, c = rows_last_axis(ref), rows_last_axis(cand)
    if _small_rows(r, 2):
        # On Python floats, for a few small rows: widening to them is exact as to float64.
        rows_r = r.tolist()
        top = _picks(rows_r, min(2, r.shape[1]))
        inf = [math.inf] * len(top)
        return argmax_verdict(
            np.array([t[0] for t in top], dtype=np.intp),
            np.array([_argmax_first(row) for row in c.tolist()], dtype=np.intp),
            np.array(_margins(rows_r, top) if r.shape[1] > 1 else inf, dtype=np.float64),
            params=params,
        )
    top_r = top_indices(r, 2)
    ar, ac = top_r[:, 0], c.argmax(axis=1)
    if r.shape[1] > 1:
        margin = _at(r, top_r[:, 0]).astype(np.float64) - _at(r, top_r[:, 1])
    else:
        margin = np.full(r.shape[0], np.inf)
    return argmax_verdict(ar, ac, margin, params=params)


def argmax_verdict(ar: I64, ac: I64, margin: F64, *, params: Mapping[str, Any]) -> Scored:
    """The ``argmax`` verdict from its per-row values (shared with the torch backend)."""
    tie = float(param(params, ARGMAX_DEFAULTS, "tie_margin"))
    flips = (ar != ac) & (margin > tie)
    agreement = mean64(ar == ac)
    scores = {"top1_agreement": agreement, "non_tie_flips": float(np.count_nonzero(flips))}
    reason = _flip_reason(flips, ar, ac, margin, tie) if flips.any() else ""
    return Scored(scores, "top1_agreement", 1.0 - agreement, bool(flips.any()), reason)
