"""Scoring torch tensors on their own device, so a GPU output is never copied to the host.

Used by :func:`comparators.compare_output` when both sides are torch tensors. torch is never
imported here at import time: the functions only call methods of the tensors they are handed
(and ``import torch`` inside them, by which time the caller has already imported it).

The arithmetic mirrors the numpy comparators operation for operation, in float64 on the tensors'
device, so the scores agree with the numpy path to rounding (summation order). Devices without
float64 (Apple MPS) compute in float32: their scores carry float32 rounding (about 1e-7 relative),
which is still far below any threshold in use. Only the plain case runs here: same shape, same
dtype family, non-empty, every value finite, and a metric listed in :data:`TORCH_METRICS`.
Anything else (a data problem, text) returns ``None`` and takes the numpy path, whose verdict is
then exactly the numpy one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from comparators import distributions, numeric
from comparators.base import SAFE_LO, Scored, clamp, db_from, param
from comparators.discrete import EXACT_DEFAULTS, exact_reason
from comparators.validity import Group

Tensor = Any  # torch.Tensor, unnamed so that type checking does not import torch
TORCH_METRICS = frozenset(
    {"tolerance", "sqnr", "cosine", "logits", "probabilities", "argmax", "exact"}
)
_COUNT_KEYS = ("ref_nan", "cand_nan", "ref_inf", "cand_inf")


def is_tensor(x: object) -> bool:
    return type(x).__module__.startswith("torch")


def group_of(t: Tensor) -> Group:
    """The dtype family of a tensor, in the numpy gate's words."""
    if t.dtype.is_complex or "q" in str(t.dtype).removeprefix("torch."):  # complex, qint8 ...
        return "unsupported"
    if t.dtype.is_floating_point:
        return "float"
    return "bool" if str(t.dtype) == "torch.bool" else "int"


def precision_of(*tensors: Tensor) -> str:
    names = {str(t.dtype).removeprefix("torch.") for t in tensors}
    if any(n.startswith("float8") for n in names):
        return "float8"
    for narrow in ("bfloat16", "float16"):
        if narrow in names:
            return narrow
    return "full"


def looks_like_probabilities(t: Tensor) -> bool:
    """:func:`comparators.registry` 's value test, on the device."""
    if t.ndim == 0 or t.numel() == 0 or t.shape[-1] < 2:
        return False
    rows = _wide(t).reshape(-1, t.shape[-1])
    ok = rows.isfinite().all() & (rows >= 0).all() & ((rows.sum(1) - 1.0).abs() <= 1e-3).all()
    return bool(ok.item())


@dataclass(frozen=True, slots=True)
class TorchPair:
    """A tensor pair that passed the device-side gate (the numpy gate's ``Prepared``)."""

    ref: Tensor
    cand: Tensor
    precision: str
    counts: dict[str, float]


def prepare(metric: str, ref: Tensor, cand: Tensor) -> TorchPair | None:
    """The gate for the plain case; ``None`` sends the pair to the numpy path."""
    if metric not in TORCH_METRICS or tuple(ref.shape) != tuple(cand.shape):
        return None
    if ref.device != cand.device or ref.numel() == 0:
        return None
    group = group_of(ref)
    if group == "unsupported" or group != group_of(cand):
        return None
    if group != "float":
        return TorchPair(ref.detach(), cand.detach(), "full", {})
    r, c = ref.detach(), cand.detach()
    if not bool((r.isfinite().all() & c.isfinite().all()).item()):
        return None
    return TorchPair(r, c, precision_of(r, c), dict.fromkeys(_COUNT_KEYS, 0.0))


def _wide_dtype(t: Tensor) -> Any:
    import torch

    return torch.float32 if t.device.type == "mps" else torch.float64


def _wide(t: Tensor) -> Tensor:
    return t.to(_wide_dtype(t))


def _floats(*values: Tensor) -> list[float]:
    """Scalars off the device in one transfer (one synchronisation instead of one each)."""
    import torch

    return [float(v) for v in torch.stack([v.to(values[0].dtype) for v in values]).tolist()]


