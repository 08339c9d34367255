"""The codec side of ``loadtest.fuzz``: V2 bodies, and the only exception they may raise.

Bodies are built from JSON parts (outputs of any datatype, shape and data, binary parts, header
lengths, gzip/deflate) or mangled, then read by ``decode_infer_response``,
``parse_request_header`` and ``unsafe_to_mirror``: they return, or raise ``MalformedMessage``
(``TooLarge`` included), never anything else.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from loadtest.fuzz_heads import mutate
from proxy.protocols.base import MalformedMessage, TooLarge
from proxy.protocols.v2_rest.codec import (
    HEADER_LENGTH,
    decode_infer_response,
    parse_request_header,
    unsafe_to_mirror,
)

_DATATYPES = ["BOOL", "BYTES", "BF16", "FP16", "FP32", "FP64", "INT8", "INT64", "UINT8", "UINT64"]
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
_OUTPUT = st.fixed_dictionaries(
    {},
    optional={
        "name": st.text(max_size=4) | _JSON,
        "datatype": st.sampled_from(_DATATYPES) | _JSON,
        "shape": st.lists(st.integers(-2, 5) | st.just(2**40), max_size=3) | _JSON,
        "data": st.lists(st.integers(-300, 300) | st.floats() | st.text(max_size=3), max_size=8)
        | _JSON,
        "parameters": st.fixed_dictionaries(
            {}, optional={"binary_data_size": st.integers(-1, 64), "shared_memory_region": _JSON}
        )
        | _JSON,
    },
)
_MESSAGE = st.fixed_dictionaries(
    {},
    optional={
        "outputs": st.lists(_OUTPUT, max_size=4) | _JSON,
        "inputs": st.lists(_OUTPUT, max_size=3) | _JSON,
        "model_name": _JSON,
        "model_version": _JSON,
        "id": _JSON,
        "parameters": st.fixed_dictionaries(
            {}, optional={"sequence_id": _JSON, "sequence_start": _JSON}
        )
        | _JSON,
    },
)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """A V2-like body and its headers: JSON from parts, maybe a binary tail, maybe compressed,
    maybe mangled; or plain random bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200)), {}
    header = json.dumps(draw(_MESSAGE)).encode()
    tail = draw(st.binary(max_size=64))
    headers: dict[str, str] = {}
    if tail:
        length = draw(st.just(len(header)) | st.integers(-2, len(header) + len(tail) + 2))
        headers[HEADER_LENGTH] = draw(st.just(str(length)) | st.text(max_size=4))
    raw = header + tail
    coding = draw(st.sampled_from(["", "", "gzip", "deflate", "br", "identity", " GZIP "]))
    if coding.strip().lower() == "gzip":
        raw = gzip.compress(raw)
    elif coding == "deflate":
        raw = zlib.compress(raw)
    if coding:
        headers["Content-Encoding"] = coding
    if draw(st.booleans()):
        raw = mutate(raw, draw(st.randoms(use_true_random=False)))
    return raw, headers


def check_codecs(body: bytes, headers: dict[str, str]) -> tuple[str, str]:
    """The outcome of decoding ``body`` as an answer and as a request; anything raised other
    than ``MalformedMessage`` escapes (a bug)."""
    cap = 1024 * 1024
    try:
        decode_infer_response(body, headers, max_inflated_bytes=cap, max_outputs=8)
        answer = "ok"
    except TooLarge:
        answer = "too_large"
    except MalformedMessage:
        answer = "malformed"
    try:
        unsafe = unsafe_to_mirror(parse_request_header(body, headers, max_inflated_bytes=cap))
        request = "ok" if unsafe is None else unsafe
    except TooLarge:
        request = "too_large"
    except MalformedMessage:
        request = "malformed"
    return answer, request


def fuzz_codecs(examples: int, counts: Counter[str]) -> None:
    @settings(max_examples=examples, deadline=None, database=None)
    @given(case=bodies())
    def case(case: tuple[bytes, dict[str, str]]) -> None:
        answer, request = check_codecs(*case)
        counts[f"answer {answer}"] += 1
        counts[f"request {request}"] += 1

    case()
