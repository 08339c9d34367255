"""Wiring: the data plane and the admin plane, and who owns which resource.

``create_apps`` returns two aiohttp applications. The data app owns every async resource through
its cleanup contexts, which aiohttp sets up in this order and unwinds in reverse: telemetry ->
sample store (and the embedded Redis) -> canary evidence buffer -> canary controller -> compare
threads and comparer -> client sessions -> mirror scheduler (or, with ``proxy.mirror_process``,
the link to the mirror process, which runs the scheduler with its own contexts and compare
worker processes) -> the live proxy -> the fast lane's connections to the reference -> the gRPC
channel to the reference. ``ProxyRunner`` closes the fast lane's and the gRPC listener (letting
their requests in flight finish) before any of that unwinds. So on shutdown the scheduler drains
first (its queue, then its compare stage), then the clients it used close, then the comparer
stores its last batch, then the canary stops and its last evidence is flushed, then the store
closes, then telemetry flushes.
The admin app only reads those resources; start it after the data app and stop it before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import aiohttp
from aiohttp import web
from pydantic import SecretStr

from .buffer.embedded import start_embedded
from .buffer.population import PopulationStore
from .buffer.store import SampleStore
from .builds.ledger import BuildLedger
from .builds.tracker import BuildTracker
from .canary.controller import CanaryController
from .canary.evidence import EvidenceBuffer
from .errors import StoreError
from .keys import (
    CANARY,
    COMPARER,
    COVERAGE,
    CURRENT,
    DATA_APP,
    EMBEDDED_REDIS,
    EVIDENCE,
    EXECUTOR,
    FAST_LANE,
    GRPC_CANARY,
    GRPC_UPSTREAM,
    LIVE_PROXY,
    LIVE_SESSION,
    MIRROR,
    POPULATION,
    SETTINGS,
    SHADOW_CLIENT,
    STORE,
    TELEMETRY,
)
from .live.fast_lane import FastLane
from .live.fast_lane_server import FastLaneServer
from .live.forwarding import LiveProxy, strip_server_defaults
from .live.grpc_canary import GrpcCanary
from .live.grpc_mirror import GrpcCopier
from .live.grpc_relay import GrpcRelay
from .live.grpc_server import GrpcLiveServer
from .live.grpc_upstream import GrpcUpstream
from .live.upstream_pool import UpstreamPool
from .protocols.model_config import ModelConfigs
from .protocols.v2_rest.codec import warm_up
from .reload import ReloadPlan, SettingsRef, plan_reload
from .review import admin
from .review.admin_tls import admin_ssl_context
from .review.admin_worker import ADMIN_WORKER, AdminWorker
from .review.auth import Authenticator
from .settings import Settings
from .shadow.compare_link import CompareLink
from .shadow.compare_stage import Comparer, LocalCompareSink
from .shadow.copy_stream import CopyStream
from .shadow.coverage import CoverageMonitor, Fates, fates_of
from .shadow.judge import Judge, LatestPopulation
from .shadow.mirror import MirrorScheduler
from .shadow.mirror_api import CompareSink, Mirror
from .shadow.mirror_link import MirrorLink
from .shadow.shadow_calls import ShadowCalls
from .shadow.shadow_client import SKIP_AUTO_HEADERS, ShadowClient
from .shadow.stream_worker import WORKER, StreamWorker
from .telemetry import Telemetry

log = logging.getLogger("shadowproxy")

# How often the population gauges are read again from Redis.
POPULATION_GAUGES_S = 15.0

STARVABLE = web.AppKey("starvable", bool)
"""The process runs at idle CPU priority: its Redis client must not time out on wall clock."""
STORES_VERDICTS = web.AppKey("stores_verdicts", bool)
# Its verdicts may be compared again under the same sample ids (Redis-stream workers).
IDEMPOTENT = web.AppKey("idempotent", bool)
"""The process writes verdicts (its store spools them while Redis is away); others only read."""


def build_mirror_app(settings: Settings) -> web.Application:
    """The mirror process's resources, no server: the scheduler (queue, candidate calls) and its
    compare workers; the same teardown order (the scheduler drains, then the workers finish,
    then the client closes)."""
    app = web.Application()
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_telemetry_ctx(None))
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_evidence_ctx)
    app.cleanup_ctx.append(_shadow_client_ctx)
    app.cleanup_ctx.append(_scheduler_ctx(in_process=False))
    app.cleanup_ctx.append(_population_ctx(gauges=True))
    return app


def _compare_app(settings: Settings) -> web.Application:
    """What every compare stage owns: telemetry, the store, canary evidence, the compare
    threads and the comparer (judge, builds, store batches)."""
    app = web.Application()
    app[SETTINGS] = settings
    app[STORES_VERDICTS] = True
    app.cleanup_ctx.append(_telemetry_ctx(None))
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_evidence_ctx)
    app.cleanup_ctx.append(_executor_ctx)
    app.cleanup_ctx.append(_comparer_ctx)
    return app


def build_compare_app(settings: Settings) -> web.Application:
    """A compare worker process's resources (behind the mirror process)."""
    app = _compare_app(settings)
    app[STARVABLE] = True  # it runs at idle CPU priority
    return app


