"""Server-sent events, read back from a stream's recorded bytes (off the live path).

The live path relays a stream's bytes untouched; the shadow side parses what it recorded, per
the WHATWG rules: lines end in CRLF, LF or CR; a blank line dispatches the event; ``data:``
lines join with newlines; a line starting with ``:`` is a comment; one space after the colon is
dropped. An event whose blank line never came (a stream cut mid-event) is not an event: the
stream is reported as cut, so an answer built from it is never taken as whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LINE = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class Event:
    data: str
    """The event's ``data:`` lines, joined with newlines."""
    end: int
    """Where the event ends in the stream's bytes (just past its blank line)."""
    name: str = ""
    """Its ``event:`` field, if any."""


@dataclass(frozen=True, slots=True)
class Events:
    events: list[Event]
    cut: bool
    """Bytes after the last whole event (a stream that stopped mid-event)."""


def parse(body: bytes) -> Events:
    events: list[Event] = []
    data: list[str] = []
    name = ""
    pos = 0
    pending = False  # a field line seen since the last dispatch
    body_len = len(body)
    while pos < body_len:
        m = _LINE.search(body, pos)
        if m is None:
            break  # a last line with no end: the stream stopped mid-line
        line = body[pos : m.start()]
        pos = m.end()
        if not line:
            if data:
                events.append(Event("\n".join(data), pos, name))
            data, name, pending = [], "", False
            continue
        pending = True
        if line.startswith(b":"):
            continue
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            data.append(value.decode("utf-8", "replace"))
        elif field == b"event":
            name = value.decode("utf-8", "replace")
    return Events(events, cut=pending or pos < body_len)


def is_event_stream(content_type: str | None) -> bool:
    return (content_type or "").split(";", 1)[0].strip().lower() == "text/event-stream"
