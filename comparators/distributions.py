"""Comparators for class scores: logits, probabilities and plain argmax.

The last axis holds the classes and every leading axis is batch (``(B, V)`` or ``(B, T, V)``):
each row is scored on its own and the verdict reports the worst row plus means.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from comparators.base import (
    F64,
    Array,
    Scored,
    as_rows_last_axis,
    clamp,
    fmt,
    param,
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


@np.errstate(all="ignore")
def softmax_parts(x: F64) -> tuple[F64, F64]:
    """Row-wise ``(log_softmax, softmax)``, shifted by the row max for stability and sharing one
    ``exp`` pass. Rows that are all ``-inf`` have no probability mass: ``-inf`` and 0, not NaN."""
    m = np.max(x, axis=1, keepdims=True)
    if not np.all(np.isfinite(m)):
        m = np.where(np.isfinite(m), m, 0.0)
    logp: F64 = x - m
    p: F64 = np.exp(logp)
    total = np.sum(p, axis=1, keepdims=True)
    logp -= np.log(total)
    p /= total
    dead = total[:, 0] == 0.0
    if dead.any():
        logp[dead] = -np.inf
        p[dead] = 0.0
    return logp, p


def log_softmax(x: F64) -> F64:
    return softmax_parts(x)[0]


def top_indices(x: F64, k: int) -> I64:
    """The ``k`` largest indices of each row, largest first; ties go to the lower index."""
    rows, width = x.shape
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
    out: F64 = np.take_along_axis(p, idx[:, None], axis=1)[:, 0]
    return out


def _top1_margin(x: F64, top: I64) -> F64:
    """Top-1 minus top-2 per row from sorted top indices; one class is all margin."""
    if top.shape[1] < 2:
        return _at(x, top[:, 0])
    return _at(x, top[:, 0]) - _at(x, top[:, 1])


def _flip_reason(flips: npt.NDArray[np.bool_], ar: I64, ac: I64, margin: F64, tie: float) -> str:
    i = int(np.flatnonzero(flips)[0])
    return (
        f"top-1 changed on {int(np.count_nonzero(flips))} of {flips.size} row(s) beyond the tie "
        f"margin {tie:g}: first at row {i}, class {int(ar[i])} -> {int(ac[i])} "
        f"(reference margin {fmt(float(margin[i]))})"
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


def _logit_rows(r: F64, c: F64, k: int) -> tuple[F64, I64, I64, F64, F64, F64]:
    """Per row: KL, reference and candidate top-1, reference top-1 probability margin, change
    of that class's probability, top-k overlap."""
    lr, pr = softmax_parts(r)
    lc, pc = softmax_parts(c)
    kl = _kl_rows(pr, lr, lc)
    top_r, top_c = top_indices(lr, max(k, 2)), top_indices(lc, k)
    ar, ac = top_r[:, 0], top_c[:, 0]
    margin = _top1_margin(pr, top_r)
    delta = _at(pc, ar) - _at(pr, ar)
    overlap = (top_r[:, :k, None] == top_c[:, None, :]).any(axis=2).sum(axis=1) / k
    return kl, ar, ac, margin, delta, overlap


@np.errstate(all="ignore")
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
    cols = [np.concatenate(col) for col in zip(*parts, strict=True)]
    return logits_verdict(*cols, params=params)


def logits_verdict(
    kl: F64, ar: I64, ac: I64, margin: F64, delta: F64, overlap: F64, *, params: Mapping[str, Any]
) -> Scored:
    """The ``logits`` verdict from its per-row values (shared with the torch backend)."""
    max_kl = float(param(params, LOGITS_DEFAULTS, "max_kl"))
    tie = float(param(params, LOGITS_DEFAULTS, "tie_margin"))
    flips = (ar != ac) & (margin > tie)
    worst = int(np.argmax(kl))
    scores = {
        "max_kl": clamp(float(kl[worst])),
        "mean_kl": clamp(float(np.mean(kl))),
        "argmax_kl": float(worst),
        "top1_agreement": float(np.mean(ar == ac)),
        "non_tie_flips": float(np.count_nonzero(flips)),
        "min_topk_overlap": float(np.min(overlap)),
        "min_delta_p_top1": float(np.min(delta)),
        "mean_delta_p_top1": float(np.mean(delta)),
    }
    reasons = []
    if scores["max_kl"] > max_kl:
        reasons.append(f"KL {fmt(scores['max_kl'])} > {max_kl:g} at row {worst}")
    if flips.any():
        reasons.append(_flip_reason(flips, ar, ac, margin, tie))
    return Scored(scores, "max_kl", scores["max_kl"], bool(reasons), "; ".join(reasons))


def _normalized(p: F64) -> F64:
    out: F64 = np.maximum(p, 0.0)
    total = np.sum(out, axis=1, keepdims=True)
    out /= np.where(total > 0.0, total, 1.0)
    return out