def build_worker_app(settings: Settings) -> web.Application:
    """A ``shadowproxy worker``: the copies stream's consumer with a compare stage of its own,
    and ``/healthz``, ``/readyz`` and ``/metrics`` for its orchestrator and Prometheus."""
    app = _compare_app(settings)
    app[IDEMPOTENT] = True
    app.cleanup_ctx.append(_shadow_client_ctx)
    app.cleanup_ctx.append(_stream_worker_ctx)
    app.router.add_get("/healthz", _worker_health)
    app.router.add_get("/readyz", _worker_ready)
    app.router.add_get("/metrics", _worker_metrics)
    return app


async def _stream_worker_ctx(app: web.Application) -> AsyncIterator[None]:
    settings, store = app[SETTINGS], app[STORE]
    client = app[SHADOW_CLIENT]
    models = ModelConfigs(client.session(), settings.reference.url)
    calls = ShadowCalls(settings, client, app[TELEMETRY], app.get(EVIDENCE))
    worker = StreamWorker(
        settings, store.redis, store.keys.copies, app[COMPARER], calls, models, app[TELEMETRY]
    )
    await worker.ensure_group()
    app[WORKER] = worker
    app[admin.AUTH] = Authenticator(lambda: settings.admin, store.redis, store.keys)
    task = asyncio.get_running_loop().create_task(worker.run())
    yield
    # Teardown drains this first: the comparer, store and sessions it uses close after it.
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await worker.close(settings.proxy.drain_timeout_s)
    await models.close()


async def _worker_health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def _worker_ready(request: web.Request) -> web.Response:
    ok = await request.app[STORE].ping()
    return web.json_response({"ready": ok, "redis": ok}, status=200 if ok else 503)


async def _worker_metrics(request: web.Request) -> web.Response:
    """Any admin-plane token reads metrics (``admin.token`` or a user's of any role, as the
    proxies' admin plane lets a viewer), checked by the admin plane's own authenticator."""
    plane = request.app[SETTINGS].admin
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if (plane.token is not None or plane.users) and (
        scheme != "Bearer" or request.app[admin.AUTH].principal_for_token(token) is None
    ):
        return web.json_response({"error": "an admin-plane bearer token is required"}, status=401)
    body = request.app[TELEMETRY].prometheus_text()
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


def build_review_app(settings: Settings) -> web.Application:
    """The review worker's resources (``admin_worker``): the sample store, read only."""
    app = web.Application()
    app[SETTINGS] = settings
    app[CURRENT] = SettingsRef(settings)
    app.cleanup_ctx.append(_store_ctx)
    return app


