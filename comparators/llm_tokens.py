"""Token-level scores of a generated-answer pair: where the two token sequences part (vLLM's
``check_logprobs_close`` rule decides whether that was a near-tie) and how far apart the two
next-token distributions are up to there (llama.cpp's ``perplexity --kl-divergence`` statistics,
computed from the top-k logprobs the servers returned).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np

from comparators.base import F64, Scored, fmt, param
from comparators.llm_types import TextAnswer, TokenChoice

# Without top-k logprobs a divergence cannot be told apart from a near-tie, and the text score
# already measures how far the answers drifted apart; so by default the tokens aspect flags only
# what top-k proves (a divergence vLLM's check would reject). A user who wants a prefix floor
# anyway sets it; 0.0 never fires.
TOKENS_DEFAULTS: Mapping[str, Any] = MappingProxyType({"min_prefix_agreement": 0.0})
# llama.cpp measured q8_0 against f16 at mean KL 0.0014 and q4_K_M at 0.031 (full vocabulary,
# teacher-forced); 0.1 leaves room for top-k's coarser estimate and flags only gross shifts.
LOGPROBS_DEFAULTS: Mapping[str, Any] = MappingProxyType({"max_kl_mean": 0.1})
# vLLM clamps -inf logprobs to this; every log probability here is clamped to it as well, so a
# probability of zero on one side costs a large but finite KL (verdicts are stored as JSON).
LOGPROB_FLOOR = -9999.0


def _ids(a: TextAnswer) -> tuple[int, ...] | None:
    if a.token_ids is not None:
        return a.token_ids
    if a.tokens is None:
        return None
    ids = [t.token_id for t in a.tokens]
    return None if any(i is None for i in ids) else tuple(i for i in ids if i is not None)


Keys = Sequence[object]


def token_keys(ref: TextAnswer, cand: TextAnswer) -> tuple[Keys, Keys] | None:
    """The two token sequences to compare position by position: ids when both sides have them
    (two ids can decode to the same text), else the token strings; None when either side has
    neither."""
    ref_ids, cand_ids = _ids(ref), _ids(cand)
    if ref_ids is not None and cand_ids is not None:
        return ref_ids, cand_ids
    if ref.tokens is not None and cand.tokens is not None:
        return [t.token for t in ref.tokens], [t.token for t in cand.tokens]
    return None


def first_divergence(r: Keys, c: Keys) -> int:
    """The first position where the sequences differ (the shorter one's length when it is a
    prefix of the other), -1 when they are equal."""
    n = min(len(r), len(c))
    i = next((i for i in range(n) if r[i] != c[i]), n)
    return -1 if i == n and len(r) == len(c) else i


def _has_top(a: TextAnswer) -> bool:
    return a.tokens is not None and any(t.top for t in a.tokens)


def _reported(t: TokenChoice) -> set[str]:
    # vLLM's logprobs dict holds the sampled token besides the top-k; OpenAI's top list may not.
    return {tok for tok, _ in t.top} | {t.token}


def _containment(ref: TextAnswer, cand: TextAnswer, at: int) -> tuple[bool, bool] | None:
    """(the reference's token is in the candidate's top-k, the candidate's in the reference's)
    at position ``at``; None when a side has no token or no top list there (a divergence where
    one answer simply ended has no alternative to check)."""
    if ref.tokens is None or cand.tokens is None:
        return None
    if at >= len(ref.tokens) or at >= len(cand.tokens):
        return None
    rt, ct = ref.tokens[at], cand.tokens[at]
    if not rt.top or not ct.top:
        return None
    return rt.token in _reported(ct), ct.token in _reported(rt)


def tokens(ref: TextAnswer, cand: TextAnswer, params: Mapping[str, Any]) -> Scored | None:
    """Prefix and position-wise agreement of the token sequences, and at the first divergence
    vLLM's near-tie rule. None unless both sides have tokens or token ids."""
    keys = token_keys(ref, cand)
    if keys is None:
        return None
    floor = float(param(params, TOKENS_DEFAULTS, "min_prefix_agreement"))
    r, c = keys
    at = first_divergence(r, c)
    prefix = len(r) if at < 0 else at
    longest = max(len(r), len(c))
    same = sum(1 for a, b in zip(r, c, strict=False) if a == b)
    scores = {
        "prefix_agreement": float(prefix),
        "agreement_rate": same / longest if longest else 1.0,
        "ref_tokens": float(len(r)),
        "cand_tokens": float(len(c)),
    }
    contained = None
    if at < 0:
        if _has_top(ref) and _has_top(cand):
            scores["topk_contained"] = 1.0
    else:
        contained = _containment(ref, cand, at)
        if contained is not None:
            scores["topk_contained"] = float(all(contained))
    reason = ""
    if contained is not None and not all(contained):
        reason = _not_a_tie(ref, cand, at, contained)
    elif at >= 0 and prefix / max(len(r), 1) < floor:
        reason = (
            f"the token sequences part at position {at} of the reference's {len(r)}: prefix "
            f"agreement {prefix / max(len(r), 1):.4f} < {floor:g}"
        )
    # Over the longer sequence, so a candidate that runs on past the reference's end is not 0.
    severity = 0.0 if at < 0 else 1.0 - prefix / longest
    return Scored(scores, "prefix_agreement", severity, bool(reason), reason)


