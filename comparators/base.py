"""What every comparator shares: its result type, its signature, caps and row/param helpers."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
Array = npt.NDArray[Any]

# JSON has no infinity, and verdicts are stored as JSON: unbounded values are clamped to these.
SQNR_CAP_DB = 300.0
SEVERITY_CAP = 1e9


_P = ParamSpec("_P")
_R = TypeVar("_R")


class _ErrObjQuiet:
    """``np.errstate(all="ignore")`` at a fraction of its cost under numpy 1.x, whose errstate
    is Python code (a few microseconds a use, and a small comparison used it several times). The
    error object is read in one C call and replaced only when some error is not ignored yet, so
    a nested use costs a read."""

    __slots__ = ("_saved",)

    def __enter__(self) -> None:
        saved = np.geterrobj()
        # [buffer size, error mask, callback]: mask 0 is "ignore" for all four errors.
        if saved[1] == 0:
            self._saved = None
        else:
            self._saved = saved
            np.seterrobj([saved[0], 0, saved[2]])

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            np.seterrobj(self._saved)


def _errstate_quiet() -> AbstractContextManager[Any]:
    return np.errstate(all="ignore")


# numpy 2 has no error object (its errstate is a cheap context variable): errstate is used there.
Quiet: Callable[[], AbstractContextManager[Any]] = (
    _ErrObjQuiet if hasattr(np, "seterrobj") else _errstate_quiet
)


def quiet(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``fn`` with floating-point errors ignored (see :data:`Quiet`)."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with Quiet():
            return fn(*args, **kwargs)

    return wrapper


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
    x = float(x)
    if x != x:  # NaN
        return cap
    # max(-cap, min(cap, x)), without two builtin calls: this runs for every score.
    return x if -cap <= x <= cap else (cap if x > cap else -cap)


def mean64(a: Array) -> float:
    """``float(np.mean(a))`` of a float64, integer or boolean array: the float64 sum np.mean
    takes (the same reduction), divided by the count as it divides, minus its Python layers."""
    if a.size == 0:
        return float(np.mean(a))  # NaN and numpy's warning, as before
    return float(np.add.reduce(a, axis=None, dtype=np.float64)) / a.size


def param(params: Mapping[str, Any], defaults: Mapping[str, Any], key: str) -> Any:
    return params[key] if key in params else defaults[key]


# Up to this many elements, checks whose result does not depend on the order of operations
# (finiteness, signs, maxima, counts) run on Python floats: each numpy call costs microseconds.
SMALL = 64


def all_finite_small(a: Array) -> bool:
    """Whether every element of ``a`` (at most :data:`SMALL` of them, a real float dtype or one
    whose elements convert to Python floats exactly, as numpy's floats and ml_dtypes' do) is
    finite."""
    return all(map(math.isfinite, a.ravel().tolist()))


# Inputs in these dtypes are read as they are and widened to float64 a block at a time (the
# widening is exact); anything else (ints, bools, ml_dtypes' bf16/float8) is widened up front.
NATIVE_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
# Elements per block of the one-pass kernels: three float64 buffers of this size stay in a 1 MiB
# L2 cache, so the intermediates never travel to main memory.
BLOCK = 16384
# Unscaled sums of squares at or above this owe nothing measurable to squares that underflowed
# (each lost part is < 1e-307, times at most ~1e12 elements); below it the rescaled path is used.
# Overflow needs no bound: a square that overflowed makes its sum infinite.
SAFE_LO = 1e-200


def source(x: Array) -> Array:
    """``x`` as an array whose float64 widening is exact and done block-wise by the kernels:
    numpy floats as they are (no copy), everything else as a float64 copy."""
    a = np.asarray(x)
    return a if a.dtype in NATIVE_FLOATS else a.astype(np.float64)


def widen(x: Array, buf: F64) -> F64:
    """``x`` (a block of a :func:`source` array) in float64: a view when it already is, else
    copied into the front of ``buf``. The result may alias the caller's data: read-only."""
    if x.dtype == np.float64:
        out: F64 = x
        return out
    view = buf[: x.size].reshape(x.shape)
    np.copyto(view, x, casting="safe")
    return view


