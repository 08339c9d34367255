"""The proxy's exception tree. Upstream failures are translated here, at one boundary.

    ShadowProxyError
    ├── ConfigError                      bad config file or CLI argument (names the key and file)
    ├── StoreError                       Redis could not be reached or answered badly
    ├── CanaryError                      a rollout command that does not apply (names why)
    └── UpstreamError                    a server behind the proxy failed (status on the class)
        ├── UpstreamTimeout      504  DEADLINE_EXCEEDED  no answer within the upstream's timeout
        ├── UpstreamUnavailable  503  UNAVAILABLE        connection refused / DNS failure
        └── UpstreamBadResponse  502  INTERNAL           the connection broke or the answer was
                                                         malformed

The live path renders an ``UpstreamError`` in the V2 error shape ``{"error": "..."}``, naming the
upstream, so a client sees which hop failed; the gRPC listener ends the call with the class's
``grpc_code`` (a ``grpc.StatusCode`` name, kept as a string so this module needs no grpc) and the
same message. A status the upstream itself sent is no ``UpstreamError``: it is passed through.
"""

from __future__ import annotations

import asyncio

import aiohttp


class ShadowProxyError(Exception):
    """Base of every error raised by the proxy on purpose."""


class ConfigError(ShadowProxyError):
    """The configuration (file, environment or CLI) is invalid; the message says where."""


class StoreError(ShadowProxyError):
    """The sample store (Redis) failed."""


class CanaryError(ShadowProxyError):
    """A canary command that cannot apply to the rollout as it is (e.g. pausing a promoted one)."""


class UpstreamError(ShadowProxyError):
    status: int = 502
    grpc_code: str = "INTERNAL"

    def __init__(self, upstream: str, url: str, detail: str) -> None:
        self.upstream = upstream
        self.url = url
        self.detail = detail
        super().__init__(f"upstream '{upstream}' at {url}: {detail}")


class UpstreamTimeout(UpstreamError, TimeoutError):
    status = 504
    grpc_code = "DEADLINE_EXCEEDED"


class UpstreamUnavailable(UpstreamError, ConnectionError):
    status = 503
    grpc_code = "UNAVAILABLE"


class UpstreamBadResponse(UpstreamError):
    status = 502
    grpc_code = "INTERNAL"


def translate_upstream_error(exc: BaseException, upstream: str, url: str) -> UpstreamError:
    """Map an aiohttp/asyncio failure talking to ``upstream`` onto our tree (the one boundary)."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamTimeout(upstream, url, "timed out waiting for an answer")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamUnavailable(upstream, url, f"cannot connect ({exc.os_error or exc})")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return UpstreamBadResponse(upstream, url, "closed the connection without an answer")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return UpstreamBadResponse(upstream, url, f"sent a broken body ({exc})")
    if isinstance(exc, aiohttp.ClientResponseError):
        return UpstreamBadResponse(upstream, url, f"sent a malformed answer ({exc.message})")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return UpstreamBadResponse(
            upstream, url, f"connection failed ({type(exc).__name__}: {exc})"
        )
    return UpstreamBadResponse(upstream, url, f"{type(exc).__name__}: {exc}")