def create_apps(
    settings: Settings, *, telemetry: Telemetry | None = None
) -> tuple[web.Application, web.Application]:
    data = web.Application(
        client_max_size=settings.proxy.max_body_bytes,
        # Keep request bodies as the client sent them (gzip included): they are forwarded as-is.
        handler_args={"auto_decompress": False},
    )
    data[SETTINGS] = settings
    data[CURRENT] = current = SettingsRef(settings)
    data[STORES_VERDICTS] = not settings.proxy.mirror_process
    data.cleanup_ctx.append(_telemetry_ctx(telemetry))
    data.cleanup_ctx.append(_store_ctx)
    data.cleanup_ctx.append(_evidence_ctx)
    data.cleanup_ctx.append(_canary_ctx)
    # In-process shadow work (or none: compare=redis): the gauges are read here.
    data.cleanup_ctx.append(
        _population_ctx(
            gauges=not settings.proxy.mirror_process or settings.proxy.compare == "redis"
        )
    )
    if settings.proxy.compare == "redis":
        # Copies go to the Redis stream; `shadowproxy worker` processes do the shadow's work.
        data.cleanup_ctx.append(_live_session_ctx)
        data.cleanup_ctx.append(_copy_stream_ctx)
    elif settings.proxy.mirror_process:
        data.cleanup_ctx.append(_live_session_ctx)
        data.cleanup_ctx.append(_mirror_link_ctx)
    else:
        data.cleanup_ctx.append(_executor_ctx)
        data.cleanup_ctx.append(_comparer_ctx)
        data.cleanup_ctx.append(_live_session_ctx)
        data.cleanup_ctx.append(_shadow_client_ctx)
        data.cleanup_ctx.append(_scheduler_ctx(in_process=True))
    data.cleanup_ctx.append(_live_proxy_ctx)
    data.cleanup_ctx.append(_coverage_ctx)
    data.cleanup_ctx.append(_fast_lane_ctx)
    data.cleanup_ctx.append(_grpc_upstream_ctx)
    data.on_response_prepare.append(strip_server_defaults)
    data.router.add_route("*", "/{tail:.*}", _handle)

    admin_app = admin.create_admin_app(settings)
    admin_app[DATA_APP] = data
    admin_app[CURRENT] = current
    # Heavy reads go to the review worker once the auth middleware (first) has let them in.
    review = AdminWorker(lambda: _child_settings(data, current.settings))
    admin_app.middlewares.append(review.middleware)
    admin_app.cleanup_ctx.append(_admin_worker_ctx(review))
    return data, admin_app


def _child_settings(app: web.Application, settings: Settings) -> Settings:
    """``settings`` for a child process of ``app``: it writes to the Redis this process uses."""
    if EMBEDDED_REDIS not in app:
        return settings
    url = SecretStr(app[EMBEDDED_REDIS].url)
    return settings.model_copy(
        update={"buffer": settings.buffer.model_copy(update={"redis_url": url})}
    )


def _admin_worker_ctx(review: AdminWorker) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        app[ADMIN_WORKER] = review
        yield
        await review.close()

    return ctx


async def _handle(request: web.Request) -> web.StreamResponse:
    return await request.app[LIVE_PROXY].handle(request)


def _telemetry_ctx(
    given: Telemetry | None,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        tel = given or Telemetry(app[SETTINGS].telemetry)
        app[TELEMETRY] = tel
        yield
        if given is None:
            tel.shutdown()

    return ctx


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    url = settings.buffer.redis_url.get_secret_value() if settings.buffer.redis_url else None
    if url is None:
        embedded = await asyncio.to_thread(start_embedded, settings.buffer.state_dir)
        app[EMBEDDED_REDIS] = embedded
        url = embedded.url
    comparing = app.get(STORES_VERDICTS, False)
    store = SampleStore.from_url(
        url, settings.buffer, starvable=app.get(STARVABLE, False), spool=comparing
    )
    app[STORE] = store
    if comparing:
        await store.start()  # replays what an earlier run left in the spool
        if store.outbox is not None:
            app[TELEMETRY].gauge(
                "shadowproxy_spool_records",
                "Verdicts this process spooled while Redis was away, replayed, or lost",
                store.outbox.observe_gauges,
            )
    if not await store.ping():
        # Not fatal: the live path never needs Redis. Verdicts wait in the spool meanwhile.
        log.warning("redis is not reachable now; verdicts wait in the spool until it is")
    try:
        yield
    finally:
        if comparing:
            # Shutdown: what is spooled goes to Redis now if it answers (else the next start
            # replays it).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(store.flush(), settings.proxy.drain_timeout_s)
        await store.close()
        if EMBEDDED_REDIS in app:
            await asyncio.to_thread(app[EMBEDDED_REDIS].stop)


async def _evidence_ctx(app: web.Application) -> AsyncIterator[None]:
    # Canary evidence, batched to Redis; closed after the scheduler (which adds to it) drained.
    if app[SETTINGS].canary is None:
        yield
        return
    store = app[STORE]
    evidence = EvidenceBuffer(store.redis, store.keys, app[TELEMETRY])
    evidence.start()
    app[EVIDENCE] = evidence
    yield
    await evidence.close()


async def _canary_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    if settings.canary is None:
        yield
        return
    controller = CanaryController(settings, app[STORE], app[EVIDENCE], app[TELEMETRY])
    app[TELEMETRY].gauge(
        "shadowproxy_canary",
        "The canary rollout: weight, step, and each gate's status, value and threshold",
        controller.observe_gauges,
    )
    await controller.start()
    app[CANARY] = controller
    yield
    await controller.close()


async def _executor_ctx(app: web.Application) -> AsyncIterator[None]:
    pool = ThreadPoolExecutor(
        max_workers=app[SETTINGS].proxy.compare_workers, thread_name_prefix="compare"
    )
    app[EXECUTOR] = pool
    await asyncio.get_running_loop().run_in_executor(pool, warm_up)
    yield
    pool.shutdown(wait=True, cancel_futures=True)


async def _live_session_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    live = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
        # A proxy keeps no cookies: a jar would replay one client's Set-Cookie to every later
        # client, and it parses and filters cookies on every request and answer.
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=SKIP_AUTO_HEADERS,
        timeout=aiohttp.ClientTimeout(total=settings.reference.timeout_s),
    )
    app[LIVE_SESSION] = live
    yield
    await live.close()