def _element(t: Tensor, i: int) -> Any:
    """One element as the numpy scalar the numpy path would have shown in a reason."""
    x = t.reshape(-1)[i].detach().cpu()
    if x.dtype.is_floating_point:
        return np.float64(float(x.item()))
    return x.numpy()[()]


def _tolerance(p: TorchPair, params: Mapping[str, Any]) -> Scored:
    import torch

    atol = float(param(params, numeric.TOLERANCE_DEFAULTS, "atol"))
    rtol = float(param(params, numeric.TOLERANCE_DEFAULTS, "rtol"))
    max_fail = float(param(params, numeric.TOLERANCE_DEFAULTS, "max_fail_fraction"))
    r, c = _wide(p.ref).reshape(-1), _wide(p.cand).reshape(-1)
    n = r.numel()
    d = (r - c).abs()
    mag = r.abs()
    rel = d / torch.where(mag == 0.0, torch.finfo(r.dtype).eps, mag)
    n_fail = ((d > atol) & (rel > rtol)).sum()
    limit = torch.clamp_min(rtol * mag, atol)
    ratio = torch.where(d == 0.0, 0.0, d / limit)
    worst = torch.argmax(d)
    prev, nxt, gamma = numeric.quantile_positions(n)
    ranks = [*prev.tolist(), *nxt.tolist()]
    # kthvalue is 1-based; each is an exact order statistic, interpolated as numpy does.
    stats = [torch.kthvalue(d, k + 1).values for k in ranks]
    signal, noise = _energies(r, c, d)
    vals = _floats(d[worst], d.mean(), rel.max(), rel.mean(), n_fail, ratio.max(), worst, *stats)
    max_abs, mean_abs, max_rel, mean_rel, fails, worst_ratio, at = vals[:7]
    k = len(prev)
    order = np.array(vals[7:])
    median, p99 = numeric.lerp(order[:k], order[k:], gamma)
    scores = {
        "max_abs": max_abs,
        "mean_abs": mean_abs,
        "median_abs": float(median),
        "p99_abs": float(p99),
        "max_rel": max_rel,
        "mean_rel": mean_rel,
        "fail_fraction": fails / n,
        "argmax_abs": at,
        "tol_ratio": clamp(worst_ratio),
        "sqnr_db": db_from(signal, noise),
    }
    reason = ""
    if scores["fail_fraction"] > max_fail:
        i = int(at)
        reason = numeric.tolerance_reason(
            int(fails), n, atol, rtol, max_abs, i, float(r[i].item()), float(c[i].item())
        )
    return Scored(scores, "max_abs", scores["tol_ratio"], bool(reason), reason)


def _energies(r: Tensor, c: Tensor, d: Tensor | None = None) -> tuple[float, float]:
    """As :func:`comparators.base.energy_pass`: plain sums, rescaled when unusable."""
    diff = r - c if d is None else d
    signal, noise, max_abs = _floats((r * r).sum(), (diff * diff).sum(), diff.abs().max())
    if not (math.isfinite(signal) and math.isfinite(noise)) or signal < SAFE_LO:
        pass
    elif (noise == 0.0 and max_abs == 0.0) or noise >= SAFE_LO:
        return signal, noise
    scale = max(_floats(r.abs().max(), c.abs().max()))
    if scale == 0.0:
        return 0.0, 0.0
    rs, cs = r / scale, c / scale
    signal, noise = _floats((rs * rs).sum(), ((rs - cs) ** 2).sum())
    return signal, noise


def _sqnr(p: TorchPair, params: Mapping[str, Any]) -> Scored:
    floor = float(param(params, numeric.SQNR_DEFAULTS, "min_sqnr_db"))
    r, c = _wide(p.ref).reshape(-1), _wide(p.cand).reshape(-1)
    signal, noise = _energies(r, c)
    db = db_from(signal, noise)
    severity = numeric.rel_l2_severity(signal, noise)
    (max_abs,) = _floats((r - c).abs().max())
    scores = {"sqnr_db": db, "max_abs": max_abs, "rel_l2": severity}
    reason = numeric.sqnr_reason(db, floor, severity) if db < floor else ""
    return Scored(scores, "sqnr_db", severity, db < floor, reason)


