"""Triton's generate extension (``/v2/models/{m}/generate`` and ``generate_stream``) into the
comparable form.

``generate`` answers one JSON object, ``generate_stream`` one ``data:`` event per response of
the model; every output tensor of a response is a field by name. The text is ``text_output``
(a model streaming token by token sends a piece per event); a model may add ``token_ids``
(or ``output_ids``), ``logprobs`` (one per token), top-k alternatives (``top_logprobs`` with
``top_tokens`` or ``top_token_ids``, one row per token) and ``finish_reason``. The HTTP status is
set by the first response: a later error arrives as ``{"error": ...}`` inside a 200 stream.
Decoupled models are fine here: every response of the stream is assembled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from comparators.llm_types import TokenChoice

from ..base import DecodedResponse, MalformedMessage, RequestFacts, header
from ..v2_rest.codec import inflate
from . import sse
from .assemble import ChoiceBuilder, Timeline, as_object, loads, logprob, time_at, usage_of


def inspect_request(
    body: bytes, headers: Mapping[str, str], *, max_inflated_bytes: int
) -> RequestFacts:
    raw = inflate(body, header(headers, "content-encoding"), max_inflated_bytes)
    request = as_object(loads(raw, "the request"), "the request")
    request_id = request.get("id")
    return RequestFacts(None, str(request_id) if request_id else None)


def _one(value: Any) -> Any:
    """A field of a one-element tensor may come as the element or as a list of it."""
    if isinstance(value, list) and len(value) == 1:
        return value[0]
    return value


def _list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _rows(value: Any, n: int) -> list[list[Any]]:
    """Top-k rows for ``n`` tokens: nested already, or flat (n * k) to be cut in rows."""
    items = _list(value)
    if items and all(isinstance(r, list) for r in items):
        return items
    if n and items and len(items) % n == 0:
        k = len(items) // n
        return [items[i * k : (i + 1) * k] for i in range(n)]
    return []


def _add_response(b: ChoiceBuilder, obj: Mapping[str, Any], at: float | None) -> None:
    text = _one(obj.get("text_output"))
    pieces = [t for t in _list(obj.get("text_output")) if isinstance(t, str)]
    b.add_text("".join(pieces) if len(pieces) > 1 else text, at)
    ids = obj.get("token_ids", obj.get("output_ids"))
    b.add_ids(ids)
    lps = _list(obj.get("logprobs"))
    if lps:
        ids_list = [i for i in _list(ids) if isinstance(i, int)]
        names = [t for t in _list(obj.get("tokens")) if isinstance(t, str)]
        if not names and len(lps) == 1 and isinstance(text, str):
            names = [text]  # one token per response: the piece is the token
        top_lps = _rows(obj.get("top_logprobs"), len(lps))
        top_names = _rows(obj.get("top_tokens", obj.get("top_token_ids")), len(lps))
        for i, lp in enumerate(lps):
            token_id = ids_list[i] if i < len(ids_list) else None
            name = names[i] if i < len(names) else str(token_id if token_id is not None else i)
            top: tuple[tuple[str, float], ...] = ()
            if i < len(top_lps) and i < len(top_names):
                top = tuple(
                    (str(t), logprob(v)) for t, v in zip(top_names[i], top_lps[i], strict=False)
                )
            b.add_token(TokenChoice(name, logprob(lp), top, token_id))
        if not b.text:
            b.mark(at)
    reason = _one(obj.get("finish_reason"))
    if isinstance(reason, str) and reason:
        b.finish_reason = reason


def _error(obj: Mapping[str, Any]) -> None:
    if "error" in obj:
        raise MalformedMessage(f"an error answer: {str(obj['error'])[:200]}")


def decode_answer(
    body: bytes,
    headers: Mapping[str, str],
    *,
    request: Mapping[str, Any] | None = None,
    timeline: Timeline,
    max_inflated_bytes: int,
) -> DecodedResponse:
    """``request`` is not needed: a generate answer says all there is to know of itself."""
    raw = inflate(body, header(headers, "content-encoding"), max_inflated_bytes)
    whole_at = timeline[-1][1] if timeline else None
    b = ChoiceBuilder()
    if sse.is_event_stream(header(headers, "content-type")):
        parsed = sse.parse(raw)
        objects: Sequence[tuple[Mapping[str, Any], float | None]] = [
            (as_object(loads(e.data, "a stream event"), "a stream event"), time_at(timeline, e.end))
            for e in parsed.events
        ]
        if not objects:
            raise MalformedMessage("a stream without any response")
        incomplete = parsed.cut
    else:
        objects = [(as_object(loads(raw, "the answer"), "the answer"), whole_at)]
        incomplete = False
    usage: dict[str, int] = {}
    for obj, at in objects:
        _error(obj)
        _add_response(b, obj, at)
        usage = usage_of(obj.get("usage")) or usage
    first = objects[0][0]
    name, version = first.get("model_name"), first.get("model_version")
    answer = b.build(usage, json_expected=False, incomplete=incomplete, whole_at=whole_at)
    return DecodedResponse(
        name if isinstance(name, str) else None,
        str(version) if isinstance(version, str | int) else None,
        texts={"": answer},
    )
