"""What every protocol adapter provides, and the comparable form its answers decode into.

The shadow side compares answers without knowing their wire protocol: an adapter, chosen once
per exchange (``registry.adapter_for``), turns an answer's bytes into a ``DecodedResponse``
(named numpy tensors plus the model's name and version), says why a request must never be
copied, and renders an error for a verdict's reason. V2 REST (``v2_rest``) is the first adapter;
V2 gRPC the second; Triton generate and OpenAI-compatible APIs (``llm``) decode generated text
(``TextAdapter``), streamed or not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from comparators.llm_types import TextAnswer

from ..errors import ShadowProxyError
from ..settings import ProxySettings

Array = np.ndarray[Any, np.dtype[Any]]

# Defaults of the caps (callers pass ``proxy.max_inflated_bytes`` / ``proxy.max_outputs``): what
# a compressed body may inflate to, so a small gzip bomb cannot take a worker's memory, and how
# many outputs one answer may name.
MAX_INFLATED_BYTES: int = ProxySettings.model_fields["max_inflated_bytes"].default
MAX_OUTPUTS: int = ProxySettings.model_fields["max_outputs"].default


class MalformedMessage(ShadowProxyError):
    """A body that does not follow its protocol."""


class TooLarge(MalformedMessage):
    """A body past one of the caps (``max_inflated_bytes``, ``max_outputs``): not compared, and
    counted apart from malformed ones (it may be a valid message, only too big to take)."""


def header(headers: Mapping[str, str], name: str) -> str | None:
    """``name``'s value (``name`` in lower case): recorded headers may be a case-insensitive
    multidict or a plain dict of either case."""
    value = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value


@dataclass(frozen=True, slots=True)
class DecodedResponse:
    """An answer in the form the comparators take, whatever protocol carried it."""

    model_name: str | None
    model_version: str | None
    outputs: dict[str, Array] = field(default_factory=dict)
    texts: dict[str, TextAnswer] = field(default_factory=dict)
    """Generated text, one entry per choice (keyed by the prefix its verdicts are named with:
    ``""`` for the first), from the LLM adapters."""


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What the shadow side needs to know of a request before copying it."""

    unsafe: str | None
    """Why it must never be copied to a candidate (``sequence``, ``shared_memory``), or None."""
    request_id: str | None
    """The id the client gave it in the message, if any (samples are listed by it)."""
    model: str | None = None
    """The model it names in its body, where the path does not (OpenAI-compatible APIs)."""
    needs: frozenset[str] = frozenset()
    """Features a candidate must allow by name before it gets a copy (``mirror_llm.allow``)."""


class ProtocolAdapter(Protocol):
    """One wire protocol's knowledge, as the shadow side and the review page need it."""

    name: str
    """As samples record it (``v2_rest``, ``v2_grpc``)."""
    title: str
    """As people read it in a verdict's reason (``V2 REST``, ``V2 gRPC``)."""

    def decode_response(
        self,
        body: bytes,
        headers: Mapping[str, str],
        *,
        max_inflated_bytes: int = MAX_INFLATED_BYTES,
        max_outputs: int = MAX_OUTPUTS,
    ) -> DecodedResponse:
        """A successful answer's tensors; raises ``MalformedMessage`` (``TooLarge`` past a cap)
        saying what is wrong, never another error."""
        ...

    def inspect_request(
        self, body: bytes, headers: Mapping[str, str], *, max_inflated_bytes: int
    ) -> RequestFacts:
        """Why this request must never be copied, and its id. Raises ``MalformedMessage``
        (``TooLarge`` past the cap) for a request it cannot read."""
        ...

    def error_text(self, status: int, headers: Mapping[str, str], body: bytes) -> str:
        """A failed answer's error, short, for a verdict's reason."""
        ...


class TextAdapter(ProtocolAdapter, Protocol):
    """An LLM API's adapter: its answers decode with the request beside them (JSON mode, chat or
    not) and the timeline of their bytes (time to first token, time per token)."""

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
        """The answer assembled whole (every event of a stream); raises ``MalformedMessage``."""
        ...