async def _shadow_client_ctx(app: web.Application) -> AsyncIterator[None]:
    # Its own pools: a slow candidate can never hold a connection the live path needs.
    client = ShadowClient(max_answer_bytes=app[SETTINGS].proxy.max_answer_bytes)
    app[SHADOW_CLIENT] = client
    yield
    await client.close()


async def _comparer_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    store = app[STORE]
    population = PopulationStore(store.redis, store.keys, settings.buffer.stats_retention_min)
    judge = Judge(settings, population)
    # Its own small pool for the builds' metadata probes (never the live or shadow pools).
    probes = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    builds = BuildTracker(probes, BuildLedger(store.redis, store.keys))
    comparer = Comparer(
        settings,
        store,
        app[EXECUTOR],
        app[TELEMETRY],
        judge,
        app.get(EVIDENCE),
        idempotent=app.get(IDEMPOTENT, False),
        builds=builds,
    )
    app[COMPARER] = comparer
    judge.start()
    yield
    await comparer.close()
    await judge.close()  # the last statistics, once every comparison is done
    await builds.close()
    await probes.close()


def _population_ctx(*, gauges: bool) -> Callable[[web.Application], AsyncIterator[None]]:
    """The population statistics as Redis has them (``/api/summary`` reads them), and with
    ``gauges`` the population gauges of /metrics, read again every ``POPULATION_GAUGES_S`` (a
    scrape never waits for Redis). Reading a window of buckets costs CPU: the gauges are read
    in the mirror process when there is one, not on the live loop."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        store = app[STORE]
        latest = LatestPopulation(
            PopulationStore(store.redis, store.keys, settings.buffer.stats_retention_min),
            settings.noise.window_min,
        )
        app[POPULATION] = latest
        if not gauges:
            yield
            return
        async with _gauges_refreshed(app, latest):
            yield

    return ctx


@contextlib.asynccontextmanager
async def _gauges_refreshed(app: web.Application, latest: LatestPopulation) -> AsyncIterator[None]:
    app[TELEMETRY].gauge(
        "shadowproxy_population",
        "Population statistics per candidate, model and output over the noise window, merged "
        "across replicas (label stat says which)",
        latest.observe_gauges,
    )

    async def refresh() -> None:
        while True:
            try:
                await latest.refresh()
            except StoreError as exc:
                log.debug("population gauges not refreshed: %s", exc)
            except Exception:
                log.exception("population gauges not refreshed")
            await asyncio.sleep(POPULATION_GAUGES_S)

    task = asyncio.get_running_loop().create_task(refresh())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _scheduler_ctx(*, in_process: bool) -> Callable[[web.Application], AsyncIterator[None]]:
    """The I/O stage; its compare stage is the app's comparer (in process) or compare worker
    processes (the mirror process)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        tel = app[TELEMETRY]
        sink: CompareSink
        if in_process:
            sink = LocalCompareSink(app[COMPARER])
        else:
            link = CompareLink(settings, tel)
            await link.start()
            sink = link
        scheduler = MirrorScheduler(
            settings, app[SHADOW_CLIENT], tel, sink, app.get(EVIDENCE), live_process=in_process
        )
        app[MIRROR] = scheduler
        scheduler.start()
        yield
        await scheduler.close()  # drains the queue, then the compare stage

    return ctx


async def _mirror_link_ctx(app: web.Application) -> AsyncIterator[None]:
    link = MirrorLink(_child_settings(app, app[SETTINGS]), app[TELEMETRY], app.get(EVIDENCE))
    await link.start()
    app[MIRROR] = link
    yield
    await link.close()


