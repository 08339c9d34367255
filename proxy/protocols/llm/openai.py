"""OpenAI-compatible completions, chat completions and embeddings (vLLM, SGLang, TGI, Triton's
OpenAI frontend, llama.cpp's server), streamed or not, into the comparable form.

A streamed answer is ``data: {chunk}`` events ending with ``data: [DONE]``; each chunk carries
a piece of some choices (``choices[i].text`` for completions, ``choices[i].delta`` for chat),
their logprobs, and, on the last, the finish reason; a last chunk with ``choices: []`` may carry
the usage. Errors arrive in-stream as ``data: {"error": ...}`` after a 200. Logprobs come in two
shapes: the legacy completions one (``tokens``, ``token_logprobs``, ``top_logprobs`` as
``{token: logprob}``) and chat's (``content: [{token, logprob, top_logprobs: [...]}]``).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson

from comparators.llm_types import TextAnswer, TokenChoice

from ..base import DecodedResponse, MalformedMessage, RequestFacts, TooLarge, header
from ..v2_rest.codec import inflate
from . import sse
from .assemble import (
    ChoiceBuilder,
    Timeline,
    as_object,
    loads,
    logprob,
    time_at,
    usage_of,
)


def read_request(body: bytes, headers: Mapping[str, str], max_inflated_bytes: int) -> Any:
    raw = inflate(body, header(headers, "content-encoding"), max_inflated_bytes)
    return as_object(loads(raw, "the request"), "the request")


def inspect_request(
    body: bytes, headers: Mapping[str, str], *, max_inflated_bytes: int
) -> RequestFacts:
    request = read_request(body, headers, max_inflated_bytes)
    model = request.get("model")
    if not isinstance(model, str) or not model:
        raise MalformedMessage('the request names no "model"')
    # Features a candidate takes only when its config allows them by name (``mirror_llm.allow``):
    # more than one choice costs the candidate n times the work, a tool call may have side
    # effects the proxy cannot know of, and ``store`` keeps the request server-side.
    needs: set[str] = set()
    n = request.get("n")
    if isinstance(n, int) and n > 1:
        needs.add("n")
    best_of = request.get("best_of")
    if isinstance(best_of, int) and best_of > 1:
        needs.add("best_of")
    if request.get("tools") or request.get("tool_choice") or request.get("functions"):
        needs.add("tools")
    if request.get("store") is True:
        needs.add("store")
    user = request.get("user")
    return RequestFacts(
        None, user if isinstance(user, str) and user else None, model, frozenset(needs)
    )


def body_model(
    body: bytes, headers: Mapping[str, str], max_inflated_bytes: int = 1 << 26
) -> str | None:
    """The ``model`` a request body names, None if it names none or cannot be read."""
    try:
        model = read_request(body, headers, max_inflated_bytes).get("model")
    except MalformedMessage:
        return None
    return model if isinstance(model, str) and model else None


def with_body_model(
    body: bytes, headers: Mapping[str, str], model: str, max_inflated_bytes: int = 1 << 26
) -> bytes:
    """The request with its ``model`` renamed (a candidate's ``model_map``), as plain JSON;
    unchanged if it cannot be read (the candidate then answers what the reference did)."""
    try:
        request = dict(read_request(body, headers, max_inflated_bytes))
    except MalformedMessage:
        return body
    request["model"] = model
    return orjson.dumps(request)


def json_expected(request: Mapping[str, Any] | None) -> bool:
    fmt = request.get("response_format") if request else None
    return isinstance(fmt, Mapping) and fmt.get("type") in ("json_object", "json_schema")


def _chat_tokens(logprobs: Any) -> list[TokenChoice]:
    content = logprobs.get("content") if isinstance(logprobs, Mapping) else None
    if not isinstance(content, list):
        return []
    out = []
    for entry in content:
        if not isinstance(entry, Mapping):
            continue
        top = entry.get("top_logprobs")
        alternatives = tuple(
            (str(t.get("token", "")), logprob(t.get("logprob")))
            for t in (top if isinstance(top, list) else [])
            if isinstance(t, Mapping)
        )
        out.append(
            TokenChoice(str(entry.get("token", "")), logprob(entry.get("logprob")), alternatives)
        )
    return out


def _completion_tokens(logprobs: Any) -> list[TokenChoice]:
    if not isinstance(logprobs, Mapping):
        return []
    tokens, lps, tops = (logprobs.get(k) for k in ("tokens", "token_logprobs", "top_logprobs"))
    if not isinstance(tokens, list):
        return []
    lps = lps if isinstance(lps, list) else []
    tops = tops if isinstance(tops, list) else []
    out = []
    for i, token in enumerate(tokens):
        top = tops[i] if i < len(tops) and isinstance(tops[i], Mapping) else {}
        alternatives = tuple(
            sorted(((str(t), logprob(v)) for t, v in top.items()), key=lambda p: -p[1])
        )
        out.append(TokenChoice(str(token), logprob(lps[i] if i < len(lps) else None), alternatives))
    return out


def _add_choice(b: ChoiceBuilder, choice: Mapping[str, Any], at: float | None, chunk: bool) -> None:
    if chunk:
        delta = choice.get("delta")
        if isinstance(delta, Mapping):  # chat
            b.add_text(delta.get("content"), at)
            for call in delta.get("tool_calls") or []:
                b.add_tool_call_delta(call)
        else:
            b.add_text(choice.get("text"), at)
    else:
        message = choice.get("message")
        if isinstance(message, Mapping):
            b.add_text(message.get("content"), at)
            for i, call in enumerate(message.get("tool_calls") or []):
                if isinstance(call, Mapping):
                    b.add_tool_call_delta({"index": i, **call})
        else:
            b.add_text(choice.get("text"), at)
    logprobs = choice.get("logprobs")
    if logprobs is not None:
        tokens = _chat_tokens(logprobs) or _completion_tokens(logprobs)
        for token in tokens:
            b.add_token(token)
        if tokens and not b.text:
            b.mark(at)
    b.add_ids(choice.get("token_ids"))
    reason = choice.get("finish_reason")
    if isinstance(reason, str):
        b.finish_reason = reason


def _choices(obj: Mapping[str, Any], builders: dict[int, ChoiceBuilder], at: float | None) -> None:
    choices = obj.get("choices")
    if not isinstance(choices, list):
        raise MalformedMessage('an answer without "choices"')
    chunk = str(obj.get("object", "")).endswith(".chunk") or any(
        isinstance(c, Mapping) and "delta" in c for c in choices
    )
    for choice in choices:
        if not isinstance(choice, Mapping):
            raise MalformedMessage("a choice is not a JSON object")
        index = choice.get("index", 0)
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 1024:
            raise MalformedMessage(f"a choice has a bad index {index!r}")
        _add_choice(builders.setdefault(index, ChoiceBuilder()), choice, at, chunk)


def _error_text(obj: Mapping[str, Any]) -> str:
    err = obj.get("error")
    message = err.get("message") if isinstance(err, Mapping) else err
    return str(message)[:200]


def choice_key(index: int) -> str:
    """The prefix a choice's verdicts are named with: none for the first."""
    return "" if index == 0 else f"choices[{index}]."


def _texts(
    builders: dict[int, ChoiceBuilder],
    usage: Mapping[str, int],
    request: Mapping[str, Any] | None,
    incomplete: bool,
    whole_at: float | None,
) -> dict[str, TextAnswer]:
    expect_json = json_expected(request)
    return {
        choice_key(i): builders[i].build(
            usage, json_expected=expect_json, incomplete=incomplete, whole_at=whole_at
        )
        for i in sorted(builders)
    }


def decode_answer(
    body: bytes,
    headers: Mapping[str, str],
    *,
    request: Mapping[str, Any] | None,
    timeline: Timeline,
    max_inflated_bytes: int,
) -> DecodedResponse:
    raw = inflate(body, header(headers, "content-encoding"), max_inflated_bytes)
    whole_at = timeline[-1][1] if timeline else None
    if sse.is_event_stream(header(headers, "content-type")):
        return _decode_stream(raw, request, timeline, whole_at)
    obj = as_object(loads(raw, "the answer"), "the answer")
    if "error" in obj and "choices" not in obj:
        raise MalformedMessage(f"an error answer: {_error_text(obj)}")
    model = obj.get("model") if isinstance(obj.get("model"), str) else None
    if obj.get("object") == "list" or ("data" in obj and "choices" not in obj):
        return DecodedResponse(model, None, {"embedding": _embeddings(obj)})
    builders: dict[int, ChoiceBuilder] = {}
    _choices(obj, builders, whole_at)
    texts = _texts(builders, usage_of(obj.get("usage")), request, False, whole_at)
    return DecodedResponse(model, None, texts=texts)


def _decode_stream(
    raw: bytes, request: Mapping[str, Any] | None, timeline: Timeline, whole_at: float | None
) -> DecodedResponse:
    parsed = sse.parse(raw)
    builders: dict[int, ChoiceBuilder] = {}
    usage: dict[str, int] = {}
    model: str | None = None
    done = False
    for event in parsed.events:
        if event.data.strip() == "[DONE]":
            done = True
            continue
        obj = as_object(loads(event.data, "a stream event"), "a stream event")
        if "error" in obj:
            raise MalformedMessage(f"an error in the stream: {_error_text(obj)}")
        if model is None and isinstance(obj.get("model"), str):
            model = obj["model"]
        usage = usage_of(obj.get("usage")) or usage
        _choices(obj, builders, time_at(timeline, event.end))
    if not builders:
        raise MalformedMessage("a stream without any choice")
    finished = all(b.finish_reason is not None for b in builders.values())
    incomplete = parsed.cut or not (done or finished)
    return DecodedResponse(
        model, None, texts=_texts(builders, usage, request, incomplete, whole_at)
    )


def _embeddings(obj: Mapping[str, Any]) -> np.ndarray[Any, np.dtype[Any]]:
    data = obj.get("data")
    if not isinstance(data, list) or not data:
        raise MalformedMessage('an embeddings answer without "data"')
    rows: list[np.ndarray[Any, np.dtype[Any]]] = []
    for item in sorted(
        (as_object(d, "an embedding") for d in data), key=lambda d: d.get("index", 0)
    ):
        vector = item.get("embedding")
        if isinstance(vector, str):  # encoding_format: base64, little-endian float32
            try:
                rows.append(np.frombuffer(base64.b64decode(vector), dtype="<f4"))
            except ValueError as exc:
                raise MalformedMessage(f"an embedding is not base64 float32 ({exc})") from exc
        elif isinstance(vector, list):
            try:
                rows.append(np.asarray(vector, dtype=np.float32))
            except (TypeError, ValueError) as exc:
                raise MalformedMessage(f"an embedding is not a list of numbers ({exc})") from exc
        else:
            raise MalformedMessage('an embedding without "embedding"')
    if len({r.shape for r in rows}) != 1 or rows[0].ndim != 1:
        raise MalformedMessage("the embeddings differ in length")
    if sum(r.nbytes for r in rows) > 1 << 30:
        raise TooLarge("the embeddings are larger than 1 GiB")
    return np.stack(rows)