def _not_a_tie(ref: TextAnswer, cand: TextAnswer, at: int, contained: tuple[bool, bool]) -> str:
    assert ref.tokens is not None and cand.tokens is not None  # _containment checked both
    rt, ct = ref.tokens[at], cand.tokens[at]
    missing = []
    if not contained[0]:
        missing.append(f"the reference's token is not in the candidate's top-{len(ct.top)}")
    if not contained[1]:
        missing.append(f"the candidate's token is not in the reference's top-{len(rt.top)}")
    return (
        f"the answers part at token {at} (reference {rt.token!r}, candidate {ct.token!r}) and it "
        f"is not a near-tie: {' and '.join(missing)}"
    )


def _logprob(x: float) -> float:
    # NaN and +inf are not log probabilities: read as unknown-small, and nothing above 0.
    return min(max(x, LOGPROB_FLOOR), 0.0) if math.isfinite(x) else LOGPROB_FLOOR


def _distribution(t: TokenChoice) -> tuple[dict[str, float], float]:
    """The side's reported probabilities (top-k and the chosen token), token -> p, and the mass
    outside them. Two ids that decode to one text are one outcome here: their mass is added. A
    reported total over 1 (rounding on the server) is scaled back to 1."""
    probs: dict[str, float] = {}
    for tok, lp in t.top:
        probs[tok] = probs.get(tok, 0.0) + math.exp(_logprob(lp))
    if t.token not in probs:
        probs[t.token] = math.exp(_logprob(t.logprob))
    total = math.fsum(probs.values())
    if total > 1.0:
        probs = {k: v / total for k, v in probs.items()}
        total = 1.0
    return probs, max(0.0, 1.0 - total)


def _log(p: float) -> float:
    return math.log(p) if p > 0.0 else LOGPROB_FLOOR


def _kl(p: Mapping[str, float], q: Mapping[str, float]) -> float:
    """KL(P||Q) over the tokens both sides report, one bucket each, and one "rest" bucket holding
    everything else: a token only one side reports has an unknown probability on the other side,
    somewhere inside its unreported mass, so it joins the rest on both sides. Merging outcomes
    can only lower a KL divergence: this is a lower bound of the full-vocabulary KL."""
    kl = 0.0
    shared_p = shared_q = 0.0
    for tok, pv in p.items():
        qv = q.get(tok)
        if qv is None:
            continue
        shared_p += pv
        shared_q += qv
        if pv > 0.0:
            kl += pv * (_log(pv) - _log(qv))
    rest_p, rest_q = max(0.0, 1.0 - shared_p), max(0.0, 1.0 - shared_q)
    if rest_p > 0.0:
        kl += rest_p * (_log(rest_p) - _log(rest_q))
    # Both are distributions, so KL >= 0; rounding can leave a hair below.
    return max(0.0, kl)


