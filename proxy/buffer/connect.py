"""The one place a Redis client is built from ``buffer.redis_url``.

Schemes:

- ``redis://``, ``rediss://``, ``unix://``: one server, handed to redis-py's
  ``Redis.from_url`` unchanged (the embedded Redis is a ``unix://`` URL).
- ``redis+sentinel://[user:password@]host[:port][,host[:port]...]/service_name[/db][?options]``
  (``rediss+sentinel://`` for TLS to the sentinels and the master): the master of
  ``service_name`` as the sentinels name it, through redis-py's ``Sentinel.master_for``, which
  follows a failover. Sentinel ports default to 26379, ``db`` to 0.
- ``redis+cluster://[user:password@]host[:port][,host[:port]...][/0][?options]``
  (``rediss+cluster://`` for TLS): redis-py's ``RedisCluster`` with these startup nodes (the
  others are discovered). Ports default to 6379; a cluster has database 0 only.

Credentials. The user and password before ``@`` are the data servers' (the master, or every
cluster node). Sentinels are often run without a password while the master has one, and
Redis refuses an AUTH it did not ask for, so the URL's password is not sent to them: a sentinel
that needs one gets the ``sentinel_password`` (and ``sentinel_username``) option, the convention
of Prefect's and docket's ``redis+sentinel://`` URLs. Every other ``?option`` is a redis-py URL
option (``socket_timeout``, ``ssl_ca_certs``...), parsed by redis-py, for the data connections;
with TLS the ``ssl_*`` ones apply to the sentinels too.

A malformed URL is a ``ConfigError`` that says what is wrong and shows the URL with its
secrets masked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, TypeAlias
from urllib.parse import parse_qsl, quote, unquote, urlencode

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from ..errors import ConfigError

RedisClient: TypeAlias = aioredis.Redis | RedisCluster
"""What the store, the canary and the admin plane talk to: one server (direct or through
Sentinel) or a cluster."""

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
PLAIN_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_PORT = 26379
CLUSTER_PORT = 6379
# Options for the sentinels themselves, not the data connections.
_SENTINEL_AUTH = ("sentinel_username", "sentinel_password")
_SHAPES = {
    "redis+sentinel": "redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db]",
    "redis+cluster": "redis+cluster://[user:password@]host:port[,host:port...][/0]",
}


@dataclass(frozen=True, slots=True)
class Deployment:
    """A parsed Sentinel or Cluster URL."""

    kind: str
    """``sentinel`` or ``cluster``."""
    hosts: tuple[tuple[str, int], ...]
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the data connections (credentials, db, ssl, URL options)."""
    service: str = ""
    """Sentinel only: the monitored master's name."""
    sentinel_options: dict[str, Any] = field(default_factory=dict)
    """Sentinel only: keyword arguments for the connections to the sentinels."""


def redis_client(url: str, **pool_options: Any) -> RedisClient:
    """A client for ``url``; ``pool_options`` (timeouts, ``decode_responses``...) apply to every
    connection, and options in the URL win over them. Nothing connects yet."""
    scheme = _scheme(url)
    if scheme in PLAIN_SCHEMES:
        try:
            return aioredis.Redis.from_url(_encoded_userinfo(url), **pool_options)
        except ValueError as exc:
            raise ConfigError(f"invalid Redis URL {redacted(url)}: {_scrubbed(exc, url)}") from None
    target = parse_deployment(url)
    options = {**pool_options, **target.options}
    if target.kind == "cluster":
        nodes = [ClusterNode(host, port) for host, port in target.hosts]
        return RedisCluster(startup_nodes=nodes, **options)
    # Socket timeouts bound the sentinels' answers too (redis-py copies them only when it is
    # given no sentinel options at all). A sentinel is asked once: the next one in the list is
    # the retry. redis-py's default retries with backoff spent 7 s on a sentinel that was down
    # before asking the next, on every master lookup until one answered.
    sentinel_options = {
        **{k: v for k, v in pool_options.items() if k.startswith("socket_")},
        "retry": Retry(NoBackoff(), 0),
        **target.sentinel_options,
    }
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(target.hosts), sentinel_kwargs=sentinel_options
    )
    client: aioredis.Redis = sentinel.master_for(
        target.service, redis_class=SentinelMaster, **options
    )
    return client


def check_url(url: str) -> None:
    """Raise ``ConfigError`` if ``url`` is not one ``redis_client`` takes (nothing connects)."""
    if _scheme(url) in PLAIN_SCHEMES:
        try:
            parse_url(_encoded_userinfo(url))
        except ValueError as exc:
            raise ConfigError(f"invalid Redis URL {redacted(url)}: {_scrubbed(exc, url)}") from None
    else:
        parse_deployment(url)


