"""What never rests anywhere: credential headers, and the values ``redact`` names.

One ``Redactor`` per comparer turns what a comparison would store (headers, request and answer
bodies, tensor previews, reasons) into what may be stored. It runs once, before the record is
built (``compare_stage.Comparer``), so the spool, Redis, the admin API and ``review export`` only
ever see its result.

- **Headers**: ``Authorization``, ``Proxy-Authorization``, ``Cookie``, ``Set-Cookie`` and every
  name in ``redact.headers`` are dropped (names compared case-insensitively).
- **Tensors** (``redact.inputs`` in requests, ``redact.outputs`` in answers, KServe V2 JSON or
  binary-data extension): each named tensor is replaced **as a whole** by one keyed hash, a BYTES
  tensor of shape ``[1]`` whose one element is ``"hmac-sha256:<hex>"`` (HMAC-SHA256 keyed by
  ``redact.secret``), with the original ``datatype`` and ``shape`` under
  ``parameters.redacted``. One hash per tensor, not per element, so neither the values nor which
  elements repeat can be read back; equal tensors still hash equal, whether they came as JSON
  ``data`` or as binary bytes (the hash covers datatype, shape and the elements as the binary
  extension lays them out; BF16 and data numpy cannot convert are hashed as their JSON text). A
  binary tensor's bytes are dropped from the body and ``Inference-Header-Content-Length`` is
  rewritten, so the stored body is still a valid V2 message the review page decodes.
- **JSON pointers** (``redact.json_pointers``, RFC 6901) in any JSON body (V2 header or not): the
  value there is replaced by ``"hmac-sha256:<hex>"`` of its canonical JSON.
- A body that value redaction applies to but that cannot be read (not JSON, compressed beyond
  ``proxy.max_inflated_bytes``; an SSE stream), or, when inputs or outputs are named, one that
  has no V2 ``inputs``/``outputs`` to find them in (an OpenAI or generate body, an error), is
  **withheld**: replaced by a small JSON note with the body's size and keyed hash, never stored
  as it came. For generated text, name ``text`` in ``redact.outputs``: its previews, reasons and
  the answers' bodies are then kept out (or name JSON pointers into the request).
- ``redact.store_payloads: false``: no bodies and no headers at all; tensor previews are dropped
  and reasons that quote a body are cut. Scores and metadata stay.

A redacted output's preview and comparator reason (which may quote values) are cleared too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from tritonclient.utils import triton_to_np_dtype

from .protocols.base import MalformedMessage
from .protocols.v2_rest.codec import HEADER_LENGTH, inflate
from .settings import ProxySettings, RedactSettings

CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
HASH_PREFIX = "hmac-sha256:"
# Headers that describe the bytes as they travelled; a redacted body is stored inflated and
# re-framed, so the old values would misdescribe it.
_FRAMING = frozenset({"content-encoding", "content-length", HEADER_LENGTH.lower()})


def strip_headers(
    headers: Iterable[tuple[str, str]], extra: Iterable[str] = ()
) -> list[tuple[str, str]]:
    """``headers`` without credential headers and those named in ``extra`` (any case)."""
    return _without(headers, CREDENTIAL_HEADERS | {h.lower() for h in extra})


def _without(headers: Iterable[tuple[str, str]], drop: frozenset[str]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k.lower() not in drop]


@dataclass(frozen=True, slots=True)
class Body:
    """A body with the headers that frame it, as it will be stored."""

    data: bytes
    headers: list[tuple[str, str]]


class Redactor:
    def __init__(self, settings: RedactSettings, proxy: ProxySettings) -> None:
        self._drop = CREDENTIAL_HEADERS | {h.lower() for h in settings.headers}
        self._inputs = frozenset(settings.inputs)
        self._outputs = frozenset(settings.outputs)
        # A generated text's other aspects quote it (the tokens where two answers part, a JSON
        # answer's structure): redacting ``text`` redacts their reasons and previews too.
        self._shown_outputs = self._outputs | (_TEXT_ASPECTS if "text" in self._outputs else set())
        self._pointers = [_parse_pointer(p) for p in settings.json_pointers]
        secret = settings.secret.get_secret_value() if settings.secret is not None else ""
        self._key = secret.encode()
        self.store_payloads = settings.store_payloads
        self._hashes_values = settings.hashes_values()
        self._max_inflated = proxy.max_inflated_bytes

    def headers(self, headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        return _without(headers, self._drop)

    def request(self, body: bytes, headers: Iterable[tuple[str, str]]) -> Body:
        return self._body(body, self.headers(headers), "inputs", self._inputs)

    def answer(self, body: bytes, headers: Iterable[tuple[str, str]]) -> Body:
        return self._body(body, self.headers(headers), "outputs", self._outputs)

    def keyed_hash(self, data: bytes) -> str:
        return HASH_PREFIX + hmac.new(self._key, data, hashlib.sha256).hexdigest()

    def outputs(
        self, outputs: list[dict[str, Any]], previews: Mapping[str, Any]
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Verdicts and previews as they may be stored: a redacted output keeps its scores but
        loses its first values and any reason (comparators quote the values that differ)."""
        if not self.store_payloads:
            previews = {}
        if not self._outputs:
            return outputs, dict(previews)
        safe = [
            {**o, "reason": f"{o['metric']} flagged (values redacted)" if o["reason"] else ""}
            if _aspect(o["output"]) in self._shown_outputs
            else o
            for o in outputs
        ]
        shown = {
            name: {side: _blank(pv.get(side)) for side in ("reference", "candidate")}
            if _aspect(name) in self._shown_outputs
            else pv
            for name, pv in previews.items()
        }
        return safe, shown

    def reason(self, outcome: str, reason: str) -> str:
        """A status mismatch's reason quotes the failing side's body: cut that quote when bodies
        are not stored or values are redacted."""
        if outcome == "status_mismatch" and (not self.store_payloads or self._hashes_values):
            return reason.split(" (", 1)[0]
        return reason

    def _body(
        self, body: bytes, headers: list[tuple[str, str]], kind: str, names: frozenset[str]
    ) -> Body:
        if not (names or self._pointers) or not body:
            return Body(body, headers)
        framing = {k.lower(): v for k, v in headers}
        try:
            raw = inflate(body, framing.get("content-encoding"), self._max_inflated)
            length = _header_length(framing.get(HEADER_LENGTH.lower()), len(raw))
            doc = _loads(raw[:length])
        except (MalformedMessage, ValueError, RecursionError) as exc:
            return self._withheld(body, headers, str(exc))
        if not isinstance(doc, dict | list) or (length == 0 and names):
            # A raw binary request (header length 0) is one unnamed input: it may be a named one.
            return self._withheld(body, headers, "a body whose tensors cannot be named")
        if names and not (isinstance(doc, dict) and isinstance(doc.get(kind), list)):
            # Not a V2 body (an OpenAI answer, a generate request, an error): its values are not
            # tensors by name, so a named one may be anywhere in it (a generated text named
            # "text" is in choices[].message.content). SSE answers never parse here at all.
            return self._withheld(body, headers, f"a body without {kind} to redact by name")
        blobs = raw[length:]
        changed, kept = False, blobs
        if names and isinstance(doc, dict) and isinstance(doc.get(kind), list):
            changed, kept = self._tensors(doc[kind], names, blobs)
        for pointer in self._pointers:
            changed = self._replace_at(doc, pointer) or changed
        if not changed:
            return Body(body, headers)
        head = orjson.dumps(doc)
        out = _without(headers, _FRAMING)
        if kept:
            out.append((HEADER_LENGTH, str(len(head))))
        return Body(head + kept, out)

    def _tensors(
        self, tensors: list[Any], names: frozenset[str], blobs: bytes
    ) -> tuple[bool, bytes]:
        """Replace the named tensors in place; the binary bytes of the others, in order."""
        changed, offset, kept = False, 0, []
        for i, t in enumerate(tensors):
            if not isinstance(t, dict):
                continue
            params = t.get("parameters")
            size = params.get("binary_data_size") if isinstance(params, dict) else None
            region = None
            if type(size) is int and size >= 0:
                region = blobs[offset : offset + size]
                offset += size
            if t.get("name") not in names:
                if region is not None:
                    kept.append(region)
                continue
            tensors[i] = {
                "name": t["name"],
                "datatype": "BYTES",
                "shape": [1],
                "data": [self.keyed_hash(_canonical(t, region))],
                "parameters": {
                    "redacted": {"datatype": t.get("datatype"), "shape": t.get("shape")}
                },
            }
            changed = True
        return changed, b"".join(kept) + blobs[offset:]

    def _replace_at(self, doc: Any, pointer: list[str]) -> bool:
        parent, last = doc, pointer[-1]
        for token in pointer[:-1]:
            parent = _step(parent, token)
            if parent is None:
                return False
        if isinstance(parent, dict) and last in parent:
            parent[last] = self._hash_json(parent[last])
            return True
        index = _index(parent, last)
        if index is not None:
            parent[index] = self._hash_json(parent[index])
            return True
        return False

    def _hash_json(self, value: Any) -> str:
        return self.keyed_hash(b"json:" + orjson.dumps(value, option=orjson.OPT_SORT_KEYS))

    def _withheld(self, body: bytes, headers: list[tuple[str, str]], why: str) -> Body:
        note = {"withheld": f"not stored: {why}", "bytes": len(body), "hash": self.keyed_hash(body)}
        kept = _without(headers, _FRAMING | {"content-type"})
        return Body(orjson.dumps(note), [*kept, ("Content-Type", "application/json")])