def _delta_p(token: str, p: Mapping[str, float], q: Mapping[str, float], q_rest: float) -> float:
    """|p_cand - p_ref| of the reference's chosen token. When the candidate does not report it,
    its probability lies somewhere in the candidate's unreported mass: the value nearest the
    reference's is taken, so like the KL this is a lower bound."""
    pv = p[token]
    qv = q.get(token)
    if qv is None:
        qv = min(pv, q_rest)
    return abs(qv - pv)


def _top1(p: Mapping[str, float]) -> str:
    return max(p, key=lambda k: p[k])


def logprobs(ref: TextAnswer, cand: TextAnswer, params: Mapping[str, Any]) -> Scored | None:
    """Per-position KL(ref||cand), |delta p| of the reference's token and top-1 agreement, from
    the first position to the first divergence inclusive: after it the two answers continue
    from different contexts and their distributions no longer describe the same step (llama.cpp
    and vLLM stop there too). None unless both sides have tokens with top lists.

    llama.cpp's ``--kl-divergence`` scores full-vocabulary distributions of one teacher-forced
    text and reports mean, percentiles and max of KL and signed delta p, and "same top p". Here
    only top-k is known (so KL and |delta p| are lower bounds, see :func:`_kl`), the positions
    are the generated ones up to the divergence, delta p is absolute, and one request gives few
    positions, so only mean, p99 and max are kept (no standard errors)."""
    if not (_has_top(ref) and _has_top(cand)):
        return None
    assert ref.tokens is not None and cand.tokens is not None  # _has_top checked both
    keys = token_keys(ref, cand)
    at = first_divergence(*keys) if keys is not None else -1
    end = min(len(ref.tokens), len(cand.tokens))
    if at >= 0:
        end = min(end, at + 1)
    kls: list[float] = []
    dps: list[float] = []
    where: list[int] = []
    same_top = 0
    for i, (rt, ct) in enumerate(zip(ref.tokens[:end], cand.tokens[:end], strict=True)):
        if not rt.top or not ct.top:
            continue
        p, _ = _distribution(rt)
        q, q_rest = _distribution(ct)
        kls.append(_kl(p, q))
        dps.append(_delta_p(rt.token, p, q, q_rest))
        where.append(i)
        same_top += _top1(p) == _top1(q)
    if not kls:
        return None
    kl = np.asarray(kls, dtype=np.float64)
    return _logprobs_scored(kl, np.asarray(dps, dtype=np.float64), same_top, at, where, params)


def _logprobs_scored(
    kl: F64,
    dp: F64,
    same_top: int,
    at: int,
    where: Sequence[int],
    params: Mapping[str, Any],
) -> Scored:
    ceiling = float(param(params, LOGPROBS_DEFAULTS, "max_kl_mean"))
    n = int(kl.size)
    # Linear interpolation between order statistics, as llama.cpp's percentiles.
    scores = {
        "kl_mean": float(kl.mean()),
        "kl_p99": float(np.percentile(kl, 99)),
        "kl_max": float(kl.max()),
        "dp_mean": float(dp.mean()),
        "dp_p99": float(np.percentile(dp, 99)),
        "dp_max": float(dp.max()),
        "same_top_rate": same_top / n,
        "positions": float(n),
    }
    kl_mean = scores["kl_mean"]
    reason = ""
    if kl_mean > ceiling:
        upto = f" up to the first divergence (token {at})" if at >= 0 else ""
        reason = (
            f"the next-token distributions differ: mean KL(reference||candidate) {fmt(kl_mean)} "
            f"> {ceiling:g} over {n} position(s){upto}; max {fmt(scores['kl_max'])} at "
            f"token {where[int(kl.argmax())]}, top-1 agreement {scores['same_top_rate']:.1%}"
        )
    return Scored(scores, "kl_mean", kl_mean, bool(reason), reason)
