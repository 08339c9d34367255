"""The canary's admin routes: status, commands, and the evidence for external controllers.

- ``GET /api/canary``: the rollout, the current step's gates (value, threshold, status), its
  evidence and the decision log;
- ``POST /api/canary/{pause|resume|abort|promote|restart}`` (admin role): a person's command,
  with an optional ``{"reason": "..."}``, recorded with who sent it;
- ``POST /api/canary/flagger``: a Flagger webhook. 200 when every gate passes, so Flagger goes on;
  409 when a gate failed and 425 while the step has too little evidence, so it halts. Flagger
  cannot send headers, so besides ``Authorization: Bearer`` the token may come in the payload's
  ``metadata.token`` (never in the URL);
- ``GET /api/canary/analysis``: an Argo Rollouts web metric: always 200 with the measured values;
  use ``successCondition: result.passed`` and ``failureCondition: result.failed``.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from ..errors import CanaryError, StoreError
from ..keys import CANARY, DATA_APP, SETTINGS
from ..review.auth import PRINCIPAL, Authenticator
from .controller import CanaryController
from .state import ACTIONS

FLAGGER_PATH = "/api/canary/flagger"
_MAX_WEBHOOK_BYTES = 64 * 1024


def add_routes(app: web.Application, auth_key: web.AppKey[Authenticator]) -> None:
    async def flagger(request: web.Request) -> web.Response:
        return await flagger_webhook(request, request.app[auth_key])

    app.router.add_get("/api/canary", status)
    app.router.add_get("/api/canary/analysis", analysis)
    app.router.add_post(FLAGGER_PATH, flagger)
    app.router.add_post("/api/canary/{action}", command)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _controller(request: web.Request) -> CanaryController | None:
    return request.app[DATA_APP].get(CANARY)


_NO_CANARY = "no canary is configured (add a `canary:` section to the config)"


async def status(request: web.Request) -> web.Response:
    controller = _controller(request)
    if controller is None:
        return _error(404, _NO_CANARY)
    try:
        return web.json_response(await controller.status())
    except StoreError as exc:
        return _error(503, f"the rollout cannot be read: {exc}")


async def command(request: web.Request) -> web.Response:
    controller = _controller(request)
    action = request.match_info["action"]
    if controller is None:
        return _error(404, _NO_CANARY)
    if action not in ACTIONS:
        return _error(404, f"unknown canary command {action!r}; use one of {', '.join(ACTIONS)}")
    reason = ""
    if request.can_read_body:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, 'the body must be JSON, e.g. {"reason": "..."}')
        if not isinstance(body, dict) or not isinstance(body.get("reason", ""), str):
            return _error(400, "the body must be a JSON object with a string `reason`")
        reason = body.get("reason", "")
    who = request[PRINCIPAL].name
    settings = request.app[SETTINGS]
    try:
        state, record = await controller.store.command(action, settings, who, reason)
    except CanaryError as exc:
        return _error(409, str(exc))
    except StoreError as exc:
        return _error(503, f"the rollout cannot be changed: {exc}")
    controller.poke()
    return web.json_response(
        {"state": state.view() if state else None, "decision": record}, status=200
    )


async def _evaluation(controller: CanaryController) -> dict[str, Any]:
    snap = await controller.status(decisions=0)
    state = snap["state"] or {}
    evaluation = snap["evaluation"] or {"status": "wait", "gates": []}
    status = state.get("status")
    if status in ("rolled_back", "aborted", "lost"):
        # Lost: nothing vouches for the candidate any more, and this proxy serves the reference.
        verdict = "fail"
    elif status == "promoted":
        verdict = "pass"
    elif status in ("paused", "awaiting_approval"):
        # A person holds the rollout here: an external controller must not move it on either.
        verdict = "fail" if evaluation["status"] == "fail" else "wait"
    else:
        verdict = evaluation["status"]
    return {
        "rollout": snap["rollout"],
        "candidate": snap["candidate"],
        "status": verdict,
        "passed": verdict == "pass",
        "failed": verdict == "fail",
        "rollout_status": state.get("status"),
        "weight": state.get("weight"),
        "step": state.get("step_number"),
        "reason": state.get("reason"),
        "gates": {
            g["gate"]: {"status": g["status"], "value": g["value"], "threshold": g["threshold"]}
            for g in evaluation["gates"]
        },
        "evidence": snap["evidence"],
    }


async def analysis(request: web.Request) -> web.Response:
    controller = _controller(request)
    if controller is None:
        return _error(404, _NO_CANARY)
    try:
        return web.json_response(await _evaluation(controller))
    except StoreError as exc:
        return _error(503, f"the rollout cannot be read: {exc}")


async def flagger_webhook(request: web.Request, auth: Authenticator) -> web.Response:
    """Flagger's webhook: its payload is ``{name, namespace, phase, checksum, metadata}``.

    The token travels in the payload because Flagger webhooks cannot send headers; it then lives
    in the Canary resource, so give Flagger a token of its own with the viewer role."""
    refused = auth.throttled(request)
    if refused is not None:
        return refused
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    payload: Any = {}
    if request.can_read_body:
        if request.content_length is not None and request.content_length > _MAX_WEBHOOK_BYTES:
            return _error(413, f"a Flagger payload is small; this one is over {_MAX_WEBHOOK_BYTES}")
        try:
            payload = await request.json()
        except ValueError:
            payload = None
    if not token and isinstance(payload, dict) and isinstance(payload.get("metadata"), dict):
        token = str(payload["metadata"].get("token", ""))
    if auth.check_token(request, token) is None:
        resp = _error(401, "send Authorization: Bearer <token>, or metadata.token in the payload")
        resp.headers["WWW-Authenticate"] = 'Bearer realm="shadowproxy"'
        return resp
    if not isinstance(payload, dict):
        return _error(400, "the body must be Flagger's JSON payload")
    controller = _controller(request)
    if controller is None:
        return _error(404, _NO_CANARY)
    try:
        result = await _evaluation(controller)
    except StoreError as exc:
        return _error(503, f"the rollout cannot be read: {exc}")
    result["flagger"] = {k: payload.get(k) for k in ("name", "namespace", "phase")}
    code = {"pass": 200, "fail": 409}.get(result["status"], 425)
    return web.Response(text=json.dumps(result), status=code, content_type="application/json")