def _cosine(p: TorchPair, params: Mapping[str, Any]) -> Scored:
    import torch

    rows = p.ref.shape[0] if p.ref.ndim >= 2 else 1
    r, c = _wide(p.ref).reshape(rows, -1), _wide(p.cand).reshape(rows, -1)
    same = (r == c).all(1)
    rr, cc = (r * r).sum(1), (c * c).sum(1)

    def usable(x: Tensor, sq: Tensor) -> bool:
        bad = ~sq.isfinite() | ((sq > 0) & (sq < SAFE_LO)) | ((sq == 0) & (x != 0).any(1))
        return not bool(bad.any().item())

    if usable(r, rr) and usable(c, cc):
        nr, nc = rr.sqrt(), cc.sqrt()
        raw, norm_ratio = (r * c).sum(1) / (nr * nc), nc / nr
    else:
        # The numpy path's rescaled rows: each divided by its largest magnitude.
        sr, sc = (r.abs().amax(1).clamp_min(0.0), c.abs().amax(1).clamp_min(0.0))
        sr, sc = torch.where(sr > 0, sr, 1.0), torch.where(sc > 0, sc, 1.0)
        rn, cn = r / sr[:, None], c / sc[:, None]
        nr, nc = rn.norm(dim=1), cn.norm(dim=1)
        raw, norm_ratio = (rn * cn).sum(1) / (nr * nc), (nc * sc) / (nr * sr)
    ref_zero, cand_zero = nr == 0.0, nc == 0.0
    cos = torch.where(ref_zero | cand_zero, 0.0, raw).clamp(-1.0, 1.0)
    cos = torch.where(same | (ref_zero & cand_zero), 1.0, cos)
    inf = torch.full_like(norm_ratio, math.inf)
    ratio = torch.where(ref_zero, torch.where(cand_zero, 1.0, inf), norm_ratio)
    ratio = torch.where(same, 1.0, ratio)
    return numeric.cosine_verdict(
        cos.cpu().numpy(),
        ratio.cpu().numpy(),
        ref_zero.cpu().numpy(),
        cand_zero.cpu().numpy(),
        float(param(params, numeric.COSINE_DEFAULTS, "min_cosine")),
    )


def _rows(t: Tensor) -> Tensor:
    w = _wide(t)
    return w.reshape(1, 1) if w.ndim == 0 else w.reshape(-1, w.shape[-1])


def _softmax_parts(x: Tensor) -> tuple[Tensor, Tensor]:
    import torch

    m = x.amax(1, keepdim=True)
    m = torch.where(m.isfinite(), m, 0.0)
    logp = x - m
    p = logp.exp()
    total = p.sum(1, keepdim=True)
    logp = logp - total.log()
    p = p / total
    dead = total[:, 0] == 0.0
    logp = torch.where(dead[:, None], -math.inf, logp)
    p = torch.where(dead[:, None], 0.0, p)
    return logp, p


def top_indices(x: Tensor, k: int) -> Tensor:
    """As :func:`comparators.distributions.top_indices`: largest first, ties to the lower index
    (argmax passes, whose first-maximum rule gives that; a stable sort for larger k)."""
    import torch

    k = min(k, x.shape[1])
    if k > 16:
        return torch.sort(x, dim=1, descending=True, stable=True).indices[:, :k]
    work = x.clone()
    picked = []
    for _ in range(k):
        i = work.argmax(1)
        picked.append(i)
        work.scatter_(1, i[:, None], -math.inf)
    return torch.stack(picked, 1)


def _at(x: Tensor, idx: Tensor) -> Tensor:
    return x.gather(1, idx[:, None])[:, 0]


def _np(*ts: Tensor) -> list[Any]:
    return [t.cpu().numpy() for t in ts]


