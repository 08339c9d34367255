"""The generated-text (LLM) comparators, on hand-computed cases."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest

from comparators import (
    SEVERITY_CAP,
    MetricSpec,
    OutputVerdict,
    SpecError,
    TextAnswer,
    TokenChoice,
    Validity,
    compare_output,
    compare_semantic,
    compare_text_answers,
    resolve_spec,
    validate_spec,
)

AUTO: Callable[[str], MetricSpec] = lambda _name: MetricSpec()  # noqa: E731


def by_output(verdicts: list[OutputVerdict]) -> dict[str, OutputVerdict]:
    out = {v.output: v for v in verdicts}
    assert len(out) == len(verdicts)
    for v in verdicts:
        json.dumps(v.to_dict(), allow_nan=False)
    return out


def one(ref: TextAnswer, cand: TextAnswer, output: str, **params: Any) -> OutputVerdict:
    verdicts = by_output(compare_text_answers(ref, cand, lambda _n: MetricSpec("auto", params)))
    return verdicts[output]


def tok(token: str, p: float, *top: tuple[str, float], token_id: int | None = None) -> TokenChoice:
    """A token with probability ``p`` and top-k given as probabilities (stored as logprobs)."""
    return TokenChoice(token, math.log(p), tuple((t, math.log(q)) for t, q in top), token_id)


# --- text ---------------------------------------------------------------------------------


def test_text_kitten_sitting() -> None:
    v = one(TextAnswer("kitten"), TextAnswer("sitting"), "text")
    # k->s, e->i, +g: 3 edits; the longer text has 7 chars.
    assert v.scores["edit_distance"] == 3.0
    assert v.scores["similarity"] == pytest.approx(1 - 3 / 7)
    assert v.scores["exact"] == 0.0 and v.scores["normalized_exact"] == 0.0
    assert v.scores["first_divergence_char"] == 0.0
    assert v.scores["ref_chars"] == 6.0 and v.scores["cand_chars"] == 7.0
    assert v.headline == "similarity" and v.valid
    assert v.flagged and v.severity == pytest.approx(3 / 7)
    assert "similarity 0.5714 < 0.9" in v.reason and "edit distance 3 over 7 chars" in v.reason


def test_text_identical_and_empty() -> None:
    v = one(TextAnswer("same"), TextAnswer("same"), "text")
    assert v.scores["exact"] == 1.0 and v.scores["similarity"] == 1.0
    assert v.scores["first_divergence_char"] == -1.0 and v.severity == 0.0 and not v.flagged
    assert v.reason == ""
    empty = one(TextAnswer(""), TextAnswer(""), "text")
    assert empty.scores["similarity"] == 1.0 and empty.scores["edit_distance"] == 0.0
    assert not empty.flagged


def test_text_first_divergence_char_and_token() -> None:
    ref = TextAnswer("The cat sat", token_ids=(10, 20, 30))
    cand = TextAnswer("The cat sits", token_ids=(10, 20, 31, 32))
    v = one(ref, cand, "text")
    assert v.scores["first_divergence_char"] == 9.0  # "The cat s" then 'a' vs 'i'
    assert v.scores["first_divergence_token"] == 2.0
    # One side without tokens: no token position to give.
    v = one(TextAnswer("The cat sat"), cand, "text")
    assert v.scores["first_divergence_token"] == -1.0
    # A candidate that runs on past the reference's end parts at the reference's length.
    v = one(TextAnswer("ab", token_ids=(1, 2)), TextAnswer("abc", token_ids=(1, 2, 3)), "text")
    assert v.scores["first_divergence_char"] == 2.0 and v.scores["first_divergence_token"] == 2.0


def test_text_normalized() -> None:
    ref, cand = TextAnswer("  Hello,   World!"), TextAnswer("hello, world")
    v = one(ref, cand, "text")
    assert v.scores["normalized_exact"] == 1.0 and v.scores["exact"] == 0.0
    assert v.flagged  # raw: 2 + 2 spaces, H, W and "!" are 7 edits over 17 chars
    v = one(ref, cand, "text", compare_normalized=True)
    assert v.headline == "normalized_similarity" and v.scores["normalized_similarity"] == 1.0
    assert not v.flagged and v.severity == 0.0
    # Punctuation inside the text is kept: "3.14" is not "314".
    v = one(TextAnswer("3.14"), TextAnswer("314."), "text")
    assert v.scores["normalized_exact"] == 0.0


def test_text_min_similarity_param() -> None:
    v = one(TextAnswer("kitten"), TextAnswer("sitting"), "text", min_similarity=0.5)
    assert not v.flagged and v.reason == "" and v.severity == pytest.approx(3 / 7)


# --- tokens -------------------------------------------------------------------------------


def test_tokens_prefix_and_agreement_from_ids() -> None:
    ref = TextAnswer("x", token_ids=(1, 2, 3, 4))
    cand = TextAnswer("y", token_ids=(1, 2, 5, 4, 6))
    v = one(ref, cand, "tokens")
    assert v.scores["prefix_agreement"] == 2.0
    assert v.scores["agreement_rate"] == pytest.approx(3 / 5)  # 1, 2 and 4 agree; 5 long
    assert v.scores["ref_tokens"] == 4.0 and v.scores["cand_tokens"] == 5.0
    assert "topk_contained" not in v.scores
    assert v.severity == pytest.approx(1 - 2 / 5)
    # Without top-k the tokens aspect does not flag by default: the text score covers it.
    assert not v.flagged
    v = one(ref, cand, "tokens", min_prefix_agreement=0.75)
    assert v.flagged and "prefix agreement 0.5000 < 0.75" in v.reason


def test_tokens_ids_win_over_strings() -> None:
    # Same text pieces, different ids (another tokenizer): a divergence at 0.
    ref = TextAnswer("ab", tokens=(tok("a", 0.9, token_id=1), tok("b", 0.9, token_id=2)))
    cand = TextAnswer("ab", tokens=(tok("a", 0.9, token_id=7), tok("b", 0.9, token_id=2)))
    assert one(ref, cand, "tokens").scores["prefix_agreement"] == 0.0
    # One side without ids: the strings are compared.
    plain = TextAnswer("ab", tokens=(tok("a", 0.9), tok("b", 0.9)))
    assert one(ref, plain, "tokens").scores["prefix_agreement"] == 2.0


def test_tokens_absent_without_tokens_on_both_sides() -> None:
    outputs = by_output(
        compare_text_answers(TextAnswer("a", token_ids=(1,)), TextAnswer("a"), AUTO)
    )
    assert "tokens" not in outputs and "logprobs" not in outputs


def near_tie_pair(cand_top: tuple[tuple[str, float], ...]) -> tuple[TextAnswer, TextAnswer]:
    ref = TextAnswer(
        "AB", tokens=(tok("A", 0.9, ("A", 0.9)), tok("B", 0.5, ("B", 0.5), ("C", 0.45)))
    )
    cand = TextAnswer("AC", tokens=(tok("A", 0.9, ("A", 0.9)), tok("C", cand_top[0][1], *cand_top)))
    return ref, cand


def test_tokens_topk_contained_accepted() -> None:
    # vLLM's rule: B (reference) is in the candidate's top-2, C (candidate) in the reference's.
    ref, cand = near_tie_pair((("C", 0.5), ("B", 0.45)))
    v = one(ref, cand, "tokens")
    assert v.scores["prefix_agreement"] == 1.0 and v.scores["topk_contained"] == 1.0
    assert not v.flagged and v.reason == ""
    assert v.severity == pytest.approx(0.5)


def test_tokens_topk_contained_rejected() -> None:
    # The candidate's top-2 lacks B: not a near-tie.
    ref, cand = near_tie_pair((("C", 0.9), ("D", 0.05)))
    v = one(ref, cand, "tokens")
    assert v.scores["topk_contained"] == 0.0 and v.flagged
    assert "part at token 1 (reference 'B', candidate 'C')" in v.reason
    assert "the reference's token is not in the candidate's top-2" in v.reason
    assert "the candidate's token is not in" not in v.reason


def test_tokens_no_divergence_is_contained() -> None:
    ref, _ = near_tie_pair((("C", 0.5),))
    v = one(ref, ref, "tokens")
    assert v.scores["topk_contained"] == 1.0 and v.severity == 0.0 and not v.flagged


# --- logprobs -----------------------------------------------------------------------------


def test_logprobs_kl_by_hand() -> None:
    # Reference: a 0.6, b 0.3, rest 0.1; candidate: a 0.5, b 0.4, rest 0.1.
    ref = TextAnswer("a", tokens=(tok("a", 0.6, ("a", 0.6), ("b", 0.3)),))
    cand = TextAnswer("a", tokens=(tok("a", 0.5, ("a", 0.5), ("b", 0.4)),))
    v = one(ref, cand, "logprobs")
    kl = 0.6 * math.log(0.6 / 0.5) + 0.3 * math.log(0.3 / 0.4) + 0.1 * math.log(0.1 / 0.1)
    assert kl == pytest.approx(0.0230883, abs=1e-7)  # 0.1093929 - 0.0863046
    assert v.scores["kl_mean"] == pytest.approx(kl, rel=1e-12)
    assert v.scores["kl_max"] == pytest.approx(kl, rel=1e-12)
    assert v.scores["kl_p99"] == pytest.approx(kl, rel=1e-12)
    assert v.scores["dp_mean"] == pytest.approx(0.1)  # |0.5 - 0.6| for the reference's "a"
    assert v.scores["same_top_rate"] == 1.0 and v.scores["positions"] == 1.0
    assert v.headline == "kl_mean" and v.severity == pytest.approx(kl)
    assert not v.flagged  # 0.023 <= 0.1


def test_logprobs_token_on_one_side_joins_the_rest() -> None:
    # The candidate does not report b, nor the reference c: both go to the rest bucket.
    # Reference {a: 0.6, rest: 0.4}, candidate {a: 0.5, rest: 0.5}.
    ref = TextAnswer("b", tokens=(tok("b", 0.3, ("a", 0.6), ("b", 0.3)),))
    cand = TextAnswer("c", tokens=(tok("c", 0.4, ("a", 0.5), ("c", 0.4)),))
    v = one(ref, cand, "logprobs")
    kl = 0.6 * math.log(0.6 / 0.5) + 0.4 * math.log(0.4 / 0.5)  # 0.1093929 - 0.0892574
    assert v.scores["kl_mean"] == pytest.approx(kl, rel=1e-12)
    # p_ref(b) = 0.3; the candidate's b lies in its unreported 0.1: |dp| >= 0.3 - 0.1.
    assert v.scores["dp_mean"] == pytest.approx(0.2)
    assert v.scores["same_top_rate"] == 1.0  # a on both sides


def test_logprobs_flag_and_stop_at_the_divergence() -> None:
    # Position 0 agrees exactly; position 1 diverges; position 2 must not be compared.
    same = tok("x", 0.9, ("x", 0.9), ("y", 0.05))
    ref_1 = tok("a", 0.9, ("a", 0.9), ("b", 0.05))
    cand_1 = tok("b", 0.65, ("b", 0.65), ("a", 0.3))
    later = tok("z", 0.01, ("q", 0.99))
    ref = TextAnswer("xaz", tokens=(same, ref_1, tok("z", 0.9, ("z", 0.9))))
    cand = TextAnswer("xbz", tokens=(same, cand_1, later))
    v = one(ref, cand, "logprobs")
    assert v.scores["positions"] == 2.0
    # KL at 1: 0.9 ln(0.9/0.3) + 0.05 ln(0.05/0.65) + 0.05 ln(0.05/0.05) = 0.9887511 - 0.1282475
    kl_1 = 0.9 * math.log(3) + 0.05 * math.log(0.05 / 0.65)
    assert v.scores["kl_max"] == pytest.approx(kl_1, rel=1e-12)
    assert v.scores["kl_mean"] == pytest.approx(kl_1 / 2, rel=1e-12)
    assert v.scores["dp_max"] == pytest.approx(0.6)  # a: 0.9 -> 0.3
    assert v.scores["same_top_rate"] == 0.5  # x/x agree, a/b do not
    assert v.flagged and v.severity == pytest.approx(kl_1 / 2)
    assert "up to the first divergence (token 1)" in v.reason and "at token 1" in v.reason
    assert one(ref, cand, "logprobs", max_kl_mean=1.0).flagged is False


def test_logprobs_clamped_and_json_safe() -> None:
    # A zero probability (vLLM's -9999 floor) and a NaN logprob stay finite.
    ref = TextAnswer("a", tokens=(TokenChoice("a", 0.0, (("a", 0.0), ("b", -9999.0))),))
    cand = TextAnswer("b", tokens=(TokenChoice("b", math.nan, (("b", 0.0), ("a", -math.inf))),))
    v = one(ref, cand, "logprobs")
    assert math.isfinite(v.scores["kl_mean"]) and v.scores["kl_mean"] == pytest.approx(9999.0)
    assert v.flagged


# --- finish reason, usage, latency --------------------------------------------------------


def test_finish_reason() -> None:
    v = one(
        TextAnswer("a", finish_reason="stop"),
        TextAnswer("a", finish_reason="length"),
        "finish_reason",
    )
    assert v.scores["same"] == 0.0 and v.flagged and v.severity == 1.0
    assert "'length'" in v.reason and "'stop'" in v.reason
    v = one(TextAnswer("a", finish_reason="stop"), TextAnswer("a"), "finish_reason")
    assert v.scores["same"] == 0.0 and not v.flagged and v.severity == 0.0
    v = one(
        TextAnswer("a", finish_reason="stop"),
        TextAnswer("a", finish_reason="length"),
        "finish_reason",
        enabled=False,
    )
    assert not v.flagged and v.reason == ""


def test_usage_prompt_tokens_mismatch_flagged() -> None:
    ref = TextAnswer("a", usage={"prompt_tokens": 12, "completion_tokens": 5})
    cand = TextAnswer("a", usage={"prompt_tokens": 13, "completion_tokens": 9})
    v = one(ref, cand, "usage")
    assert v.scores["prompt_tokens_ref"] == 12.0 and v.scores["prompt_tokens_cand"] == 13.0
    assert v.scores["prompt_tokens_equal"] == 0.0 and v.scores["completion_tokens_diff"] == 4.0
    assert v.flagged and "13 prompt tokens, the reference 12" in v.reason


def test_usage_completion_difference_not_flagged() -> None:
    ref = TextAnswer("a", usage={"prompt_tokens": 12, "completion_tokens": 5})
    cand = TextAnswer("a", usage={"prompt_tokens": 12, "completion_tokens": 50})
    v = one(ref, cand, "usage")
    assert v.scores["prompt_tokens_equal"] == 1.0 and v.scores["completion_tokens_diff"] == 45.0
    assert not v.flagged and v.severity == 0.0
    # Counts one side did not report are left out, never flagged.
    v = one(ref, TextAnswer("a"), "usage")
    assert "prompt_tokens_cand" not in v.scores and "prompt_tokens_equal" not in v.scores
    assert not v.flagged


def test_latency_never_flagged() -> None:
    ref = TextAnswer("a", ttft_s=0.1, tpot_s=0.02)
    cand = TextAnswer("a", ttft_s=50.0, tpot_s=3.0)
    v = one(ref, cand, "latency")
    assert v.scores["ttft_ratio"] == pytest.approx(500.0)
    assert v.scores["tpot_ref_s"] == 0.02 and v.scores["tpot_cand_s"] == 3.0
    assert not v.flagged and v.severity == 0.0
    outputs = by_output(compare_text_answers(ref, TextAnswer("a"), AUTO))
    assert "latency" not in outputs


# --- JSON and tool calls ------------------------------------------------------------------


def json_pair(r: str, c: str) -> OutputVerdict:
    return one(TextAnswer(r, json_expected=True), TextAnswer(c), "json")


def test_json_valid_vs_invalid() -> None:
    v = json_pair('{"a": 1}', '{"a": 1')
    assert v.scores["ref_valid"] == 1.0 and v.scores["cand_valid"] == 0.0
    assert v.scores["schema_agreement"] == 0.0 and v.flagged and v.severity == 1.0
    assert "the candidate's answer is not valid JSON" in v.reason
    # An invalid reference cannot blame the candidate.
    v = json_pair('{"a": 1', '{"a": 1}')
    assert v.scores["ref_valid"] == 0.0 and not v.flagged
    # NaN is not JSON.
    assert json_pair('{"a": 1}', '{"a": NaN}').scores["cand_valid"] == 0.0


def test_json_structure() -> None:
    v = json_pair('{"a": 1, "b": [1, 2]}', '{"b": [3], "a": 7.5}')
    assert v.scores["schema_agreement"] == 1.0 and not v.flagged  # values and lengths differ
    v = json_pair('{"a": 1}', '{"a": "1"}')
    assert v.flagged and "$.a is a number in the reference, a string in the candidate" in v.reason
    v = json_pair('{"a": {"x": 1, "y": 2}}', '{"a": {"x": 1, "z": 2}}')
    assert (
        v.flagged
        and "$.a has keys only in the reference: y; keys only in the candidate: z" in v.reason
    )
    v = json_pair('{"l": [{"x": 1}]}', '{"l": [{"y": 1}]}')
    assert v.flagged and "$.l[]" in v.reason
    assert not json_pair('{"l": []}', '{"l": [{"y": 1}]}').flagged  # an empty array fits
    assert json_pair("[true]", "[1]").flagged  # a boolean is not a number in JSON


def test_json_absent_unless_asked_or_tool_calls() -> None:
    outputs = by_output(compare_text_answers(TextAnswer("{"), TextAnswer("}"), AUTO))
    assert "json" not in outputs


def calls(*pairs: tuple[str, dict[str, Any]]) -> str:
    return json.dumps([{"name": n, "arguments": json.dumps(a)} for n, a in pairs])


def test_tool_calls_different_function_names() -> None:
    ref = TextAnswer("", tool_calls=calls(("get_weather", {"city": "Paris"})))
    cand = TextAnswer("", tool_calls=calls(("get_time", {"city": "Paris"})))
    v = one(ref, cand, "json")
    assert v.flagged and v.scores["schema_agreement"] == 0.0
    assert "the reference calls [get_weather], the candidate [get_time]" in v.reason
    # No call at all where the reference made one.
    v = one(ref, TextAnswer("It is sunny in Paris."), "json")
    assert v.flagged and v.scores["cand_tool_calls"] == 0.0


def test_tool_calls_argument_structure() -> None:
    ref = TextAnswer("", tool_calls=calls(("get_weather", {"city": "Paris", "days": 3})))
    same = TextAnswer("", tool_calls=calls(("get_weather", {"days": 5, "city": "Lyon"})))
    assert one(ref, same, "json").scores["schema_agreement"] == 1.0
    other = TextAnswer("", tool_calls=calls(("get_weather", {"city": "Paris", "days": "3"})))
    v = one(ref, other, "json")
    assert v.flagged and "tool call 0 (get_weather)" in v.reason and "$.days" in v.reason
    # OpenAI's form (the function inside each call) reads the same.
    openai = json.dumps(
        [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Rome", "days": 1}'},
            }
        ]
    )
    assert one(ref, TextAnswer("", tool_calls=openai), "json").scores["schema_agreement"] == 1.0
    broken = TextAnswer("", tool_calls='[{"name": "get_weather", "arguments": "{\\"city\\":"}]')
    v = one(ref, broken, "json")
    assert v.flagged and v.scores["cand_valid"] == 0.0 and "arguments of call 0" in v.reason


# --- incomplete answers, specs, names -----------------------------------------------------


def test_incomplete_candidate_flagged_reference_not() -> None:
    full, cut = TextAnswer("abc"), TextAnswer("ab", incomplete=True)
    [v] = compare_text_answers(full, cut, AUTO)
    assert v.output == "text" and v.metric == "text" and v.validity is Validity.EMPTY
    assert v.flagged and v.severity == SEVERITY_CAP
    assert v.reason.startswith("candidate stream incomplete")
    [v] = compare_text_answers(cut, full, AUTO, prefix="choices[2].")
    assert v.output == "choices[2].text" and v.validity is Validity.EMPTY
    assert not v.flagged and v.severity == 0.0
    assert v.reason.startswith("reference stream incomplete")
    [v] = compare_text_answers(cut, cut, AUTO)
    assert not v.flagged


def test_prefix_and_spec_names() -> None:
    asked: list[str] = []

    def spec_for(name: str) -> MetricSpec:
        asked.append(name)
        return MetricSpec()

    ref = TextAnswer("a", token_ids=(1,), finish_reason="stop", ttft_s=0.1)
    verdicts = compare_text_answers(ref, ref, spec_for, prefix="choices[1].")
    assert [v.output for v in verdicts] == [
        "choices[1].text",
        "choices[1].tokens",
        "choices[1].finish_reason",
        "choices[1].usage",
        "choices[1].latency",
    ]
    assert [v.metric for v in verdicts] == ["text", "tokens", "finish_reason", "usage", "latency"]
    assert asked == ["text", "tokens", "logprobs", "finish_reason", "usage", "json", "latency"]
    assert not any(v.flagged for v in verdicts)


def test_auto_table_entry_with_llm_params() -> None:
    table: Mapping[str, Mapping[str, Mapping[str, Any]]] = {
        "*": {"*": {"metric": "auto", "min_similarity": 0.5}}
    }
    spec = resolve_spec(table, "llama", "text")
    validate_spec(spec)
    verdicts = compare_text_answers(
        TextAnswer("kitten"), TextAnswer("sitting"), lambda o: resolve_spec(table, "llama", o)
    )
    assert not by_output(verdicts)["text"].flagged
    # The array metrics ignore the LLM params under auto.
    assert compare_output("o", np.array([1.0]), np.array([1.0]), spec).valid


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            MetricSpec("text", {"min_similarity": 1.5}),
            "param 'min_similarity' of metric 'text' must be a number in [0, 1], got 1.5",
        ),
        (
            MetricSpec("text", {"max_kl_mean": 0.2}),
            "metric 'text' takes no param 'max_kl_mean'; it takes: compare_normalized, "
            "min_similarity ('max_kl_mean' belongs to: logprobs)",
        ),
        (
            MetricSpec("finish_reason", {"enabled": "yes"}),
            "param 'enabled' of metric 'finish_reason' must be true or false",
        ),
        (MetricSpec("auto", {"compare_normalized": 1}), "param 'compare_normalized'"),
        (MetricSpec("logprobs", {"max_kl_mean": -1}), "param 'max_kl_mean'"),
        (MetricSpec("tokens", {"min_prefix_agreement": 2}), "param 'min_prefix_agreement'"),
        (
            MetricSpec("semantic", {"min_similarity": 0.9}),
            "metric 'semantic' takes no param 'min_similarity'",
        ),
        (MetricSpec("txt"), "unknown metric 'txt' (did you mean 'text'?)"),
    ],
)
def test_spec_validation_names_the_bad_param(spec: MetricSpec, message: str) -> None:
    with pytest.raises(SpecError) as info:
        validate_spec(spec)
    assert message in str(info.value)


def test_llm_specs_validate() -> None:
    specs: list[tuple[str, dict[str, Any]]] = [
        ("text", {"min_similarity": 0.8, "compare_normalized": True}),
        ("tokens", {"min_prefix_agreement": 0.5}),
        ("logprobs", {"max_kl_mean": 0.05}),
        ("finish_reason", {"enabled": False}),
        ("usage", {"enabled": True}),
        ("json", {"enabled": False}),
        ("latency", {}),
        ("semantic", {"min_cosine": 0.8}),
        ("auto", {"min_similarity": 0.8, "max_kl_mean": 0.2, "atol": 1e-3}),
    ]
    for name, params in specs:
        validate_spec(MetricSpec(name, params))


def test_bad_spec_becomes_a_verdict() -> None:
    bad = MetricSpec("text", {"min_similarity": 2})
    v = by_output(compare_text_answers(TextAnswer("a"), TextAnswer("a"), lambda _n: bad))["text"]
    assert v.validity is Validity.UNSUPPORTED and v.flagged
    assert "bad metric spec" in v.reason and "'min_similarity'" in v.reason
    # An array metric (a wildcard meant for tensors) is said, not flagged.
    outputs = by_output(
        compare_text_answers(TextAnswer("a"), TextAnswer("b"), lambda _n: MetricSpec("sqnr"))
    )
    assert outputs["text"].validity is Validity.UNSUPPORTED and not outputs["text"].flagged
    assert "metric 'sqnr' cannot score the 'text'" in outputs["text"].reason
    # And an LLM metric named for an array output is a verdict too.
    v = compare_output("o", np.array([1.0]), np.array([1.0]), MetricSpec("text"))
    assert v.validity is Validity.UNSUPPORTED and "scores generated-text answers" in v.reason


def test_every_verdict_is_json() -> None:
    top = (("a", 0.6), ("b", 0.3))
    ref = TextAnswer(
        '{"a": 1}',
        tokens=(tok("a", 0.6, *top), tok("b", 0.3, *top)),
        finish_reason="stop",
        usage={"prompt_tokens": 3, "completion_tokens": 2},
        json_expected=True,
        ttft_s=0.0,
    )
    cand = TextAnswer(
        "{",
        tokens=(tok("b", 1e-300, ("c", 1.0)),),
        finish_reason="length",
        usage={"prompt_tokens": 4},
        tool_calls="not json",
        ttft_s=math.inf,
        tpot_s=math.nan,
    )
    verdicts = compare_text_answers(ref, cand, AUTO, prefix="choices[0].")
    assert len(verdicts) == 7
    for v in verdicts:
        text = json.dumps(v.to_dict(), allow_nan=False)
        assert "NaN" not in text and "Infinity" not in text


# --- semantic -----------------------------------------------------------------------------


def test_semantic_cosine() -> None:
    v = compare_semantic(np.array([1.0, 0.0]), np.array([1.0, 1.0]), MetricSpec())
    assert v.output == "semantic" and v.metric == "semantic" and v.headline == "cosine"
    assert v.scores["cosine"] == pytest.approx(1 / math.sqrt(2))  # 1 / (1 * sqrt 2)
    assert v.flagged and v.severity == pytest.approx(1 - 1 / math.sqrt(2))
    v = compare_semantic([1.0, 0.0], [1.0, 1.0], MetricSpec("semantic", {"min_cosine": 0.7}))
    assert not v.flagged
    same = compare_semantic(
        np.array([0.3, 0.4], np.float16), np.array([0.3, 0.4], np.float16), MetricSpec()
    )
    assert same.scores["cosine"] == 1.0 and same.severity == 0.0


def test_semantic_bad_data_and_spec() -> None:
    v = compare_semantic([1.0, 0.0], [1.0, 0.0, 0.0], MetricSpec())
    assert v.validity is Validity.SHAPE_MISMATCH and v.metric == "semantic" and v.flagged
    v = compare_semantic([1.0, 0.0], [np.nan, 0.0], MetricSpec())
    assert v.validity is Validity.NON_FINITE
    v = compare_semantic([1.0], [1.0], MetricSpec("semantic", {"min_cosine": 2}))
    assert v.validity is Validity.UNSUPPORTED and "'min_cosine'" in v.reason
    v = compare_semantic([1.0], [1.0], MetricSpec("cosine"))
    assert v.validity is Validity.UNSUPPORTED and "metric 'cosine'" in v.reason
