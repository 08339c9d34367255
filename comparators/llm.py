"""The generated-text (LLM) comparators: one verdict per aspect of a reference/candidate pair of
answers (text, tokens, logprobs, finish reason, usage, JSON, latency), and the semantic
similarity of two answers' embeddings.

As the array comparators: pure functions, float64, frozen verdicts, and bad data or a bad spec
becomes a verdict with a reason, never an exception (the caller is a proxy worker).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from comparators.base import Scored, SpecError, clamp
from comparators.compare import compare_output
from comparators.llm_meta import finish_reason, latency, usage
from comparators.llm_text import json_structure, text
from comparators.llm_tokens import logprobs, tokens
from comparators.llm_types import TextAnswer
from comparators.registry import AUTO, LLM_METRICS, effective_params, validate_spec
from comparators.types import MetricSpec, OutputVerdict, Validity
from comparators.validity import invalid

Aspect = Callable[[TextAnswer, TextAnswer, Mapping[str, Any]], Scored | None]
# In the order a reviewer reads them; an aspect returns None where it does not apply (no
# tokens, no top-k, no JSON, no timing), and then has no verdict.
_ASPECTS: tuple[tuple[str, Aspect], ...] = (
    ("text", text),
    ("tokens", tokens),
    ("logprobs", logprobs),
    ("finish_reason", finish_reason),
    ("usage", usage),
    ("json", json_structure),
    ("latency", latency),
)
_SEMANTIC = "semantic"
_AUTO_SPEC = MetricSpec()


def compare_text_answers(
    ref: TextAnswer,
    cand: TextAnswer,
    spec_for: Callable[[str], MetricSpec],
    *,
    prefix: str = "",
) -> list[OutputVerdict]:
    """One verdict per aspect of the pair that applies, named ``prefix + aspect`` (``text``,
    ``tokens``, ``logprobs``, ``finish_reason``, ``usage``, ``json``, ``latency``), the metric
    named as the aspect. ``spec_for`` is asked with the aspect's name without the prefix: the
    choices of one answer are samples of one prompt, and one table entry serves them all.
    An incomplete answer on either side gives one invalid ``text`` verdict instead, flagged
    when the candidate's stream was cut (not the reference's: nothing to blame it for)."""
    if ref.incomplete or cand.incomplete:
        return [_incomplete(ref, cand, prefix + "text")]
    verdicts = []
    for name, aspect in _ASPECTS:
        verdict = _score(name, aspect, ref, cand, spec_for, prefix + name)
        if verdict is not None:
            verdicts.append(verdict)
    return verdicts


def _incomplete(ref: TextAnswer, cand: TextAnswer, output: str) -> OutputVerdict:
    if ref.incomplete:
        also = " (and the candidate's)" if cand.incomplete else ""
        return OutputVerdict(
            output,
            "text",
            Validity.EMPTY,
            reason=f"reference stream incomplete{also}: the answers were not compared",
        )
    return invalid(
        output,
        "text",
        Validity.EMPTY,
        "candidate stream incomplete: it ended before the answer did, so it was not compared",
    )


def _resolve(
    name: str, spec_for: Callable[[str], MetricSpec]
) -> tuple[dict[str, Any], tuple[str, bool] | None]:
    """The aspect's params, or its defaults and why the spec cannot serve (reason, flagged)."""
    defaults = dict(LLM_METRICS[name])
    try:
        spec = spec_for(name)
        validate_spec(spec)
    except Exception as exc:
        return defaults, (f"bad metric spec: {exc}", True)
    if spec.metric not in (AUTO, name):
        # Most likely a wildcard entry meant for tensor outputs: said on the verdict, but not
        # flagged, or every sample of every LLM would go to review.
        return defaults, (
            f"metric '{spec.metric}' cannot score the '{name}' of a generated answer "
            f"(use 'auto' or '{name}'): not scored",
            False,
        )
    return effective_params(name, spec.params, "full"), None


def _score(
    name: str,
    aspect: Aspect,
    ref: TextAnswer,
    cand: TextAnswer,
    spec_for: Callable[[str], MetricSpec],
    output: str,
) -> OutputVerdict | None:
    params, problem = _resolve(name, spec_for)
    try:
        # Run even under a bad spec (with the defaults): an aspect that does not apply to this
        # pair has no verdict, bad spec or not.
        scored = aspect(ref, cand, params)
    except Exception as exc:
        # A comparator bug must cost one verdict, not the proxy's scoring worker.
        reason = f"comparator '{name}' failed: {type(exc).__name__}: {exc}"
        return invalid(output, name, Validity.UNSUPPORTED, reason)
    if scored is None:
        return None
    if problem is not None:
        reason, flagged = problem
        verdict = invalid(output, name, Validity.UNSUPPORTED, reason)
        return verdict if flagged else replace(verdict, flagged=False, severity=0.0)
    return OutputVerdict(
        output,
        name,
        Validity.OK,
        # Verdicts are stored as JSON: every score finite (NaN read as the worst, as clamp does).
        {k: clamp(v) for k, v in scored.scores.items()},
        scored.headline,
        max(0.0, clamp(scored.severity)),
        scored.flagged,
        scored.reason,
    )


def compare_semantic(
    ref_embedding: Any, cand_embedding: Any, spec: MetricSpec = _AUTO_SPEC
) -> OutputVerdict:
    """The cosine similarity, in float64, of two embeddings of the two answers' texts (1-D
    vectors; rows scored one by one give the least similar row's), output and metric
    ``semantic``; flagged below ``min_cosine``, severity ``1 - cosine``. Shape, dtype and NaN
    problems are the array gate's verdicts (see :func:`comparators.compare_output`)."""
    try:
        validate_spec(spec)
        if spec.metric not in (AUTO, _SEMANTIC):
            raise SpecError(f"metric '{spec.metric}' cannot score two answers' embeddings")
    except SpecError as exc:
        return invalid(_SEMANTIC, _SEMANTIC, Validity.UNSUPPORTED, f"bad metric spec: {exc}")
    floor = float(effective_params(_SEMANTIC, spec.params, "full")["min_cosine"])
    gated = compare_output(
        _SEMANTIC, ref_embedding, cand_embedding, MetricSpec("cosine", {"min_cosine": floor})
    )
    if not gated.valid:
        return replace(gated, metric=_SEMANTIC)
    cosine = gated.scores["min_cosine"]
    scores = {"cosine": cosine, "norm_ratio": gated.scores["min_norm_ratio"]}
    flagged = cosine < floor
    reason = ""
    if flagged:
        reason = f"the answers' embeddings point apart: cosine {cosine:.4f} < {floor:g}"
    return OutputVerdict(
        _SEMANTIC,
        _SEMANTIC,
        Validity.OK,
        scores,
        "cosine",
        max(0.0, 1.0 - cosine),
        flagged,
        reason,
    )
