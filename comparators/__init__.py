"""shadowproxy's scoring library: pure functions from a reference/candidate pair of outputs to a
small frozen verdict. It imports no aiohttp, redis or proxy code, and torch only if handed a
tensor, so it can run in any worker process.

Computation is in float64 after widening (fp16, bf16 and float8 included) with the reference as
the signal and the denominator. Data problems (missing outputs, shape or dtype mismatch, NaN/Inf,
empty arrays) become verdicts with a reason, never exceptions; flagged invalid verdicts carry
``SEVERITY_CAP`` as their severity so they sort first for review. Generated-text answers (LLM
traffic) are scored aspect by aspect by :func:`compare_text_answers`.
"""

from comparators.base import SEVERITY_CAP, SQNR_CAP_DB, Comparator, ComparatorsError, SpecError
from comparators.compare import compare_output, compare_outputs
from comparators.llm import compare_semantic, compare_text_answers
from comparators.llm_types import TextAnswer, TokenChoice
from comparators.registry import METRICS, choose_metric, resolve_spec, validate_spec
from comparators.types import MetricSpec, OutputVerdict, Validity

__all__ = [
    "METRICS",
    "SEVERITY_CAP",
    "SQNR_CAP_DB",
    "Comparator",
    "ComparatorsError",
    "MetricSpec",
    "OutputVerdict",
    "SpecError",
    "TextAnswer",
    "TokenChoice",
    "Validity",
    "choose_metric",
    "compare_output",
    "compare_outputs",
    "compare_semantic",
    "compare_text_answers",
    "resolve_spec",
    "validate_spec",
]
