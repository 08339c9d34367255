"""``GET /api/builds``, ``/api/builds/{id}`` and ``/api/builds/diff?a=ID&b=ID``: the builds
ledger with each build's evidence (served by the review worker: reading a day of statistics is
not the live process's work)."""

from __future__ import annotations

import json

from aiohttp import web

from ..builds.evidence import BuildsView, builds_view
from ..errors import StoreError
from ..keys import CURRENT, DATA_APP, STORE


def _view(request: web.Request) -> BuildsView:
    data = request.app[DATA_APP]
    return builds_view(data[CURRENT].settings, data[STORE])


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def list_builds(request: web.Request) -> web.Response:
    try:
        return web.json_response(await _view(request).list_builds())
    except StoreError as exc:
        return _error(503, f"builds unavailable: {exc}")


async def get_build(request: web.Request) -> web.Response:
    view = _view(request)
    try:
        build_id = await view.ledger.resolve(request.match_info["id"])
        build = await view.show(build_id)
    except StoreError as exc:
        status = 404 if "matches no build" in str(exc) or "ambiguous" in str(exc) else 503
        return _error(status, str(exc))
    if build is None:
        return _error(404, f"no build {request.match_info['id']!r}")
    return web.json_response(build)


async def diff_builds(request: web.Request) -> web.Response:
    a, b = request.query.get("a", ""), request.query.get("b", "")
    if not a or not b:
        return _error(400, "diff needs both builds: ?a=ID&b=ID")
    view = _view(request)
    try:
        ids = [await view.ledger.resolve(x) for x in (a, b)]
        return web.json_response(await view.diff(*ids), dumps=lambda o: json.dumps(o, default=str))
    except StoreError as exc:
        status = 404 if "matches no build" in str(exc) or "ambiguous" in str(exc) else 503
        return _error(status, str(exc))
