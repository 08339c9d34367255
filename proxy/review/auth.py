"""Who may use the admin plane: tokens, roles, browser sessions and CSRF.

Two ways in. Scripts send ``Authorization: Bearer <token>`` (the admin token, or a user's). A
browser posts a token once to ``/login`` and gets an HttpOnly, SameSite=Strict session cookie; the
session lives in Redis (so every replica knows it) with its own CSRF token, which every
state-changing request must echo in ``X-CSRF-Token``. Tokens never travel in URLs.

Roles: ``viewer`` reads; ``reviewer`` also labels; ``admin`` may do everything. A session keeps
who logged in and a digest of the token they used, never the role: each request re-resolves the
role from the configuration in force, and a session whose user is gone or whose token changed is
refused (and deleted).

Failed logins and bad bearer tokens are counted per client address (``admin.auth_failures_per_min``
over a minute); beyond it the address gets 429 with ``Retry-After`` for token checks until the
minute has passed. Sessions (cookies) are neither counted nor refused by it.

Every admin answer carries a CSP (only the page's own script and stylesheet; no framing),
``nosniff`` and ``no-referrer``; the cookie is ``Secure`` when the admin plane speaks TLS
(``admin.tls_cert``) or ``admin.secure_cookies`` says a TLS proxy is in front.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources

from aiohttp import web
from pydantic import SecretStr
from redis.exceptions import RedisError

from ..buffer.connect import RedisClient
from ..buffer.keys import KeySchema
from ..settings import AdminSettings

SESSION_COOKIE = "sp_session"
CSRF_HEADER = "X-CSRF-Token"
ROLES = ("viewer", "reviewer", "admin")
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Routes anyone may reach: health checks, the login page and the static assets (no data).
# The Flagger webhook checks its own token: Flagger cannot send headers, so it may come in the
# payload (see ``canary.api``).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/login", "/api/canary/flagger"})
OPEN_PREFIXES = ("/static/",)

# The review page loads only its own script and stylesheet (no inline script or style: checked
# against proxy/review/static/); its favicon is an empty data: URL. Nobody may frame it
# (clickjacking a labelling keyboard shortcut), and nothing is sniffed into another type.
CSP = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers without CSP level 2
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

_WINDOW_S = 60.0
_TRACKED_ADDRESSES = 10_000
"""Addresses whose recent failures are remembered; beyond it the least recently failing is
forgotten, so a spray of addresses cannot grow memory without bound."""
# Session records keep a slow digest of the token they were opened with, not the token: someone
# who reads Redis cannot replay it as a bearer token, nor cheaply test guesses of a weak one.
_FINGERPRINT_ROUNDS = 20_000

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = logging.getLogger("shadowproxy.admin")


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


class FailureLimiter:
    """Failed token checks per client address over the last minute; over the limit, refuse.

    Only failures are counted, so a test suite or a Service in front of replicas (every request
    from one address) never trips it with good tokens. Per process: ``serve --workers N`` and N
    replicas each allow the limit."""

    def __init__(self, per_minute: int) -> None:
        self._limit = per_minute
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, address: str) -> float | None:
        """Seconds until ``address`` may try again, or None when it may now."""
        times = self._failures.get(address)
        if times is None or len(times) < self._limit:
            return None
        wait = times[0] + _WINDOW_S - time.monotonic()
        return wait if wait > 0 else None

    def failed(self, address: str) -> None:
        times = self._failures.pop(address, None)
        if times is None:
            times = deque(maxlen=self._limit)
            if len(self._failures) >= _TRACKED_ADDRESSES:
                self._failures.popitem(last=False)
        times.append(time.monotonic())
        self._failures[address] = times
        if len(times) == self._limit and self.retry_after(address) is not None:
            log.warning(
                "admin: %s failed %d token checks within a minute; its token checks get 429 "
                "for up to a minute",
                address,
                self._limit,
            )


def _fingerprint(name: str, token: SecretStr) -> str:
    salt = b"shadowproxy-session\0" + name.encode()
    secret = token.get_secret_value().encode()
    raw = hashlib.pbkdf2_hmac("sha256", secret, salt, _FINGERPRINT_ROUNDS)
    return raw[:16].hex()


class Authenticator:
    """Checks tokens and sessions; sessions live in Redis under the key schema.

    ``settings`` is read on every check, never copied: a session holds who logged in and a
    fingerprint of the token used, and its role comes from the configuration in force, so a
    removed user, a changed token or a changed role takes effect on the next request."""

    def __init__(
        self, settings: Callable[[], AdminSettings], redis: RedisClient, keys: KeySchema
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._keys = keys
        self._limiter = FailureLimiter(settings().auth_failures_per_min)
        self._prints: dict[tuple[str, str], str] = {}

    @property
    def secure_cookies(self) -> bool:
        """The session cookie is ``Secure`` under TLS here, or behind a TLS proxy (said so)."""
        admin = self._settings()
        return admin.secure_cookies or admin.tls_cert is not None

    def _accounts(self) -> list[tuple[Principal, SecretStr]]:
        admin = self._settings()
        accounts = [(Principal("admin", "admin"), admin.token)] if admin.token is not None else []
        return accounts + [(Principal(u.name, u.role), u.token) for u in admin.users]

    def _print_of(self, name: str, token: SecretStr) -> str:
        # Computed once per configured (name, token): the slow digest stays off every request.
        key = (name, token.get_secret_value())
        if key not in self._prints:
            self._prints[key] = _fingerprint(name, token)
        return self._prints[key]

    def principal_for_token(self, token: str) -> Principal | None:
        given = token.encode()
        found = None
        for who, secret in self._accounts():
            # Every token is compared (no early exit), each in constant time.
            if hmac.compare_digest(given, secret.get_secret_value().encode()):
                found = found or who
        return found

    def throttled(self, request: web.Request) -> web.Response | None:
        """The 429 to send when this client address failed too many token checks lately."""
        wait = self._limiter.retry_after(request.remote or "unknown")
        if wait is None:
            return None
        resp = _json_error(
            429, "too many failed logins or bad tokens from this address; retry later"
        )
        resp.headers["Retry-After"] = str(math.ceil(wait))
        return resp

    def check_token(self, request: web.Request, token: str) -> Principal | None:
        """The principal for a presented token; a wrong one counts against the address (no
        token at all is no guess, and is not counted)."""
        if not token:
            return None
        who = self.principal_for_token(token)
        if who is None:
            self._limiter.failed(request.remote or "unknown")
        return who

    async def authenticate(self, request: web.Request) -> Principal | web.Response | None:
        """Who sent the request; None when nobody known, or the 429 to answer instead."""
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and value:
            return self.throttled(request) or self.check_token(request, value)
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
        who = self._resolve(str(data.get("user", "")), str(data.get("token_fp", "")))
        if who is None:
            # The user is gone or their token changed (or a record from before fingerprints):
            # the session is over for good, even if the old token comes back.
            with contextlib.suppress(RedisError, OSError):
                await self.close_session(sid)
            return None
        return Principal(who.name, who.role, str(data["csrf"]), sid)

    def _resolve(self, name: str, token_fp: str) -> Principal | None:
        for who, secret in self._accounts():
            if who.name == name and hmac.compare_digest(
                self._print_of(who.name, secret).encode(), token_fp.encode()
            ):
                return who
        return None

    async def open_session(self, who: Principal, token: str) -> tuple[str, str]:
        sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        token_fp = self._print_of(who.name, SecretStr(token))
        record = json.dumps({"user": who.name, "token_fp": token_fp, "csrf": csrf})
        ttl = self._settings().session_ttl_s
        await self._redis.set(self._keys.session(sid), record, ex=ttl)
        return sid, csrf

    async def close_session(self, sid: str) -> None:
        await self._redis.delete(self._keys.session(sid))


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every admin answer (page, assets, JSON, errors) carries them."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def login_page(status: int = 200) -> web.Response:
    page = resources.files("proxy.review").joinpath("static/login.html").read_text(encoding="utf-8")
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
        if isinstance(who, web.Response):
            return who
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
    refused = auth.throttled(request)
    if refused is not None:
        return refused
    try:
        body = await request.json()
        token = str(body["token"])
    except (ValueError, KeyError, TypeError):
        return _json_error(400, 'body must be JSON: {"token": "..."}')
    who = auth.check_token(request, token)
    if who is None:
        return _json_error(401, "unknown token")
    try:
        sid, csrf = await auth.open_session(who, token)
    except (RedisError, OSError):
        return _json_error(503, "cannot open a session: the sample store (Redis) is unavailable")
    resp = web.json_response({"user": who.name, "role": who.role, "csrf": csrf})
    resp.set_cookie(
        SESSION_COOKIE,
        sid,
        httponly=True,
        samesite="Strict",
        path="/",
        secure=auth.secure_cookies or None,
    )
    return resp


async def logout(request: web.Request, auth: Authenticator) -> web.Response:
    who: Principal = request[PRINCIPAL]
    if who.session_id is not None:
        # If Redis is down the cookie is still cleared below; the session expires on its own.
        with contextlib.suppress(RedisError, OSError):
            await auth.close_session(who.session_id)
    resp = web.json_response({"logged_out": who.name})
    resp.del_cookie(SESSION_COOKIE, path="/", secure=auth.secure_cookies or None, samesite="Strict")
    return resp