def row_blocks(rows: int, width: int) -> list[slice]:
    """Row slices of at most :data:`BLOCK` elements each (at least one row per slice)."""
    step = max(1, BLOCK // max(1, width))
    return [slice(i, min(rows, i + step)) for i in range(0, rows, step)] or [slice(0, 0)]


def as_rows_last_axis(x: Array) -> F64:
    """Rows over the class axis: the last axis holds classes, every leading axis is batch."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 0:
        return a.reshape(1, 1)
    return a.reshape(-1, a.shape[-1])


def rows_last_axis(x: Array) -> Array:
    """Like :func:`as_rows_last_axis` without widening: a 2-D view of a :func:`source` array."""
    a = source(x)
    if a.ndim == 0:
        return a.reshape(1, 1)
    return a.reshape(-1, a.shape[-1])


def as_rows_leading_axis(x: Array) -> F64:
    """Rows over the leading axis: one vector per batch item, the rest flattened into it."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim < 2:
        return a.reshape(1, -1)
    return a.reshape(a.shape[0], -1)


def energies_scaled(ref: F64, cand: F64) -> tuple[float, float]:
    """``(sum ref^2, sum (ref-cand)^2)``, both divided by the same ``max(|ref|, |cand|)^2``:
    the ratio is unchanged and neither the difference nor the squares can overflow."""
    if ref.size == 0:
        return 0.0, 0.0
    scale = max(float(np.max(np.abs(ref))), float(np.max(np.abs(cand))))
    if scale == 0.0:
        return 0.0, 0.0
    r, c = ref / scale, cand / scale
    return float(np.dot(r, r)), float(np.sum(np.square(r - c)))


def energies_usable(signal: float, noise: float, max_abs: float) -> bool:
    """Whether unscaled sums of squares can stand in for :func:`energies_scaled`: both finite and
    neither so small that squares may have underflowed (a zero noise must mean identical, a zero
    signal goes the rescaled way too: rare, and it decides the sign of the cap)."""
    if not (math.isfinite(signal) and math.isfinite(noise)) or signal < SAFE_LO:
        return False
    return (noise == 0.0 and max_abs == 0.0) or noise >= SAFE_LO


def energy_pass(r: Array, c: Array) -> tuple[float, float, float]:
    """``(sum r^2, sum (r-c)^2, max |r-c|)`` of flat :func:`source` arrays in float64, in one
    blocked pass without full-size temporaries. The two sums are rescaled together
    (:func:`energies_scaled`) only when the plain ones are unusable: only their ratio counts."""
    signal = noise = max_abs = 0.0
    bufs = np.empty((3, min(BLOCK, r.size)))
    for i in range(0, r.size, BLOCK):
        rb, cb = widen(r[i : i + BLOCK], bufs[0]), widen(c[i : i + BLOCK], bufs[1])
        d = np.subtract(rb, cb, out=bufs[2, : rb.size])
        signal += float(np.dot(rb, rb))
        noise += float(np.dot(d, d))
        max_abs = max(max_abs, float(np.abs(d, out=d).max()))
    if not energies_usable(signal, noise, max_abs):
        signal, noise = energies_scaled(r.astype(np.float64), c.astype(np.float64))
    return signal, noise, max_abs


def energies(ref: Array, cand: Array) -> tuple[float, float]:
    """``(sum ref^2, sum (ref-cand)^2)`` of flat arrays, up to a common factor (see
    :func:`energy_pass`)."""
    signal, noise, _ = energy_pass(source(ref).reshape(-1), source(cand).reshape(-1))
    return signal, noise


def db_from(signal: float, noise: float) -> float:
    """``10*log10(signal/noise)`` clamped to +-cap; identical is +cap, no signal is -cap."""
    if noise == 0.0:
        return SQNR_CAP_DB
    if signal == 0.0:
        return -SQNR_CAP_DB
    return clamp(10.0 * (math.log10(signal) - math.log10(noise)), SQNR_CAP_DB)


def sqnr_db(ref: Array, cand: Array) -> float:
    """``10*log10(sum ref^2 / sum (ref-cand)^2)``, the reference as the signal, clamped to +-cap.
    Takes flat arrays."""
    return db_from(*energies(ref, cand))


def fmt(x: float) -> str:
    return f"{x:.4g}"
