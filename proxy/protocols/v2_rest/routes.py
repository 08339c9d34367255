"""Which live requests may be mirrored, decided from the method and path alone (no body parsing).

Triton's URL grammar: versions are digits only; everything under repository, shared memory,
trace and logging changes the server or is host-local, so it is never mirrored. Generated-text
calls are routes of their own: Triton's ``generate`` / ``generate_stream`` (the model is in the
path) and the OpenAI-compatible ``/v1/completions``, ``/v1/chat/completions`` and
``/v1/embeddings`` (the model is in the body: ``Route.model`` is None until the shadow side
reads it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import unquote


class RouteKind(StrEnum):
    INFER = "infer"
    GENERATE = "generate"  # Triton's generate extension: one JSON answer, or SSE when streamed
    OPENAI = "openai"  # OpenAI-compatible completions, chat completions, embeddings
    ADMIN = "admin"  # model control, shared memory, trace, logging: never mirrored
    READ = "read"  # health, metadata, config, stats: forwarded only
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class Route:
    kind: RouteKind
    model: str | None = None
    version: str | None = None
    # The path from "/v2/models/{model}" on, so a candidate can re-root it under another name.
    suffix: str = ""


_INFER = re.compile(r"^/v2/models/([^/]+)(?:/versions/([0-9]+))?(/infer|/generate(?:_stream)?)$")
_OPENAI = re.compile(r"^/v1/(?:completions|chat/completions|embeddings)$")
_MODEL = re.compile(r"^/v2/models/([^/]+)(?:/versions/([0-9]+))?(?:/(ready|config|stats))?$")
_ADMIN = re.compile(
    r"^/v2/(?:repository(?:/|$)|systemsharedmemory|cudasharedmemory|logging$|trace/setting$"
    r"|models/[^/]+(?:/versions/[0-9]+)?/trace/setting$)"
)
_READ = re.compile(r"^/v2(?:/health/(?:live|ready)|/models/stats)?$")


def classify(method: str, raw_path: str) -> Route:
    path = raw_path.split("?", 1)[0]
    if method == "POST":
        m = _INFER.match(path)
        if m:
            kind = RouteKind.INFER if m.group(3) == "/infer" else RouteKind.GENERATE
            return Route(kind, unquote(m.group(1)), m.group(2), m.group(3))
        if _OPENAI.match(path):
            return Route(RouteKind.OPENAI, None, None, path)
    if _ADMIN.match(path):
        return Route(RouteKind.ADMIN)
    if _READ.match(path) or _MODEL.match(path):
        return Route(RouteKind.READ)
    return Route(RouteKind.OTHER)


MIRRORED = frozenset({RouteKind.INFER, RouteKind.GENERATE, RouteKind.OPENAI})
"""The kinds of request a candidate may get a copy of."""
LLM = frozenset({RouteKind.GENERATE, RouteKind.OPENAI})
"""Generated-text calls: answered as a stream (relayed as it comes), compared as text."""


def candidate_path(route: Route, served_model: str) -> str:
    """The path for a candidate that serves the model under ``served_model`` (an OpenAI path
    names no model: its body does)."""
    from urllib.parse import quote

    if route.kind is RouteKind.OPENAI:
        return route.suffix

    version = f"/versions/{route.version}" if route.version else ""
    return f"/v2/models/{quote(served_model, safe='')}{version}{route.suffix}"