async def _copy_stream_ctx(app: web.Application) -> AsyncIterator[None]:
    store = app[STORE]
    stream = CopyStream(app[SETTINGS], store.redis, store.keys, app[TELEMETRY])
    stream.start()
    app[MIRROR] = stream
    yield
    await stream.close()


async def _coverage_ctx(app: web.Application) -> AsyncIterator[None]:
    async def gather() -> Fates:
        rows = [[c, w, n] for (c, w), n in app[TELEMETRY].tally.items()]
        rows += (await app[MIRROR].progress()).get("fates", [])
        return fates_of(rows)

    monitor = CoverageMonitor(app[SETTINGS], gather)
    monitor.start()
    app[COVERAGE] = monitor
    yield
    await monitor.close()


async def _live_proxy_ctx(app: web.Application) -> AsyncIterator[None]:
    proxy = LiveProxy(
        app[SETTINGS], app[LIVE_SESSION], app[MIRROR], app[TELEMETRY], app.get(CANARY)
    )
    app[LIVE_PROXY] = proxy
    yield
    await proxy.close()


async def _fast_lane_ctx(app: web.Application) -> AsyncIterator[None]:
    # Its own connections to the reference: the fast lane's calls never wait on aiohttp's pool.
    settings = app[SETTINGS]
    ref = settings.reference
    if not settings.proxy.fast_lane or not ref.url.startswith("http://"):
        yield
        return
    pool = UpstreamPool(ref.name, ref.url, ref.timeout_s, ref.connect_timeout_s)
    app[FAST_LANE] = FastLane(settings, pool, app[MIRROR], app[TELEMETRY])
    yield
    pool.close()


async def _grpc_upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    # The gRPC listener's one channel to the reference (HTTP/2 multiplexes every call on it).
    settings = app[SETTINGS]
    if settings.listen.grpc_port is None:
        yield
        return
    upstream = await GrpcUpstream.open(settings.reference, settings.proxy.max_body_bytes)
    app[GRPC_UPSTREAM] = upstream
    canary: GrpcUpstream | None = None
    if CANARY in app:
        candidate = app[CANARY].candidate
        if candidate.grpc_target is None:
            log.warning(
                "canary candidate %r has no grpc_url: gRPC calls stay with the reference",
                candidate.name,
            )
        else:
            # The canary's own channel: its answers are live answers.
            canary = await GrpcUpstream.open(candidate, settings.proxy.max_body_bytes)
            models = ModelConfigs(app[LIVE_SESSION], settings.reference.url)
            app[GRPC_CANARY] = GrpcCanary(settings, app[CANARY], canary, models)
    yield
    if GRPC_CANARY in app:
        await app[GRPC_CANARY].close()
    if canary is not None:
        await canary.close()
    await upstream.close()


