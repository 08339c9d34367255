"""Typed keys for what the aiohttp applications hold (one owner per resource)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import aiohttp
from aiohttp import web

from .buffer.embedded import EmbeddedRedis
from .buffer.store import SampleStore
from .canary.controller import CanaryController
from .canary.evidence import EvidenceBuffer
from .live.fast_lane import FastLane
from .live.forwarding import LiveProxy
from .live.grpc_canary import GrpcCanary
from .live.grpc_upstream import GrpcUpstream
from .reload import SettingsRef
from .settings import Settings
from .shadow.compare_stage import Comparer
from .shadow.coverage import CoverageMonitor
from .shadow.judge import LatestPopulation
from .shadow.mirror_api import Mirror
from .shadow.shadow_client import ShadowClient
from .telemetry import Telemetry

SETTINGS = web.AppKey("settings", Settings)
TELEMETRY = web.AppKey("telemetry", Telemetry)
EMBEDDED_REDIS = web.AppKey("embedded_redis", EmbeddedRedis)
STORE = web.AppKey("store", SampleStore)
EXECUTOR = web.AppKey("executor", ThreadPoolExecutor)
LIVE_SESSION = web.AppKey("live_session", aiohttp.ClientSession)
SHADOW_CLIENT = web.AppKey("shadow_client", ShadowClient)
COMPARER = web.AppKey("comparer", Comparer)
POPULATION = web.AppKey("population", LatestPopulation)
MIRROR = web.AppKey("mirror", Mirror)
LIVE_PROXY = web.AppKey("live_proxy", LiveProxy)
FAST_LANE = web.AppKey("fast_lane", FastLane)
DATA_APP = web.AppKey("data_app", web.Application)
EVIDENCE = web.AppKey("canary_evidence", EvidenceBuffer)
CANARY = web.AppKey("canary", CanaryController)
COVERAGE = web.AppKey("coverage", CoverageMonitor)
CURRENT = web.AppKey("current_settings", SettingsRef)
GRPC_UPSTREAM = web.AppKey("grpc_upstream", GrpcUpstream)
GRPC_CANARY = web.AppKey("grpc_canary", GrpcCanary)