def _logits(p: TorchPair, params: Mapping[str, Any]) -> Scored:
    import torch

    r, c = _rows(p.ref), _rows(p.cand)
    k = max(1, min(int(param(params, distributions.LOGITS_DEFAULTS, "k")), r.shape[1]))
    lr, pr = _softmax_parts(r)
    lc, pc = _softmax_parts(c)
    diff = lr - lc
    kl = (pr * diff).sum(1)
    fixed = torch.where(pr > 0.0, pr * diff, 0.0).sum(1)
    kl = torch.where(kl.isfinite(), kl, fixed).clamp_min(0.0)
    top_r, top_c = top_indices(lr, max(k, 2)), top_indices(lc, k)
    ar = top_r[:, 0]
    margin = _at(pr, ar) - _at(pr, top_r[:, 1]) if top_r.shape[1] > 1 else _at(pr, ar)
    delta = _at(pc, ar) - _at(pr, ar)
    overlap = (top_r[:, :k, None] == top_c[:, None, :]).any(2).sum(1) / k
    return distributions.logits_verdict(
        *_np(kl, ar, top_c[:, 0], margin, delta, overlap), params=params
    )


def _normalized(x: Tensor) -> Tensor:
    out = x.clamp_min(0.0)
    total = out.sum(1, keepdim=True)
    return out / (total.where(total > 0.0, 1.0))


def _jensen_shannon(p: Tensor, q: Tensor) -> Tensor:
    import torch

    pn, qn = _normalized(p), _normalized(q)
    total = pn + qn

    def kl_mix(x: Tensor) -> Tensor:
        ratio = torch.where(x > 0.0, 2.0 * x / total, 1.0)
        return (x * ratio.log()).sum(1)

    return (0.5 * (kl_mix(pn) + kl_mix(qn))).clamp(0.0, math.log(2.0))


def _top2(r: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    top_r = top_indices(r, 2)
    ar = top_r[:, 0]
    margin = _at(r, ar) - _at(r, top_r[:, 1]) if top_r.shape[1] > 1 else _at(r, ar)
    return ar, c.argmax(1), margin


def _probabilities(p: TorchPair, params: Mapping[str, Any]) -> Scored:
    r, c = _rows(p.ref), _rows(p.cand)
    ar, ac, margin = _top2(r, c)
    delta = (_at(c, ar) - _at(r, ar)).abs()
    js = _jensen_shannon(r, c)
    return distributions.probabilities_verdict(*_np(ar, ac, margin, delta, js), params=params)


def _argmax(p: TorchPair, params: Mapping[str, Any]) -> Scored:
    import torch

    r, c = _rows(p.ref), _rows(p.cand)
    ar, ac, margin = _top2(r, c)
    if r.shape[1] <= 1:
        margin = torch.full_like(margin, math.inf)
    return distributions.argmax_verdict(*_np(ar, ac, margin), params=params)


def _exact(p: TorchPair, params: Mapping[str, Any]) -> Scored:
    import torch

    floor = float(param(params, EXACT_DEFAULTS, "min_agreement"))
    r, c = p.ref.reshape(-1), p.cand.reshape(-1)
    if r.dtype != c.dtype:
        common = torch.promote_types(r.dtype, c.dtype)
        r, c = r.to(common), c.to(common)
    differ = r != c
    n = r.numel()
    n_bad = int(differ.sum().item())
    first = int(differ.to(torch.uint8).argmax().item()) if n_bad else -1
    agreement = (n - n_bad) / n
    scores = {"agreement": agreement, "mismatches": float(n_bad), "first_mismatch": float(first)}
    flagged = agreement < floor
    reason = ""
    if flagged:
        reason = exact_reason(n_bad, n, first, _element(p.ref, first), _element(p.cand, first))
    return Scored(scores, "agreement", 1.0 - agreement, flagged, reason)


_SCORERS = {
    "tolerance": _tolerance,
    "sqnr": _sqnr,
    "cosine": _cosine,
    "logits": _logits,
    "probabilities": _probabilities,
    "argmax": _argmax,
    "exact": _exact,
}


def score(metric: str, pair: TorchPair, params: Mapping[str, Any]) -> Scored:
    """Run ``metric`` on the device; gradients are never recorded."""
    import torch

    with torch.no_grad():
        return _SCORERS[metric](pair, params)