class ProxyRunner:
    """Start and stop both planes on their ports (used by ``serve``, the demo and the tests)."""

    def __init__(
        self, settings: Settings, *, telemetry: Telemetry | None = None, reuse_port: bool = False
    ) -> None:
        # SO_REUSEPORT: several processes share the ports (``serve --workers``).
        self._reuse_port = reuse_port
        self.data, self.admin = create_apps(settings, telemetry=telemetry)
        self._runners: list[web.AppRunner] = []
        self._fast: FastLaneServer | None = None
        self._grpc: GrpcLiveServer | None = None
        self._relay: GrpcRelay | None = None
        self._copier: GrpcCopier | None = None
        self.data_port = settings.listen.port
        self.grpc_port = settings.listen.grpc_port
        """The gRPC listener's bound port once started; None without one."""
        self.admin_port = settings.admin.port

    @property
    def settings(self) -> Settings:
        """The settings in force (a reload replaces them)."""
        return self.data[CURRENT].settings

    async def start(self) -> None:
        data_runner = web.AppRunner(
            self.data,
            access_log=None,
            handle_signals=False,
            # Connections the fast lane hands over (or all, without it) idle out as its own do.
            keepalive_timeout=self.settings.proxy.idle_timeout_s,
        )
        await data_runner.setup()
        self._runners.append(data_runner)
        listen = self.settings.listen
        if FAST_LANE in self.data:
            # The fast lane listens; what it does not serve it hands to the data app's server.
            assert data_runner.server is not None
            self._fast = FastLaneServer(self.data[FAST_LANE], data_runner.server)
            self.data_port = await self._fast.start(
                listen.host, listen.port, reuse_port=self._reuse_port
            )
        else:
            site = web.TCPSite(
                data_runner, listen.host, listen.port, reuse_port=self._reuse_port or None
            )
            await site.start()
            self.data_port = _bound_port(site)
        if GRPC_UPSTREAM in self.data and listen.grpc_port is not None:
            await self._start_grpc(listen.host, listen.grpc_port)
        admin_runner = web.AppRunner(self.admin, access_log=None, handle_signals=False)
        await admin_runner.setup()
        self._runners.append(admin_runner)
        admin_site = web.TCPSite(
            admin_runner,
            self.settings.admin.host,
            self.settings.admin.port,
            reuse_port=self._reuse_port or None,
            ssl_context=admin_ssl_context(self.settings.admin),
        )
        await admin_site.start()
        self.admin_port = _bound_port(admin_site)

    async def _start_grpc(self, host: str, port: int) -> None:
        settings = self.settings
        self._copier = GrpcCopier(settings, self.data[MIRROR])
        canary = self.data.get(GRPC_CANARY)
        self._grpc = GrpcLiveServer(
            self.data[GRPC_UPSTREAM],
            max_bytes=settings.proxy.max_body_bytes,
            on_infer=self._copier,
            on_skip=self.data[MIRROR].note_skip,
            canary=canary,
        )
        if canary is not None or not settings.proxy.grpc_relay:
            self.grpc_port = await self._grpc.start(host, port, reuse_port=self._reuse_port)
            return
        # The relay listens; the grpc.aio listener, on a loopback port of its own, takes the
        # connections whose upstream cannot be relayed to (unreachable, not HTTP/2).
        handover = await self._grpc.start("127.0.0.1", 0)
        self._relay = GrpcRelay(
            settings.reference,
            handover_port=handover,
            max_bytes=settings.proxy.max_body_bytes,
            on_infer=self._copier,
            on_skip=self.data[MIRROR].note_skip,
            copying=self._copier.copying,
            max_connections=settings.proxy.max_connections,
        )
        self.grpc_port = await self._relay.start(host, port, reuse_port=self._reuse_port)

    async def reload(self, new: Settings) -> ReloadPlan:
        """Take on what ``new`` changes that a running proxy can (``reload``), no connection
        dropped; the plan says what was applied and what waits for a restart."""
        plan = plan_reload(self.settings, new)
        if not plan.applied:
            return plan
        logging.getLogger().setLevel(plan.settings.log_level)
        mirror = self.data[MIRROR]
        if plan.mirroring_changed and isinstance(mirror, MirrorLink):
            # The new mirror process first: by the time copies for a new candidate are built,
            # it is there to take them.
            await mirror.reload(_child_settings(self.data, plan.settings))
        # The live side builds copies for the new candidates once the new mirror process runs.
        self.data[LIVE_PROXY].reload(plan.settings)
        if FAST_LANE in self.data:
            self.data[FAST_LANE].reload(plan.settings)
        if self._copier is not None:
            self._copier.reload(plan.settings)
        if GRPC_CANARY in self.data:
            self.data[GRPC_CANARY].reload(plan.settings)
        self.data[COVERAGE].reload(plan.settings)
        self.data[CURRENT].settings = plan.settings
        return plan

    async def stop(self) -> None:
        # Both listeners stop accepting at once, then their calls in flight finish together.
        closing = []
        if self._fast is not None:
            closing.append(self._fast.close(self.settings.reference.timeout_s))
            self._fast = None
        if self._relay is not None:
            closing.append(self._relay.stop(self.settings.proxy.drain_timeout_s))
            self._relay = None
        if self._grpc is not None:
            closing.append(self._grpc.stop(self.settings.proxy.drain_timeout_s))
            self._grpc = None
        await asyncio.gather(*closing)
        while self._runners:
            await self._runners.pop().cleanup()

    @property
    def mirror(self) -> Mirror:
        return self.data[MIRROR]

    @property
    def telemetry(self) -> Telemetry:
        return self.data[TELEMETRY]

    @property
    def store(self) -> SampleStore:
        return self.data[STORE]

    @property
    def canary(self) -> CanaryController:
        return self.data[CANARY]

    async def drained(self, timeout_s: float = 60.0) -> bool:
        """Wait until no mirror is in flight (tests and the demo use this)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            snap = await self.mirror.progress()
            if snap["pending"] == 0 and not any(snap["in_flight"].values()):
                return True
            await asyncio.sleep(0.02)
        return False


def _bound_port(site: web.TCPSite) -> int:
    server = site._server  # aiohttp exposes no public accessor for the bound socket
    assert server is not None
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1])
