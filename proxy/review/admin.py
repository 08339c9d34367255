"""The admin plane: health, readiness, metrics, the review page and its API, the summary.

Access (tokens, roles, browser sessions, CSRF) is enforced by ``auth.auth_middleware`` on every
route but the health checks, the login page and static assets; a missing or wrong token gets 401
and no data. Handlers only read resources owned by the data app.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Mapping
from importlib import resources
from typing import Any

import aiohttp
from aiohttp import web

from ..buffer.store import LABELS
from ..canary import api as canary_api
from ..errors import StoreError
from ..keys import (
    CANARY,
    COVERAGE,
    CURRENT,
    DATA_APP,
    LIVE_SESSION,
    MIRROR,
    POPULATION,
    SETTINGS,
    STORE,
    TELEMETRY,
)
from ..protocols.base import MalformedMessage
from ..settings import Settings
from ..shadow.mirror_link import merge_tally
from ..telemetry import merge_prometheus_text
from . import api as review_api
from . import builds_api
from .auth import (
    PRINCIPAL,
    Authenticator,
    Principal,
    add_security_headers,
    auth_middleware,
    login,
    login_page,
    logout,
)

AUTH = web.AppKey("auth", Authenticator)


def create_admin_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[auth_middleware(AUTH)])
    app[SETTINGS] = settings
    app.on_response_prepare.append(add_security_headers)
    app.on_startup.append(_make_authenticator)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login_route)
    app.router.add_post("/logout", logout_route)
    app.router.add_get("/api/me", me)
    app.router.add_get("/api/samples", list_samples)
    app.router.add_get("/api/samples/{id}", get_sample)
    app.router.add_get("/api/samples/{id}/tensors", get_tensors)
    app.router.add_post("/api/samples/{id}/label", label_sample)
    app.router.add_delete("/api/samples/{id}", delete_sample)
    app.router.add_get("/api/summary", summary)
    app.router.add_get("/api/timeseries", timeseries)
    app.router.add_get("/api/builds", builds_api.list_builds)
    app.router.add_get("/api/builds/diff", builds_api.diff_builds)
    app.router.add_get("/api/builds/{id}", builds_api.get_build)
    canary_api.add_routes(app, AUTH)
    app.router.add_get("/review", review_page)
    app.router.add_static("/static/", str(resources.files("proxy.review").joinpath("static")))
    return app


async def _make_authenticator(app: web.Application) -> None:
    # Sessions share the data plane's Redis pool, which exists once the data app has started.
    data = app[DATA_APP]
    store = data[STORE]
    # Tokens and roles are looked up in the settings in force at each request (never copied
    # into a session), so a reload that replaces them takes effect at once.
    app[AUTH] = Authenticator(lambda: data[CURRENT].settings.admin, store.redis, store.keys)


async def login_form(request: web.Request) -> web.Response:
    return login_page()


async def login_route(request: web.Request) -> web.Response:
    return await login(request, request.app[AUTH])


async def logout_route(request: web.Request) -> web.Response:
    return await logout(request, request.app[AUTH])


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the reference answers its health route. Redis is reported, never required:
    the live path does not need it (verdicts spool, copies are dropped and counted), and a
    Redis outage must not take every replica out of its Service."""
    data = request.app[DATA_APP]
    settings = data[SETTINGS]
    checks: dict[str, str] = {}
    url = f"{settings.reference.url}/v2/health/ready"
    try:
        # The live process's client session (one per process, pooled): no new session, DNS
        # lookup and connection per probe.
        timeout = aiohttp.ClientTimeout(total=2.0)
        async with data[LIVE_SESSION].get(url, timeout=timeout) as resp:
            checks["reference"] = "ok" if resp.status == 200 else f"answered {resp.status}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        checks["reference"] = f"unreachable: {type(exc).__name__}"
    checks["redis"] = "ok" if await data[STORE].ping() else "unreachable"
    ready = checks["reference"] == "ok"
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    """This process's metrics and the mirror processes' (merged: each family once), with the
    coverage per candidate."""
    data = request.app[DATA_APP]
    snap = await data[MIRROR].snapshot()
    coverage = await data[COVERAGE].report()
    texts = [data[TELEMETRY].prometheus_text().decode(), snap["prometheus"]]
    text = merge_prometheus_text(texts) + coverage_text(coverage)
    return web.Response(body=text.encode(), content_type="text/plain", charset="utf-8")


def coverage_text(coverage: dict[str, dict[str, Any]]) -> str:
    """The coverage ratio per candidate as a Prometheus gauge, overall and recently."""
    lines = [
        "# HELP shadowproxy_mirror_coverage_ratio Share of the copies a candidate asked for "
        "that were compared (window: total since start, or recent minutes)",
        "# TYPE shadowproxy_mirror_coverage_ratio gauge",
    ]
    for name, row in coverage.items():
        for window, ratio in (("total", row["coverage"]), ("recent", row["recent"]["coverage"])):
            if ratio is not None:
                lines.append(
                    f'shadowproxy_mirror_coverage_ratio{{candidate="{name}",window="{window}"}} '
                    f"{ratio!r}"
                )
    return "\n".join(lines) + "\n"


async def me(request: web.Request) -> web.Response:
    who: Principal = request[PRINCIPAL]
    return web.json_response({"user": who.name, "role": who.role, "csrf": who.csrf})


async def list_samples(request: web.Request) -> web.Response:
    return await review_api.list_samples(request, request.app[DATA_APP][STORE])


