"""What the LLM adapters share: reading JSON, building a choice from its pieces, timing it.

An answer comes whole (one JSON body) or as a stream of events, each carrying a piece of every
choice. ``ChoiceBuilder`` gathers one choice's pieces in order, whatever API sent them; the
timeline (bytes received so far, seconds since the request was sent) recorded where the answer
was read says when the first token came and how fast the rest followed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from comparators.llm_types import TextAnswer, TokenChoice

from ..base import MalformedMessage

Timeline = Sequence[tuple[int, float]]
"""(bytes of the answer received so far, seconds since the request was sent), per read."""

# vLLM clamps -inf logprobs to this; a server that sends null or -Infinity means the same.
LOGPROB_FLOOR = -9999.0


def loads(raw: bytes | str, what: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedMessage(f"{what} is not JSON ({exc})") from exc


def as_object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise MalformedMessage(f"{what} is not a JSON object")
    return value


def logprob(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return LOGPROB_FLOOR
    return max(float(value), LOGPROB_FLOOR)


def time_at(timeline: Timeline, offset: int) -> float | None:
    """When the byte just before ``offset`` had arrived (None without a timeline)."""
    for received, at in timeline:
        if received >= offset:
            return at
    return timeline[-1][1] if timeline else None


@dataclass(slots=True)
class ChoiceBuilder:
    """One choice, piece by piece."""

    text: list[str] = field(default_factory=list)
    tokens: list[TokenChoice] = field(default_factory=list)
    has_logprobs: bool = False
    token_ids: list[int] = field(default_factory=list)
    has_ids: bool = False
    finish_reason: str | None = None
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    first_at: float | None = None
    """When the first piece with text or a token arrived."""
    last_at: float | None = None
    pieces: int = 0
    """Events that carried generated text or tokens (streamed tokens, for the time per token)."""

    def add_text(self, piece: Any, at: float | None) -> None:
        if isinstance(piece, str) and piece:
            self.text.append(piece)
            self.mark(at)

    def add_ids(self, ids: Any) -> None:
        if isinstance(ids, int) and not isinstance(ids, bool):
            ids = [ids]
        if isinstance(ids, list):
            self.has_ids = True
            self.token_ids.extend(i for i in ids if isinstance(i, int) and not isinstance(i, bool))

    def add_token(self, token: TokenChoice) -> None:
        self.has_logprobs = True
        self.tokens.append(token)

    def add_tool_call_delta(self, delta: Any) -> None:
        """Chat tool calls: streamed as pieces of each call (index, id, name, argument text)."""
        if not isinstance(delta, Mapping):
            return
        index = delta.get("index", len(self.tool_calls))
        call = self.tool_calls.setdefault(
            index if isinstance(index, int) else len(self.tool_calls), {"name": "", "arguments": ""}
        )
        fn = delta.get("function")
        if isinstance(fn, Mapping):
            if isinstance(fn.get("name"), str):
                call["name"] += fn["name"]
            if isinstance(fn.get("arguments"), str):
                call["arguments"] += fn["arguments"]

    def mark(self, at: float | None) -> None:
        self.pieces += 1
        if at is not None:
            if self.first_at is None:
                self.first_at = at
            self.last_at = at

    def build(
        self,
        usage: Mapping[str, int],
        *,
        json_expected: bool,
        incomplete: bool,
        whole_at: float | None,
    ) -> TextAnswer:
        ttft = self.first_at if self.first_at is not None else whole_at
        tpot = None
        n = len(self.tokens) if self.has_logprobs else self.pieces
        # Only a stream times its tokens: one answer read whole has no time per token.
        streamed = self.pieces >= 2
        if streamed and self.first_at is not None and self.last_at is not None and n >= 2:
            tpot = (self.last_at - self.first_at) / (n - 1)
        tool_calls = None
        if self.tool_calls:
            calls = [self.tool_calls[i] for i in sorted(self.tool_calls)]
            tool_calls = orjson.dumps(calls, option=orjson.OPT_SORT_KEYS).decode()
        return TextAnswer(
            text="".join(self.text),
            tokens=tuple(self.tokens) if self.has_logprobs else None,
            token_ids=tuple(self.token_ids) if self.has_ids else None,
            finish_reason=self.finish_reason,
            usage=usage,
            tool_calls=tool_calls,
            json_expected=json_expected,
            ttft_s=ttft,
            tpot_s=tpot,
            incomplete=incomplete,
        )


def usage_of(value: Any) -> dict[str, int]:
    if not isinstance(value, Mapping):
        return {}
    return {
        k: int(v)
        for k, v in value.items()
        if k in ("prompt_tokens", "completion_tokens", "total_tokens")
        and isinstance(v, int)
        and not isinstance(v, bool)
    }
