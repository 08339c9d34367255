"""Text-level scores of a generated-answer pair: how far the texts are apart (exact, normalised,
Levenshtein) and, for JSON answers and tool calls, whether both parse and share a structure."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from rapidfuzz.distance import Levenshtein

from comparators.base import Scored, param
from comparators.llm_tokens import first_divergence, token_keys
from comparators.llm_types import TextAnswer

# A tenth of the characters edited. `compare_normalized` is not called `normalize`: exact_text
# takes a `normalize` naming a normaliser, and under `metric: auto` one table entry feeds both.
TEXT_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {"min_similarity": 0.9, "compare_normalized": False}
)
JSON_DEFAULTS: Mapping[str, Any] = MappingProxyType({"enabled": True})
_SNIPPET = 24


def normalize_text(s: str) -> str:
    """Casefolded, whitespace runs collapsed to one space, punctuation stripped at both ends
    (HF evaluate's exact_match options, but punctuation inside the text is kept: it can carry
    meaning, "3.14" against "314")."""
    s = " ".join(s.casefold().split())
    start, end = 0, len(s)
    while start < end and _edge(s[start]):
        start += 1
    while end > start and _edge(s[end - 1]):
        end -= 1
    return s[start:end]


def _edge(ch: str) -> bool:
    return ch == " " or unicodedata.category(ch).startswith("P")


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _similarity(distance: int, a: str, b: str) -> float:
    longest = max(len(a), len(b))
    return 1.0 - distance / longest if longest else 1.0


def _snippet(s: str, at: int) -> str:
    start = max(0, at - _SNIPPET // 2)
    return s[start : start + _SNIPPET]


def text(ref: TextAnswer, cand: TextAnswer, params: Mapping[str, Any]) -> Scored:
    """Exact and normalised equality, Levenshtein distance and similarity (characters), and
    where the texts and the token sequences first differ. Flagged below ``min_similarity``,
    measured on the normalised texts when ``compare_normalized``."""
    floor = float(param(params, TEXT_DEFAULTS, "min_similarity"))
    normalized = bool(param(params, TEXT_DEFAULTS, "compare_normalized"))
    r, c = ref.text, cand.text
    nr, nc = normalize_text(r), normalize_text(c)
    distance = int(Levenshtein.distance(r, c))
    similarity = _similarity(distance, r, c)
    keys = token_keys(ref, cand)
    scores = {
        "exact": float(r == c),
        "normalized_exact": float(nr == nc),
        "edit_distance": float(distance),
        "similarity": similarity,
        "first_divergence_char": -1.0 if r == c else float(_common_prefix(r, c)),
        "first_divergence_token": float(first_divergence(*keys)) if keys is not None else -1.0,
        "ref_chars": float(len(r)),
        "cand_chars": float(len(c)),
    }
    headline, shown_r, shown_c, shown_distance = "similarity", r, c, distance
    if normalized:
        headline, shown_r, shown_c = "normalized_similarity", nr, nc
        shown_distance = int(Levenshtein.distance(nr, nc))
        scores[headline] = _similarity(shown_distance, nr, nc)
    value = scores[headline]
    reason = ""
    if value < floor:
        at = _common_prefix(shown_r, shown_c)
        what = "normalised texts differ" if normalized else "texts differ"
        reason = (
            f"the {what}: similarity {value:.4f} < {floor:g} (edit distance {shown_distance} "
            f"over {max(len(shown_r), len(shown_c))} chars); first difference at char {at}: "
            f"reference {_snippet(shown_r, at)!r} vs candidate {_snippet(shown_c, at)!r}"
        )
    return Scored(scores, headline, 1.0 - value, bool(reason), reason)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads(s: str) -> tuple[Any, str | None]:
    """(the value, None) or (None, why it is not JSON). Strict: NaN and Infinity are refused."""
    try:
        return json.loads(s, parse_constant=_reject_constant), None
    except (ValueError, RecursionError) as exc:
        return None, str(exc) or type(exc).__name__


def _kind(v: Any) -> str:
    if isinstance(v, dict):
        return "object"
    if isinstance(v, list):
        return "array"
    if isinstance(v, str):
        return "string"
    if isinstance(v, bool):  # before int: bool is an int in Python, not in JSON
        return "boolean"
    return "null" if v is None else "number"


def _signature(v: Any) -> Any:
    """A hashable form of ``v``'s structure: key sets and types, no values, no array lengths."""
    if isinstance(v, dict):
        return ("object", tuple(sorted((k, _signature(x)) for k, x in v.items())))
    if isinstance(v, list):
        return ("array", frozenset(_signature(x) for x in v))
    return _kind(v)