def render_payloads(
    payloads: dict[str, bytes],
    truncated: Mapping[str, int] | None = None,
    protocol: str | None = None,
) -> dict[str, Any]:
    """JSON bodies as JSON; binary ones (tensor bytes) as base64 beside their JSON header. A body
    stored truncated (``buffer.max_payload_bytes``) is shown as the bytes kept, marked
    ``truncated`` with the size it had. A gRPC request is shown as the JSON its protobuf
    message reads as (tensors as a preview of their first values)."""
    out: dict[str, Any] = {}
    for name, raw in payloads.items():
        try:
            if name.endswith("_headers"):
                out[name] = json.loads(raw)
                continue
            if name == "request" and protocol == "v2_grpc":
                # Imported here: protobuf is heavy for an admin plane that may see no gRPC.
                from ..protocols.v2_grpc.render import render_request

                out[name] = {"json": render_request(raw), "protocol": protocol}
                continue
            out[name] = {"json": json.loads(raw)}
        except (ValueError, UnicodeDecodeError, MalformedMessage):
            out[name] = {"base64": base64.b64encode(raw).decode(), "bytes": len(raw)}
        if truncated and name in truncated:
            out[name].update(truncated=True, original_bytes=truncated[name])
    return out


async def _load_sample(request: web.Request) -> dict[str, Any] | web.Response:
    """The sample named in the path, or the error response to send instead (404 / 503)."""
    try:
        sample = await request.app[DATA_APP][STORE].get_sample(request.match_info["id"])
    except StoreError as exc:
        return _error(503, f"sample store unavailable: {exc}")
    if sample is None:
        return _error(404, f"no sample {request.match_info['id']!r} (unknown or expired)")
    return sample


async def get_sample(request: web.Request) -> web.Response:
    sample = await _load_sample(request)
    if isinstance(sample, web.Response):
        return sample
    sample["payloads"] = render_payloads(
        sample["payloads"], sample.get("truncated"), sample.get("protocol")
    )
    return web.json_response(sample)


async def get_tensors(request: web.Request) -> web.Response:
    sample = await _load_sample(request)
    if isinstance(sample, web.Response):
        return sample
    return web.json_response(review_api.sample_tensors(sample))


async def label_sample(request: web.Request) -> web.Response:
    store = request.app[DATA_APP][STORE]
    who: Principal = request[PRINCIPAL]
    try:
        body = await request.json()
    except ValueError:
        return _error(400, 'body must be JSON: {"verdict": ..., "note": ...}')
    if not isinstance(body, dict) or body.get("verdict") not in LABELS:
        return _error(400, f"'verdict' must be one of: {', '.join(LABELS)}")
    try:
        label = await store.label(
            request.match_info["id"], body["verdict"], str(body.get("note", "")), who.name
        )
    except KeyError:
        return _error(404, f"no sample {request.match_info['id']!r} (unknown or expired)")
    except StoreError as exc:
        return _error(503, f"sample store unavailable: {exc}")
    return web.json_response(label)


async def delete_sample(request: web.Request) -> web.Response:
    return await review_api.delete_sample(request, request.app[DATA_APP][STORE])


async def timeseries(request: web.Request) -> web.Response:
    data = request.app[DATA_APP]
    noise = {c.name: c.noise_floor for c in data[CURRENT].settings.candidates}
    return await review_api.timeseries(request, data[STORE], noise)


async def summary(request: web.Request) -> web.Response:
    """``GET /api/summary[?window_min=N]``: population statistics over the last N minutes (the
    noise window by default; at most ``buffer.stats_retention_min``), as every replica and
    worker wrote them to Redis, so every replica answers the same."""
    data = request.app[DATA_APP]
    settings = data[CURRENT].settings
    raw = request.query.get("window_min", "")
    window_min = settings.noise.window_min
    if raw:
        if not raw.isdigit() or not 1 <= int(raw) <= settings.buffer.stats_retention_min:
            return web.json_response(
                {
                    "error": "window_min must be a whole number of minutes from 1 to "
                    f"buffer.stats_retention_min ({settings.buffer.stats_retention_min}), "
                    f"got {raw!r}"
                },
                status=400,
            )
        window_min = int(raw)
    snap = await data[MIRROR].snapshot()
    try:
        stored: dict[str, int] | None = await data[STORE].stats()
    except StoreError:
        stored = None
    population: list[dict[str, Any]] | None
    try:
        population = await data[POPULATION].summary(window_min)
    except StoreError:
        population = None
    return web.json_response(
        {
            "time": time.time(),
            "candidates": [
                {"name": c.name, "noise_floor": c.noise_floor, "sample_rate": c.sample_rate}
                for c in data[CURRENT].settings.candidates
            ],
            "mirror_worker": snap["worker"],
            "in_flight": snap["in_flight"],
            # Since this proxy started (its live process and its mirror worker together).
            "this_process": merge_tally(data[TELEMETRY].tally, snap["tally"]),
            # Per candidate: copies asked for, compared, lost by reason; a warning with the
            # setting to change when recent coverage is below target.
            "coverage": await data[COVERAGE].report(),
            "stored_counters": stored,
            # Per candidate, model and output over ``window_min``; null while Redis is away.
            "window_min": window_min,
            "population": population,
            # The rollout as this replica sees it; ``state_lost`` says it serves the reference
            # because the rollout's state vanished from Redis (until `canary restart`).
            "canary": data[CANARY].brief() if CANARY in data else None,
        }
    )


async def review_page(request: web.Request) -> web.Response:
    page = (
        resources.files("proxy.review").joinpath("static/review.html").read_text(encoding="utf-8")
    )
    resp = web.Response(text=page, content_type="text/html")
    resp.headers["Cache-Control"] = "no-store"
    return resp