_TEXT_ASPECTS = frozenset({"tokens", "logprobs", "json"})


def _aspect(output: str) -> str:
    """An output's name without its choice (``choices[1].text`` -> ``text``)."""
    return output.rsplit(".", 1)[-1] if output.startswith("choices[") else output


# What a generated text's preview says about its content: cleared when ``text`` is redacted
# (its finish reason, usage and timing stay).
_TEXT_CONTENT = ("text", "tokens", "token_ids", "tool_calls")


def _blank(pv: Any) -> Any:
    if not isinstance(pv, dict):
        return pv
    if pv.get("kind") == "text":
        return {**pv, **dict.fromkeys(_TEXT_CONTENT), "text": "", "redacted": True}
    return {**pv, "head": [], "redacted": True}


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)  # NaN/Infinity literals, which Triton and clients may write


def _header_length(value: str | None, total: int) -> int:
    if value is None:
        return total
    try:
        n = int(value)
    except ValueError as exc:
        raise MalformedMessage(f"{HEADER_LENGTH} is not an integer") from exc
    if not 0 <= n <= total:
        raise MalformedMessage(f"{HEADER_LENGTH} is outside the body")
    return n


def _canonical(tensor: Mapping[str, Any], region: bytes | None) -> bytes:
    """What a tensor's hash covers: datatype, shape, and its elements as the binary extension
    lays them out (numbers little-endian; BYTES as 4-byte lengths and bytes)."""
    datatype = str(tensor.get("datatype"))
    head = f"{datatype}|{tensor.get('shape')}|".encode()
    if region is not None:
        return head + region
    data = tensor.get("data")
    try:
        if datatype == "BYTES":
            flat = np.asarray(data, dtype=object).reshape(-1)
            items = [v.encode() if isinstance(v, str) else bytes(v) for v in flat]
            return head + b"".join(struct.pack("<I", len(b)) + b for b in items)
        np_type = triton_to_np_dtype(datatype) if datatype != "BF16" else None
        if np_type is not None:
            dt = np.dtype(np_type).newbyteorder("<")
            return head + np.asarray(data, dtype=dt).reshape(-1).tobytes()
    except (TypeError, ValueError, OverflowError):
        pass
    return head + b"json:" + orjson.dumps(data)


def _parse_pointer(pointer: str) -> list[str]:
    """RFC 6901 reference tokens (``~1`` is ``/``, ``~0`` is ``~``, in that order)."""
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:]]


def _index(node: Any, token: str) -> int | None:
    if not isinstance(node, list) or not token.isdigit() or (token != "0" and token[0] == "0"):
        return None
    index = int(token)
    return index if index < len(node) else None


def _step(node: Any, token: str) -> Any:
    if isinstance(node, dict):
        return node.get(token)
    index = _index(node, token)
    return node[index] if index is not None else None
