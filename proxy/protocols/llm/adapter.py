"""Triton generate and OpenAI-compatible APIs as protocol adapters (``TextAdapter``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..base import MAX_INFLATED_BYTES, MAX_OUTPUTS, DecodedResponse, MalformedMessage
from . import generate, openai
from .assemble import as_object, loads


class _LlmAdapter:
    """What both LLM adapters share: ``decode_answer`` (the request read when the API needs it,
    then the API's decoder), a plain ``decode_response`` (no request, no timing) for callers
    that know only the answer, and short error texts from JSON error bodies."""

    reads_request: bool
    _decode: Callable[..., DecodedResponse]

    def decode_response(
        self,
        body: bytes,
        headers: Mapping[str, str],
        *,
        max_inflated_bytes: int = MAX_INFLATED_BYTES,
        max_outputs: int = MAX_OUTPUTS,
    ) -> DecodedResponse:
        return self.decode_answer(
            body,
            headers,
            request=b"",
            request_headers={},
            timeline=(),
            max_inflated_bytes=max_inflated_bytes,
        )

    def decode_answer(
        self,
        body: bytes,
        headers: Mapping[str, str],
        *,
        request: bytes,
        request_headers: Mapping[str, str],
        timeline: Sequence[tuple[int, float]],
        max_inflated_bytes: int = MAX_INFLATED_BYTES,
    ) -> DecodedResponse:
        parsed: Any = None
        if request and self.reads_request:
            try:
                parsed = openai.read_request(request, request_headers, max_inflated_bytes)
            except MalformedMessage:
                parsed = None  # the answer is still read; only what the request asked is unknown
        return self._decode(
            body, headers, request=parsed, timeline=timeline, max_inflated_bytes=max_inflated_bytes
        )

    def error_text(self, status: int, headers: Mapping[str, str], body: bytes) -> str:
        # {"error": "..."} (Triton) or {"error": {"message": ...}} (OpenAI): the message, short.
        try:
            obj = as_object(loads(body[:4096], "the answer"), "the answer")
        except MalformedMessage:
            return body[:200].decode("utf-8", "replace").strip()
        err = obj.get("error")
        message = err.get("message") if isinstance(err, Mapping) else err
        return str(message if message is not None else obj)[:200]


class GenerateAdapter(_LlmAdapter):
    name = "triton_generate"
    title = "Triton generate"
    reads_request = False

    inspect_request = staticmethod(generate.inspect_request)
    _decode = staticmethod(generate.decode_answer)


class OpenAIAdapter(_LlmAdapter):
    name = "openai"
    title = "OpenAI"
    reads_request = True  # JSON mode is asked for in the request

    inspect_request = staticmethod(openai.inspect_request)
    _decode = staticmethod(openai.decode_answer)


GENERATE = GenerateAdapter()
OPENAI = OpenAIAdapter()