class SentinelMaster(aioredis.Redis):
    """The master's client; closing it closes its connections to the sentinels too."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        pool = self.connection_pool
        if isinstance(pool, SentinelConnectionPool):
            for sentinel in pool.sentinel_manager.sentinels:
                await sentinel.aclose()


def parse_deployment(url: str) -> Deployment:
    """Split a ``redis+sentinel://`` or ``redis+cluster://`` URL; ``ConfigError`` if malformed."""
    scheme = _scheme(url)
    if scheme not in SENTINEL_SCHEMES + CLUSTER_SCHEMES:
        raise _invalid(url, f"unknown scheme {scheme!r}")
    sentinel = scheme in SENTINEL_SCHEMES
    tls = scheme.startswith("rediss")
    userinfo, after = _userinfo(url.split("://", 1)[1])
    after, _, query = after.partition("?")
    hostlist, _, path = after.partition("/")
    hosts = _hosts(url, hostlist, SENTINEL_PORT if sentinel else CLUSTER_PORT)
    try:
        # redis-py's own URL parsing for the credentials and the options.
        auth = quote(userinfo, safe=":%") + "@" if userinfo else ""
        stand_in = f"{'rediss' if tls else 'redis'}://{auth}host"
        options: dict[str, Any] = dict(parse_url(f"{stand_in}?{query}" if query else stand_in))
    except ValueError as exc:
        raise _invalid(url, _scrubbed(exc, url)) from None
    options.pop("host", None)
    if options.pop("connection_class", None) is SSLConnection:
        options["ssl"] = True
    if "db" in options:
        raise _invalid(url, "give the database in the path, not as a db= option")
    segments = [unquote(s) for s in path.split("/")] if path else []
    if sentinel:
        return _sentinel(url, hosts, segments, options, tls)
    if segments not in ([], [""], ["0"]):
        raise _invalid(url, "a Redis Cluster has database 0 only")
    for name in _SENTINEL_AUTH:
        if name in options:
            raise _invalid(url, f"{name} is for redis+sentinel:// URLs")
    return Deployment("cluster", hosts, options)


def _sentinel(
    url: str,
    hosts: tuple[tuple[str, int], ...],
    segments: list[str],
    options: dict[str, Any],
    tls: bool,
) -> Deployment:
    if not segments or not segments[0]:
        raise _invalid(url, "the service name (the master's name in the sentinels) is missing")
    if len(segments) > 2 or (len(segments) == 2 and not segments[1].isdigit()):
        raise _invalid(url, "the path must be /service_name or /service_name/db (db a number)")
    if len(segments) == 2:
        options["db"] = int(segments[1])
    to_sentinels: dict[str, Any] = {
        name.removeprefix("sentinel_"): options.pop(name)
        for name in _SENTINEL_AUTH
        if name in options
    }
    if tls:
        to_sentinels["ssl"] = True
        to_sentinels.update({k: v for k, v in options.items() if k.startswith("ssl_")})
    return Deployment("sentinel", hosts, options, segments[0], to_sentinels)


def _hosts(url: str, hostlist: str, default_port: int) -> tuple[tuple[str, int], ...]:
    hosts = []
    for item in hostlist.split(","):
        match = re.fullmatch(r"(\[[^\]]+\]|[^:\[\]]+)(?::([^:]*))?", item)
        if match is None:
            raise _invalid(url, f"{item!r} is no host[:port]" if item else "a host is missing")
        host, port = match.group(1).strip("[]"), match.group(2)
        if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
            raise _invalid(url, f"port {port!r} of {host} is not a port number")
        hosts.append((host, int(port) if port else default_port))
    return tuple(hosts)


def _scheme(url: str) -> str:
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise _invalid(url, "no scheme")
    scheme = scheme.lower()
    if scheme not in PLAIN_SCHEMES + SENTINEL_SCHEMES + CLUSTER_SCHEMES:
        raise _invalid(url, f"unknown scheme {scheme!r}")
    return scheme


def _invalid(url: str, why: str) -> ConfigError:
    schemes = ", ".join(f"{s}://" for s in PLAIN_SCHEMES + SENTINEL_SCHEMES + CLUSTER_SCHEMES)
    scheme = url.partition("://")[0].lower().replace("rediss+", "redis+")
    shape = _SHAPES.get(scheme, f"one of {schemes}")
    return ConfigError(f"invalid Redis URL {redacted(url)}: {why}; expected {shape}")


def _userinfo(rest: str) -> tuple[str, str]:
    """(the credentials, what follows them) of a URL's part after ``://``. The credentials end at
    the *last* ``@``: a password often holds an unencoded ``/``, ``?`` or ``#`` (base64), and
    splitting at the first ``/`` first would take part of it for the host list (and quote it
    in an error). An ``@`` after the credentials is malformed anyway; this masks too much then,
    never too little."""
    userinfo, at, after = rest.rpartition("@")
    return (userinfo, after) if at else ("", rest)


def _encoded_userinfo(url: str) -> str:
    """``url`` with reserved characters in its credentials percent-encoded, as redis-py's parser
    needs them (it would otherwise split the password at a ``/`` and connect elsewhere)."""
    head, sep, rest = url.partition("://")
    userinfo, after = _userinfo(rest)
    if not sep or not userinfo:
        return url
    return f"{head}{sep}{quote(userinfo, safe=':%')}@{after}"


def _scrubbed(exc: Exception, url: str) -> str:
    """An exception's text with any piece of the URL's password taken out (parsers quote what
    they could not read)."""
    text = str(exc)
    password = _userinfo(url.partition("://")[2])[0].partition(":")[2]
    for part in {password, quote(password, safe=""), *password.split("/")}:
        if len(part) >= 2 and part in text:
            text = text.replace(part, "***")
    return text


def redacted(url: str) -> str:
    """``url`` with its password and ``sentinel_password`` masked (for messages and logs)."""
    head, sep, rest = url.partition("://")
    if not sep:
        return "***" if "@" in url else url
    userinfo, after = _userinfo(rest)
    if userinfo:
        user = userinfo.partition(":")[0]
        after = f"{user}:***@{after}" if ":" in userinfo else f"***@{after}"
    after, qsep, query = after.partition("?")
    if qsep:
        pairs = parse_qsl(query, keep_blank_values=True)
        masked = [(k, "***" if "password" in k else v) for k, v in pairs]
        query = urlencode(masked, safe="*", quote_via=quote)
    return f"{head}{sep}{after}{qsep}{query}"
