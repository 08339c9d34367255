"""Comparators for discrete outputs: labels, token ids, booleans, and text."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

from comparators.base import SMALL, Array, Scored, param

EXACT_DEFAULTS: Mapping[str, Any] = MappingProxyType({"min_agreement": 1.0})
EXACT_TEXT_DEFAULTS: Mapping[str, Any] = MappingProxyType({"normalize": "strip", "min_exact": 1.0})
NORMALIZERS: Mapping[str, Callable[[str], str]] = MappingProxyType(
    {
        "none": lambda s: s,
        "strip": lambda s: s.strip(),
        "casefold_strip": lambda s: s.strip().casefold(),
    }
)
_SNIPPET = 24


def _text(v: object) -> str:
    if isinstance(v, bytes | bytearray):
        return v.decode("utf-8", errors="replace")
    return str(v)


def exact(ref: Array, cand: Array, params: Mapping[str, Any]) -> Scored:
    """Element-wise equality (labels, token ids, booleans); severity is ``1 - agreement``."""
    floor = float(param(params, EXACT_DEFAULTS, "min_agreement"))
    r, c = np.asarray(ref).reshape(-1), np.asarray(cand).reshape(-1)
    if r.size == 0:
        return Scored(
            {"agreement": 1.0, "mismatches": 0.0, "first_mismatch": -1.0}, "agreement", 0.0, False
        )
    if r.size <= SMALL and r.dtype == c.dtype and r.dtype.kind in _PY_KINDS:
        # A few elements of one dtype compare as Python objects exactly as numpy compares them.
        n_bad, first = _mismatches_small(r.tolist(), c.tolist())
    else:
        bad = np.flatnonzero(~np.asarray(r == c, dtype=bool))
        n_bad, first = int(bad.size), int(bad[0]) if bad.size else -1
    agreement = float(r.size - n_bad) / r.size
    scores = {"agreement": agreement, "mismatches": float(n_bad), "first_mismatch": float(first)}
    flagged = agreement < floor
    reason = ""
    if flagged:
        # Floats arrive unwidened (float16/32): show them as float64, as the reason always has.
        rv, cv = (np.float64(x[first]) if x.dtype.kind == "f" else x[first] for x in (r, c))
        reason = exact_reason(n_bad, int(r.size), first, rv, cv)
    return Scored(scores, "agreement", 1.0 - agreement, flagged, reason)


# Dtypes whose elements compare alike as Python objects (bool, int, float, str/bytes objects).
_PY_KINDS = frozenset("biufO")


def _mismatches_small(r: list[Any], c: list[Any]) -> tuple[int, int]:
    """(number of positions where ``r[i] == c[i]`` is false, the first of them or -1)."""
    bad = [i for i, (a, b) in enumerate(zip(r, c, strict=True)) if a != b]
    return len(bad), bad[0] if bad else -1


def exact_reason(n_bad: int, n: int, first: int, rv: object, cv: object) -> str:
    return (
        f"{n_bad} of {n} element(s) differ; first at flat index {first} "
        f"(reference {rv!r}, candidate {cv!r})"
    )


def _similarity() -> Callable[[str, str], float]:
    """``1 - normalised Levenshtein distance`` via rapidfuzz; without it, difflib's
    ``SequenceMatcher.ratio`` (a Ratcliff/Obershelp score, close but not equal to Levenshtein)."""
    try:
        from rapidfuzz.distance import Levenshtein
    except ImportError:
        import difflib

        return lambda a, b: difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()
    return lambda a, b: 1.0 - float(Levenshtein.normalized_distance(a, b))


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _snippet(s: str, at: int) -> str:
    start = max(0, at - _SNIPPET // 2)
    return s[start : start + _SNIPPET]


def exact_text(ref: Array, cand: Array, params: Mapping[str, Any]) -> Scored:
    """Per-element text equality after normalisation (bytes are decoded as UTF-8, so ``b"hi"``
    equals ``"hi"``), plus edit similarity of the least similar pair. Severity is
    ``1 - min_similarity``, which is 0 only when every pair is equal."""
    mode = str(param(params, EXACT_TEXT_DEFAULTS, "normalize"))
    floor = float(param(params, EXACT_TEXT_DEFAULTS, "min_exact"))
    norm = NORMALIZERS[mode]
    rs = [norm(_text(v)) for v in np.asarray(ref).reshape(-1).tolist()]
    cs = [norm(_text(v)) for v in np.asarray(cand).reshape(-1).tolist()]
    differing = [i for i, (a, b) in enumerate(zip(rs, cs, strict=True)) if a != b]
    n = len(rs)
    fraction = 1.0 - len(differing) / n if n else 1.0
    min_sim = 1.0
    if differing:
        sim = _similarity()
        min_sim = min(sim(rs[i], cs[i]) for i in differing)
    first = differing[0] if differing else -1
    divergence = _common_prefix(rs[first], cs[first]) if differing else -1
    scores = {
        "exact_match_fraction": fraction,
        "min_similarity": min_sim,
        "first_mismatch": float(first),
        "first_divergence": float(divergence),
    }
    flagged = fraction < floor
    reason = ""
    if flagged:
        reason = (
            f"{len(differing)} of {n} text element(s) differ after '{mode}' normalisation; "
            f"first at element {first}, char {divergence}: reference "
            f"{_snippet(rs[first], divergence)!r} vs candidate {_snippet(cs[first], divergence)!r}"
        )
    return Scored(scores, "min_similarity", max(0.0, 1.0 - min_sim), flagged, reason)
