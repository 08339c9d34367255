"""The comparable form of a generated-text answer (LLM traffic), whatever API carried it.

The protocol adapters of the proxy (Triton generate, OpenAI completions and chat) assemble a whole
answer, streamed or not, into a ``TextAnswer``; the text comparators (``comparators.llm``) score a
reference/candidate pair of them. Plain frozen data: cheap to pass between threads and processes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

_NO_USAGE: Mapping[str, int] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class TokenChoice:
    """One generated token with the logprobs the server returned for it."""

    token: str
    """The token as text (OpenAI's ``token``; Triton generate's decoded piece)."""
    logprob: float
    """The chosen token's log probability (natural log; vLLM clamps at -9999.0)."""
    top: tuple[tuple[str, float], ...] = ()
    """The top-k alternatives the server returned, ``(token, logprob)``, best first; empty when
    only the chosen token's logprob came back."""
    token_id: int | None = None


@dataclass(frozen=True, slots=True)
class TextAnswer:
    """One choice of a generated answer, assembled from every event of a stream or one body."""

    text: str
    """The generated text (chat: the assistant message's content)."""
    tokens: tuple[TokenChoice, ...] | None = None
    """One entry per generated token when the server returned logprobs; None otherwise."""
    token_ids: tuple[int, ...] | None = None
    """The generated token ids when the server returned them (vLLM ``return_token_ids``,
    Triton generate models that output them); None otherwise."""
    finish_reason: str | None = None
    """``stop``, ``length``, ``tool_calls`` ... as the server said; None when it did not."""
    usage: Mapping[str, int] = field(default_factory=lambda: _NO_USAGE)
    """``prompt_tokens``, ``completion_tokens`` (and ``total_tokens``) when reported."""
    tool_calls: str | None = None
    """The tool calls of a chat answer as canonical JSON text (a list), None when there are none."""
    json_expected: bool = False
    """The request asked for JSON (``response_format`` json_object / json_schema): the text is
    scored for JSON validity and structure."""
    ttft_s: float | None = None
    """Time from sending the request to the first generated token (the first ``data:`` event
    that carries text, or the whole answer when not streamed)."""
    tpot_s: float | None = None
    """Mean time per output token after the first (streamed answers with 2+ tokens only)."""
    incomplete: bool = False
    """The stream ended early (client gone, cut, in-stream error): never compared."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for stored samples and the review page."""
        return {
            "text": self.text,
            "tokens": (
                [
                    {"token": t.token, "logprob": t.logprob, "top": [list(p) for p in t.top]}
                    | ({"id": t.token_id} if t.token_id is not None else {})
                    for t in self.tokens
                ]
                if self.tokens is not None
                else None
            ),
            "token_ids": list(self.token_ids) if self.token_ids is not None else None,
            "finish_reason": self.finish_reason,
            "usage": dict(self.usage),
            "tool_calls": self.tool_calls,
            "json_expected": self.json_expected,
            "ttft_s": self.ttft_s,
            "tpot_s": self.tpot_s,
            "incomplete": self.incomplete,
        }
