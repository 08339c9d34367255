"""V2 REST as a protocol adapter: the codec's functions behind the adapter interface."""

from __future__ import annotations

from collections.abc import Mapping

from ..base import RequestFacts
from .codec import decode_infer_response, parse_request_header, unsafe_to_mirror


class V2RestAdapter:
    name = "v2_rest"
    title = "V2 REST"

    decode_response = staticmethod(decode_infer_response)

    def inspect_request(
        self, body: bytes, headers: Mapping[str, str], *, max_inflated_bytes: int
    ) -> RequestFacts:
        header = parse_request_header(body, headers, max_inflated_bytes=max_inflated_bytes)
        request_id = header.get("id") if header else None
        return RequestFacts(unsafe_to_mirror(header), str(request_id) if request_id else None)

    def error_text(self, status: int, headers: Mapping[str, str], body: bytes) -> str:
        # Triton's error answers are {"error": "..."}: short enough to show whole.
        return body[:200].decode("utf-8", "replace").strip()


ADAPTER = V2RestAdapter()