def _kl_to_mixture(p: F64, total: F64) -> F64:
    """``sum p log(p/m)`` with ``m = total/2``, as ``log(2p/total)``: ``total >= p`` never
    underflows where ``total/2`` can (subnormals), so each log stays <= ln 2. Where ``p == 0``
    the ratio is set to 1, giving 0 log 0 = 0 without a NaN from 0/0."""
    ratio = np.divide(2.0 * p, total, out=np.ones_like(p), where=p > 0.0)
    np.log(ratio, out=ratio)
    out: F64 = np.einsum("ij,ij->i", p, ratio)
    return out


@np.errstate(all="ignore")
def jensen_shannon(p: F64, q: F64) -> F64:
    """Row-wise JS divergence (nats, in [0, ln 2]) of the rows normalised to sum 1."""
    pn, qn = _normalized(p), _normalized(q)
    total = pn + qn
    js = 0.5 * (_kl_to_mixture(pn, total) + _kl_to_mixture(qn, total))
    out: F64 = np.clip(js, 0.0, np.log(2.0))
    return out


@np.errstate(all="ignore")
def probabilities(ref: Array, cand: Array, params: Mapping[str, Any]) -> Scored:
    """Top-1 flips beyond the tie margin, |delta p| of the reference top class and JS divergence.
    Severity is the larger of max |delta p| and max JS, so single-column sigmoid outputs (where JS
    of the normalised rows is always 0) still rank by how far the probability moved."""
    r, c = rows_last_axis(ref), rows_last_axis(cand)
    # Row blocks of a cache's size: the float64 temporaries never reach main memory.
    parts = [
        _probability_rows(as_rows_last_axis(r[b]), as_rows_last_axis(c[b]))
        for b in row_blocks(*r.shape)
    ]
    cols = [np.concatenate(col) for col in zip(*parts, strict=True)]
    return probabilities_verdict(*cols, params=params)


def _probability_rows(r: F64, c: F64) -> tuple[I64, I64, F64, F64, F64]:
    """Per row: reference and candidate top-1, reference top-2 gap, |delta p| of the reference
    top class, JS divergence."""
    top_r = top_indices(r, 2)
    ar, ac = top_r[:, 0], np.argmax(c, axis=1)
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
    worst = int(np.argmax(delta))
    scores = {
        "top1_agreement": float(np.mean(ar == ac)),
        "non_tie_flips": float(np.count_nonzero(flips)),
        "max_abs_delta_p": float(delta[worst]),
        "max_js": float(np.max(js)),
        "mean_js": float(np.mean(js)),
    }
    reasons = []
    if flips.any():
        reasons.append(_flip_reason(flips, ar, ac, margin, tie))
    if scores["max_abs_delta_p"] > max_dp:
        reasons.append(
            f"|delta p| of the reference top class {fmt(scores['max_abs_delta_p'])} > {max_dp:g} "
            f"at row {worst} (class {int(ar[worst])})"
        )
    severity = clamp(max(scores["max_abs_delta_p"], scores["max_js"]))
    return Scored(scores, "max_abs_delta_p", severity, bool(reasons), "; ".join(reasons))


@np.errstate(all="ignore")
def argmax(ref: Array, cand: Array, params: Mapping[str, Any]) -> Scored:
    """Top-1 agreement on raw class scores; a changed top-1 is flagged unless the reference's
    top-2 gap, in the scores' own units, is within ``tie_margin``."""
    # Widening to float64 is exact and keeps the order: the indices come from the inputs as they
    # are, only the margin is computed in float64.
    r, c = rows_last_axis(ref), rows_last_axis(cand)
    top_r = top_indices(r, 2)
    ar, ac = top_r[:, 0], np.argmax(c, axis=1)
    if r.shape[1] > 1:
        margin = _at(r, top_r[:, 0]).astype(np.float64) - _at(r, top_r[:, 1])
    else:
        margin = np.full(r.shape[0], np.inf)
    return argmax_verdict(ar, ac, margin, params=params)


def argmax_verdict(ar: I64, ac: I64, margin: F64, *, params: Mapping[str, Any]) -> Scored:
    """The ``argmax`` verdict from its per-row values (shared with the torch backend)."""
    tie = float(param(params, ARGMAX_DEFAULTS, "tie_margin"))
    flips = (ar != ac) & (margin > tie)
    agreement = float(np.mean(ar == ac))
    scores = {"top1_agreement": agreement, "non_tie_flips": float(np.count_nonzero(flips))}
    reason = _flip_reason(flips, ar, ac, margin, tie) if flips.any() else ""
    return Scored(scores, "top1_agreement", 1.0 - agreement, bool(flips.any()), reason)