def structure_diff(a: Any, b: Any, path: str = "$") -> str | None:
    """Where two parsed JSON values first differ in structure (the same keys at every level and
    the same JSON type at every path), None when they agree. Arrays agree when every item shape
    of each side has a match on the other: the number of items is a value, and an empty array
    fits any item shape."""
    ka, kb = _kind(a), _kind(b)
    if ka != kb:
        return f"{path} is {_article(ka)} in the reference, {_article(kb)} in the candidate"
    if ka == "object":
        if a.keys() != b.keys():
            return _keys_diff(path, a.keys() - b.keys(), b.keys() - a.keys())
        for key in sorted(a):
            diff = structure_diff(a[key], b[key], f"{path}.{key}")
            if diff is not None:
                return diff
    elif ka == "array" and a and b:
        # One representative per item shape: arrays of many alike items cost one comparison.
        ra = list({_signature(x): x for x in a}.values())
        rb = list({_signature(x): x for x in b}.values())
        for mine, theirs, flip in ((ra, rb, False), (rb, ra, True)):
            for x in mine:
                if all(structure_diff(x, y) is not None for y in theirs):
                    first = (theirs[0], x) if flip else (x, theirs[0])
                    return structure_diff(*first, f"{path}[]")
    return None


def _article(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _keys_diff(path: str, only_ref: set[str], only_cand: set[str]) -> str:
    parts = []
    if only_ref:
        parts.append(f"keys only in the reference: {', '.join(sorted(only_ref))}")
    if only_cand:
        parts.append(f"keys only in the candidate: {', '.join(sorted(only_cand))}")
    return f"{path} has " + "; ".join(parts)


def _calls(raw: str | None) -> tuple[list[tuple[str, Any]] | None, str | None]:
    """The tool calls as (function name, parsed arguments), or (None, why they are invalid).
    Takes the assembled form (``[{"name", "arguments"}]``) and OpenAI's (``function`` inside
    each call); arguments arrive as JSON text, and an empty text means no arguments."""
    if raw is None:
        return [], None
    parsed, error = _loads(raw)
    if error is not None:
        return None, f"not JSON: {error}"
    if not isinstance(parsed, list):
        return None, f"{_article(_kind(parsed))}, not a list"
    calls: list[tuple[str, Any]] = []
    for i, call in enumerate(parsed):
        fn = call.get("function", call) if isinstance(call, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(fn, dict) or not isinstance(name, str):
            return None, f"call {i} has no function name"
        args = fn.get("arguments", "")
        if isinstance(args, str):
            args, error = _loads(args) if args.strip() else ({}, None)
            if error is not None:
                return None, f"the arguments of call {i} ({name}) are not JSON: {error}"
        calls.append((name, args))
    return calls, None


def _calls_diff(r: list[tuple[str, Any]], c: list[tuple[str, Any]]) -> str | None:
    names_r, names_c = [n for n, _ in r], [n for n, _ in c]
    if names_r != names_c:
        return (
            f"the tool calls differ: the reference calls [{', '.join(names_r)}], the candidate "
            f"[{', '.join(names_c)}]"
        )
    for i, ((name, ra), (_, ca)) in enumerate(zip(r, c, strict=True)):
        diff = structure_diff(ra, ca)
        if diff is not None:
            return f"the arguments of tool call {i} ({name}) differ in structure: {diff}"
    return None


def _text_diff(r: Any, c: Any) -> str | None:
    diff = structure_diff(r, c)
    return None if diff is None else f"the JSON structure differs: {diff}"


def _check(
    parsed_ref: tuple[Any, str | None],
    parsed_cand: tuple[Any, str | None],
    differ: Callable[[Any, Any], str | None],
    invalid: str,
) -> tuple[dict[str, float], str | None]:
    """The scores and the problem (None when fine) of two parsed sides, each (value, error)."""
    (rv, r_err), (cv, c_err) = parsed_ref, parsed_cand
    scores = {"ref_valid": float(r_err is None), "cand_valid": float(c_err is None)}
    scores["schema_agreement"] = 0.0
    if r_err is not None:
        return scores, None  # an invalid reference cannot say what the candidate should give
    if c_err is not None:
        return scores, invalid.format(c_err)
    diff = differ(rv, cv)
    scores["schema_agreement"] = float(diff is None)
    return scores, diff


def json_structure(ref: TextAnswer, cand: TextAnswer, params: Mapping[str, Any]) -> Scored | None:
    """Validity and structural agreement of JSON answers: the tool calls when either side made
    any (they are the answer then), else the texts when the request asked for JSON. Flagged when
    the reference is valid and the candidate is not, or when their structures differ."""
    if ref.tool_calls is not None or cand.tool_calls is not None:
        rc, cc = _calls(ref.tool_calls), _calls(cand.tool_calls)
        invalid = "the candidate's tool calls are invalid ({}) and the reference's are valid"
        scores, problem = _check(rc, cc, _calls_diff, invalid)
        for key, (calls, _) in (("ref_tool_calls", rc), ("cand_tool_calls", cc)):
            if calls is not None:
                scores[key] = float(len(calls))
    elif ref.json_expected:
        invalid = "the candidate's answer is not valid JSON ({}) and the reference's is"
        scores, problem = _check(_loads(ref.text), _loads(cand.text), _text_diff, invalid)
    else:
        return None
    if problem is None:
        return Scored(scores, "schema_agreement", 0.0, False)
    flagged = bool(param(params, JSON_DEFAULTS, "enabled"))
    return Scored(scores, "schema_agreement", 1.0, flagged, problem if flagged else "")
