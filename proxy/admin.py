"""The admin plane: health, readiness, metrics, the samples API, the summary and the review page.

Every route but ``/healthz`` and ``/readyz`` needs ``Authorization: Bearer <admin.token>``; a
missing or wrong token gets 401 and no data. Handlers only read resources owned by the data app.
"""

from __future__ import annotations

import base64
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import aiohttp
from aiohttp import web

from .buffer.store import LABELS
from .errors import StoreError
from .keys import DATA_APP, JUDGE, SCHEDULER, SETTINGS, STORE, TELEMETRY
from .settings import Settings

_OPEN = frozenset({"/healthz", "/readyz"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_admin_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[_auth_middleware])
    app[SETTINGS] = settings
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/samples", list_samples)
    app.router.add_get("/api/samples/{id}", get_sample)
    app.router.add_post("/api/samples/{id}/label", label_sample)
    app.router.add_get("/api/summary", summary)
    app.router.add_get("/review", review_page)
    return app


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in _OPEN:
        return await handler(request)
    token = request.app[SETTINGS].admin.token
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    if (
        token is None
        or scheme.lower() != "bearer"
        or not hmac.compare_digest(value.encode(), token.get_secret_value().encode())
    ):
        resp = _error(401, "missing or wrong admin token (send Authorization: Bearer <token>)")
        resp.headers["WWW-Authenticate"] = 'Bearer realm="shadowproxy"'
        return resp
    return await handler(request)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the reference answers its health route and Redis answers PING."""
    data = request.app[DATA_APP]
    settings = data[SETTINGS]
    checks: dict[str, str] = {}
    url = f"{settings.reference.url}/v2/health/ready"
    try:
        timeout = aiohttp.ClientTimeout(total=2.0)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as resp:
            checks["reference"] = "ok" if resp.status == 200 else f"answered {resp.status}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        checks["reference"] = f"unreachable: {type(exc).__name__}"
    checks["redis"] = "ok" if await data[STORE].ping() else "unreachable"
    ready = all(v == "ok" for v in checks.values())
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    text = request.app[DATA_APP][TELEMETRY].prometheus_text()
    return web.Response(body=text, content_type="text/plain", charset="utf-8")


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": f"query parameter {name} must be an integer, got {raw!r}"}),
            content_type="application/json",
        ) from None
    return max(lo, min(hi, value))


async def list_samples(request: web.Request) -> web.Response:
    store = request.app[DATA_APP][STORE]
    flagged = request.query.get("flagged", "0").lower() in ("1", "true", "yes")
    limit = _int_param(request, "limit", 100, 1, 10_000)
    try:
        items = await store.list_samples(
            flagged=flagged, candidate=request.query.get("candidate"), limit=limit
        )
    except StoreError as exc:
        return _error(503, f"sample store unavailable: {exc}")
    for item in items:
        item.pop("previews", None)
    return web.json_response(items)


def render_payloads(payloads: dict[str, bytes]) -> dict[str, Any]:
    """JSON bodies as JSON; binary ones (tensor bytes) as base64 beside their JSON header."""
    out: dict[str, Any] = {}
    for name, raw in payloads.items():
        if name.endswith("_headers"):
            out[name] = json.loads(raw)
            continue
        try:
            out[name] = {"json": json.loads(raw)}
        except (ValueError, UnicodeDecodeError):
            out[name] = {"base64": base64.b64encode(raw).decode(), "bytes": len(raw)}
    return out


async def get_sample(request: web.Request) -> web.Response:
    store = request.app[DATA_APP][STORE]
    try:
        sample = await store.get_sample(request.match_info["id"])
    except StoreError as exc:
        return _error(503, f"sample store unavailable: {exc}")
    if sample is None:
        return _error(404, f"no sample {request.match_info['id']!r} (unknown or expired)")
    sample["payloads"] = render_payloads(sample["payloads"])
    return web.json_response(sample)


async def label_sample(request: web.Request) -> web.Response:
    store = request.app[DATA_APP][STORE]
    try:
        body = await request.json()
    except ValueError:
        return _error(400, 'body must be JSON: {"verdict": ..., "note": ...}')
    if not isinstance(body, dict) or body.get("verdict") not in LABELS:
        return _error(400, f"'verdict' must be one of: {', '.join(LABELS)}")
    try:
        label = await store.label(
            request.match_info["id"], body["verdict"], str(body.get("note", "")), "admin"
        )
    except KeyError:
        return _error(404, f"no sample {request.match_info['id']!r} (unknown or expired)")
    except StoreError as exc:
        return _error(503, f"sample store unavailable: {exc}")
    return web.json_response(label)


async def summary(request: web.Request) -> web.Response:
    data = request.app[DATA_APP]
    tel = data[TELEMETRY]
    process: dict[str, dict[str, int]] = {}
    for (candidate, what), n in tel.tally.items():
        process.setdefault(candidate, {})[what] = n
    try:
        stored: dict[str, int] | None = await data[STORE].stats()
    except StoreError:
        stored = None
    return web.json_response(
        {
            "time": time.time(),
            "candidates": [
                {"name": c.name, "noise_floor": c.noise_floor, "sample_rate": c.sample_rate}
                for c in data[SETTINGS].candidates
            ],
            "in_flight": dict(data[SCHEDULER].in_flight),
            "this_process": process,
            "stored_counters": stored,
            "population": data[JUDGE].population.summary(),
        }
    )


async def review_page(request: web.Request) -> web.Response:
    page = resources.files("proxy").joinpath("static/review.html").read_text(encoding="utf-8")
    return web.Response(text=page, content_type="text/html")
