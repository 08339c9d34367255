"""What every comparator shares: its result type, its signature, caps and row/param helpers."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
Array = npt.NDArray[Any]

# JSON has no infinity, and verdicts are stored as JSON: unbounded values are clamped to these.
SQNR_CAP_DB = 300.0
SEVERITY_CAP = 1e9


class ComparatorsError(Exception):
    """Base of the errors this package raises; bad data never raises, it becomes a verdict."""


class SpecError(ComparatorsError, ValueError):
    """A metric spec names an unknown metric or param, or a param has a bad value."""


@dataclass(frozen=True, slots=True)
class Scored:
    """What a comparator returns; :func:`comparators.compare_output` wraps it in a verdict."""

    scores: dict[str, float]
    headline: str
    severity: float
    flagged: bool
    reason: str = ""


Comparator = Callable[[Array, Array, Mapping[str, Any]], Scored]


def clamp(x: float, cap: float = SEVERITY_CAP) -> float:
    """``x`` as a finite float in ``[-cap, cap]``; NaN becomes ``cap`` (unknown counts as worst)."""
    if math.isnan(x):
        return cap
    return max(-cap, min(cap, float(x)))


def param(params: Mapping[str, Any], defaults: Mapping[str, Any], key: str) -> Any:
    return params[key] if key in params else defaults[key]


def as_rows_last_axis(x: Array) -> F64:
    """Rows over the class axis: the last axis holds classes, every leading axis is batch."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 0:
        return a.reshape(1, 1)
    return a.reshape(-1, a.shape[-1])


def as_rows_leading_axis(x: Array) -> F64:
    """Rows over the leading axis: one vector per batch item, the rest flattened into it."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim < 2:
        return a.reshape(1, -1)
    return a.reshape(a.shape[0], -1)


def energies(ref: F64, cand: F64) -> tuple[float, float]:
    """``(sum ref^2, sum (ref-cand)^2)``, both divided by the same ``max(|ref|, |cand|)^2``:
    the ratio is unchanged and neither the difference nor the squares can overflow."""
    if ref.size == 0:
        return 0.0, 0.0
    scale = max(float(np.max(np.abs(ref))), float(np.max(np.abs(cand))))
    if scale == 0.0:
        return 0.0, 0.0
    r, c = ref / scale, cand / scale
    return float(np.dot(r, r)), float(np.sum(np.square(r - c)))


def sqnr_db(ref: F64, cand: F64) -> float:
    """``10*log10(sum ref^2 / sum (ref-cand)^2)``, the reference as the signal, clamped to +-cap.
    Takes flat arrays."""
    signal, noise = energies(ref, cand)
    if noise == 0.0:
        return SQNR_CAP_DB
    if signal == 0.0:
        return -SQNR_CAP_DB
    return clamp(10.0 * (math.log10(signal) - math.log10(noise)), SQNR_CAP_DB)


def fmt(x: float) -> str:
    return f"{x:.4g}"
