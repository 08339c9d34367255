"""Who may use the admin plane: tokens, roles, browser sessions and CSRF.

Two ways in. Scripts send ``Authorization: Bearer <token>`` (the admin token, or a user's). A
browser posts a token once to ``/login`` and gets an HttpOnly, SameSite=Strict session cookie; the
session lives in Redis (so every replica knows it) with its own CSRF token, which every
state-changing request must echo in ``X-CSRF-Token``. Tokens never travel in URLs.

Roles: ``viewer`` reads; ``reviewer`` also labels; ``admin`` may do everything.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources

import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

from .buffer.keys import KeySchema
from .settings import AdminSettings

SESSION_COOKIE = "sp_session"
CSRF_HEADER = "X-CSRF-Token"
ROLES = ("viewer", "reviewer", "admin")
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Routes anyone may reach: health checks, the login page and the static assets (no data).
# The Flagger webhook checks its own token: Flagger cannot send headers, so it may come in the
# payload (see ``canary.api``).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/login", "/api/canary/flagger"})
OPEN_PREFIXES = ("/static/",)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    role: str
    csrf: str | None = None
    """Set for browser sessions only: ambient cookies need CSRF proof, bearer tokens do not."""
    session_id: str | None = None

    def may(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


PRINCIPAL = web.RequestKey("principal", Principal)


class Authenticator:
    """Checks tokens and sessions; sessions live in Redis under the key schema."""

    def __init__(self, settings: AdminSettings, redis: aioredis.Redis, keys: KeySchema) -> None:
        self._settings = settings
        self._redis = redis
        self._keys = keys

    def principal_for_token(self, token: str) -> Principal | None:
        given = token.encode()
        admin = self._settings.token
        if admin is not None and hmac.compare_digest(given, admin.get_secret_value().encode()):
            return Principal("admin", "admin")
        for user in self._settings.users:
            if hmac.compare_digest(given, user.token.get_secret_value().encode()):
                return Principal(user.name, user.role)
        return None

    async def authenticate(self, request: web.Request) -> Principal | None:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and value:
            return self.principal_for_token(value)
        sid = request.cookies.get(SESSION_COOKIE)
        if not sid:
            return None
        try:
            raw = await self._redis.get(self._keys.session(sid))
        except (RedisError, OSError):
            return None
        if raw is None:
            return None
        data = json.loads(raw)
        return Principal(data["user"], data["role"], data["csrf"], sid)

    async def open_session(self, who: Principal) -> tuple[str, str]:
        sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        record = json.dumps({"user": who.name, "role": who.role, "csrf": csrf})
        await self._redis.set(self._keys.session(sid), record, ex=self._settings.session_ttl_s)
        return sid, csrf

    async def close_session(self, sid: str) -> None:
        await self._redis.delete(self._keys.session(sid))


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def login_page(status: int = 200) -> web.Response:
    page = resources.files("proxy").joinpath("static/login.html").read_text(encoding="utf-8")
    return web.Response(text=page, content_type="text/html", status=status)


def required_role(request: web.Request) -> str:
    """Reading needs viewer, labelling needs reviewer, anything else that changes state admin."""
    if request.method in _SAFE_METHODS:
        return "viewer"
    if request.path.startswith("/api/samples/") and request.path.endswith("/label"):
        return "reviewer"
    if request.path == "/logout":
        return "viewer"
    return "admin"


def auth_middleware(
    auth_key: web.AppKey[Authenticator],
) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS or request.path.startswith(OPEN_PREFIXES):
            return await handler(request)
        who = await request.app[auth_key].authenticate(request)
        if who is None:
            if request.path == "/review":
                return login_page(status=401)  # no data, just the way in
            resp = _json_error(401, "log in, or send Authorization: Bearer <token>")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="shadowproxy"'
            return resp
        if request.method not in _SAFE_METHODS and who.csrf is not None:
            sent = request.headers.get(CSRF_HEADER, "")
            if not hmac.compare_digest(sent.encode(), who.csrf.encode()):
                return _json_error(403, f"missing or wrong {CSRF_HEADER} header")
        need = required_role(request)
        if not who.may(need):
            return _json_error(403, f"{who.name} is a {who.role}; this needs the {need} role")
        request[PRINCIPAL] = who
        return await handler(request)

    return middleware


async def login(request: web.Request, auth: Authenticator) -> web.Response:
    try:
        body = await request.json()
        token = str(body["token"])
    except (ValueError, KeyError, TypeError):
        return _json_error(400, 'body must be JSON: {"token": "..."}')
    who = auth.principal_for_token(token)
    if who is None:
        return _json_error(401, "unknown token")
    try:
        sid, csrf = await auth.open_session(who)
    except (RedisError, OSError):
        return _json_error(503, "cannot open a session: the sample store (Redis) is unavailable")
    resp = web.json_response({"user": who.name, "role": who.role, "csrf": csrf})
    resp.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="Strict", path="/")
    return resp


async def logout(request: web.Request, auth: Authenticator) -> web.Response:
    who: Principal = request[PRINCIPAL]
    if who.session_id is not None:
        # If Redis is down the cookie is still cleared below; the session expires on its own.
        with contextlib.suppress(RedisError, OSError):
            await auth.close_session(who.session_id)
    resp = web.json_response({"logged_out": who.name})
    resp.del_cookie(SESSION_COOKIE, path="/")
    return resp
