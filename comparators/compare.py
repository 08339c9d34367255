"""The entry points: score one output pair, or every output of a response pair.

Neither raises on bad data: every problem becomes a flagged verdict with a reason, because the
caller is a proxy worker that must keep going whatever an upstream sends.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from comparators import torch_backend
from comparators.base import Quiet, Scored, SpecError, clamp
from comparators.registry import AUTO, REGISTRY, choose_metric, effective_params, validate_spec
from comparators.types import MetricSpec, OutputVerdict, Validity
from comparators.validity import Prepared, check_pair, invalid, to_numpy

# Scores that are flat indices: after non-finite positions are dropped they must be mapped back.
_INDEX_SCORES = ("argmax_abs", "first_mismatch")
_FLAT_INDEX = re.compile(r"flat index (\d+)")
_FMAX = sys.float_info.max
_isfinite = math.isfinite  # one lookup less per score
_AUTO_SPEC = MetricSpec()


def _json_safe(scores: Mapping[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in scores.items():
        x = float(value)
        out[key] = x if _isfinite(x) else _FMAX if math.isnan(x) else math.copysign(_FMAX, x)
    return out


def _run(metric: str, gate: Prepared, params: Mapping[str, Any]) -> tuple[Scored, dict[str, float]]:
    info = REGISTRY[metric]
    ref, cand = gate.ref, gate.cand
    index_map = None
    if gate.matched is not None:
        if info.fill is None:
            keep = ~gate.matched
            index_map = np.flatnonzero(keep)
            ref, cand = ref[keep], cand[keep]
        else:
            ref = np.where(gate.matched, info.fill, ref)
            cand = np.where(gate.matched, info.fill, cand)
    with Quiet():
        scored = info.fn(ref, cand, params)
    scores = {**gate.counts, **scored.scores}
    if index_map is not None and index_map.size:
        for key in _INDEX_SCORES:
            if key in scores and scores[key] >= 0:
                scores[key] = float(index_map[int(scores[key])])
        mapped = _FLAT_INDEX.sub(lambda m: f"flat index {index_map[int(m[1])]}", scored.reason)
        scored = replace(scored, reason=mapped)
    return scored, scores


def _verdict(name: str, metric: str, scored: Scored, scores: Mapping[str, float]) -> OutputVerdict:
    # Positional: every field in its declared order (keywords cost more on this hot path).
    return OutputVerdict(
        name,
        metric,
        Validity.OK,
        _json_safe(scores),
        scored.headline,
        max(0.0, clamp(scored.severity)),
        scored.flagged,
        scored.reason,
    )


def _failed(name: str, metric: str, exc: Exception) -> OutputVerdict:
    # A comparator bug must cost one verdict, not the proxy's scoring worker.
    return invalid(
        name,
        metric,
        Validity.UNSUPPORTED,
        f"comparator '{metric}' failed: {type(exc).__name__}: {exc}",
    )


def _on_device(name: str, ref: Any, cand: Any, spec: MetricSpec) -> OutputVerdict | None:
    """Two torch tensors in the plain case, scored where they live; ``None`` otherwise (the
    numpy path then gives the verdict, the same one it always gave)."""
    try:
        metric = choose_metric(name, ref) if spec.metric == AUTO else spec.metric
        validate_spec(spec)
        pair = torch_backend.prepare(metric, ref, cand)
    except Exception:
        return None
    if pair is None:
        return None
    params = effective_params(metric, spec.params, pair.precision)
    try:
        scored = torch_backend.score(metric, pair, params)
    except Exception as exc:
        return _failed(name, metric, exc)
    return _verdict(name, metric, scored, {**pair.counts, **scored.scores})


def compare_output(name: str, ref: Any, cand: Any, spec: MetricSpec = _AUTO_SPEC) -> OutputVerdict:
    """Score one output of a reference/candidate pair under ``spec``. Two torch tensors are
    scored on their device (see :mod:`comparators.torch_backend`)."""
    # Floating-point errors are ignored once here for the gate and the metric: every numpy
    # warning-suppression inside then costs a read, not a set and a restore.
    with Quiet():
        return _compare_output(name, ref, cand, spec)


def _compare_output(name: str, ref: Any, cand: Any, spec: MetricSpec) -> OutputVerdict:
    if torch_backend.is_tensor(ref) and torch_backend.is_tensor(cand):
        on_device = _on_device(name, ref, cand, spec)
        if on_device is not None:
            return on_device
    metric = spec.metric
    try:
        r, c = to_numpy(ref), to_numpy(cand)
        if metric == AUTO:
            metric = choose_metric(name, r)
        validate_spec(spec)
    except SpecError as exc:
        return invalid(name, metric, Validity.UNSUPPORTED, f"bad metric spec: {exc}")
    except Exception as exc:
        return invalid(name, metric, Validity.UNSUPPORTED, f"not an array: {exc}")
    gate = check_pair(name, metric, r, c)
    if isinstance(gate, OutputVerdict):
        return gate
    params = effective_params(metric, spec.params, gate.precision)
    try:
        scored, scores = _run(metric, gate, params)
    except Exception as exc:
        return _failed(name, metric, exc)
    return _verdict(name, metric, scored, scores)


def _metric_for(name: str, present: Any, spec: MetricSpec) -> str:
    if spec.metric != AUTO:
        return spec.metric
    try:
        return choose_metric(name, present)
    except Exception:
        return AUTO


def compare_outputs(
    ref: Mapping[str, Any], cand: Mapping[str, Any], spec_for: Callable[[str], MetricSpec]
) -> list[OutputVerdict]:
    """One verdict per output name in either response: the reference's order, then names only
    the candidate has."""
    names = [*ref, *(n for n in cand if n not in ref)]
    verdicts: list[OutputVerdict] = []
    with Quiet():  # once for every output (see compare_output)
        for name in names:
            verdicts.append(_compare_named(name, ref, cand, spec_for(name)))
    return verdicts


def _compare_named(
    name: str, ref: Mapping[str, Any], cand: Mapping[str, Any], spec: MetricSpec
) -> OutputVerdict:
    if name not in cand:
        return invalid(
            name,
            _metric_for(name, ref[name], spec),
            Validity.MISSING_IN_CANDIDATE,
            f"output '{name}' is in the reference response but not in the candidate's",
        )
    if name not in ref:
        return invalid(
            name,
            _metric_for(name, cand[name], spec),
            Validity.MISSING_IN_REFERENCE,
            f"output '{name}' is in the candidate response but not in the reference's",
        )
    return _compare_output(name, ref[name], cand[name], spec)
