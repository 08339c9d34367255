"""What a generated answer says about itself besides its text: why it stopped, how many tokens
the server counted, and how long it took."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from comparators.base import SEVERITY_CAP, Scored, param
from comparators.llm_types import TextAnswer

FINISH_REASON_DEFAULTS: Mapping[str, Any] = MappingProxyType({"enabled": True})
USAGE_DEFAULTS: Mapping[str, Any] = MappingProxyType({"enabled": True})
LATENCY_DEFAULTS: Mapping[str, Any] = MappingProxyType({})
# Two answers to one prompt should say the same thing: stricter than the 0.8 of promptfoo's
# `similar` examples, which compare an output with a hand-written expectation.
SEMANTIC_DEFAULTS: Mapping[str, Any] = MappingProxyType({"min_cosine": 0.9})


def finish_reason(ref: TextAnswer, cand: TextAnswer, params: Mapping[str, Any]) -> Scored:
    """Whether both stopped for the same reason; flagged only when both said and they differ
    (one answer cut at ``length`` where the other reached ``stop`` is a real divergence)."""
    r, c = ref.finish_reason, cand.finish_reason
    differ = r is not None and c is not None and r != c
    flagged = differ and bool(param(params, FINISH_REASON_DEFAULTS, "enabled"))
    reason = f"the candidate stopped with '{c}', the reference with '{r}'" if flagged else ""
    return Scored({"same": float(r == c)}, "same", float(differ), flagged, reason)


def _count(usage: Mapping[str, int], key: str) -> int | None:
    v = usage.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def usage(ref: TextAnswer, cand: TextAnswer, params: Mapping[str, Any]) -> Scored:
    """The servers' token counts, each side's where reported. The same request read as a
    different number of prompt tokens means another tokenizer or chat template: flagged. A
    different completion length follows from a different answer, which the text and token
    scores judge: reported only."""
    scores: dict[str, float] = {}
    counts: dict[str, tuple[int | None, int | None]] = {}
    for key in ("prompt_tokens", "completion_tokens"):
        counts[key] = r, c = _count(ref.usage, key), _count(cand.usage, key)
        if r is not None:
            scores[f"{key}_ref"] = float(r)
        if c is not None:
            scores[f"{key}_cand"] = float(c)
    pr, pc = counts["prompt_tokens"]
    differ = False
    if pr is not None and pc is not None:
        differ = pr != pc
        scores["prompt_tokens_equal"] = float(not differ)
    cr, cc = counts["completion_tokens"]
    if cr is not None and cc is not None:
        scores["completion_tokens_diff"] = float(cc - cr)
    flagged = differ and bool(param(params, USAGE_DEFAULTS, "enabled"))
    reason = ""
    if flagged:
        reason = (
            f"the candidate counted {pc} prompt tokens, the reference {pr}: the same request "
            "was tokenized differently (tokenizer or chat template)"
        )
    headline = "prompt_tokens_equal" if "prompt_tokens_equal" in scores else ""
    return Scored(scores, headline, float(differ), flagged, reason)


def latency(ref: TextAnswer, cand: TextAnswer, params: Mapping[str, Any]) -> Scored | None:
    """Time to first token and per output token of both sides, as evidence for the canary's
    latency gate; never flagged here (one request's timing is noise, not a verdict). None
    unless both sides have a time to first token."""
    del params  # no thresholds: see above
    if ref.ttft_s is None or cand.ttft_s is None:
        return None
    r, c = ref.ttft_s, cand.ttft_s
    scores = {"ttft_ref_s": r, "ttft_cand_s": c}
    if r > 0.0:
        scores["ttft_ratio"] = c / r
    else:  # a zero reference time (a clock's resolution): only "equal" or "far slower" is known
        scores["ttft_ratio"] = 1.0 if c <= 0.0 else SEVERITY_CAP
    if ref.tpot_s is not None:
        scores["tpot_ref_s"] = ref.tpot_s
    if cand.tpot_s is not None:
        scores["tpot_cand_s"] = cand.tpot_s
    return Scored(scores, "ttft_ratio", 0.0, False)
