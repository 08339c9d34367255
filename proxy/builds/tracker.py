"""Which build answered: the fingerprint of each (upstream, model), probed off the live path and
cached, recorded in the ledger the first time and whenever it changes.

A comparison asks ``build_of`` for both sides. The answer is cached for ``REFRESH_S``; it is
probed again sooner when the answer names another model version than the cached build (a new
version loaded and answering). One probe per (upstream, model) at a time; a probe whose server
did not answer its metadata route keeps the build known before (a server restarting is not a
new build).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from ..errors import StoreError
from ..settings import CandidateSettings, UpstreamSettings
from .fingerprint import build_id, probe
from .ledger import BuildLedger

log = logging.getLogger("shadowproxy.builds")

REFRESH_S = 60.0
# A probe whose ledger write failed is tried again this soon.
RETRY_S = 5.0


@dataclass(slots=True)
class _Known:
    build: str
    version: str | None
    expires: float
    recorded: bool


class BuildTracker:
    """One per compare process; owns no session (its owner's)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        ledger: BuildLedger | None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._ledger = ledger
        self._clock = clock
        self._known: dict[tuple[str, str], _Known] = {}
        self._probing: dict[tuple[str, str], asyncio.Task[str]] = {}

    async def build_of(
        self,
        upstream: UpstreamSettings,
        role: str,
        model: str,
        version: str | None,
        *,
        openai: bool = False,
    ) -> str:
        """The build id of what ``upstream`` serves ``model`` with (``version``: the one that
        answered, when the answer said)."""
        key = (upstream.name, model)
        known = self._known.get(key)
        fresh = known is not None and self._clock() < known.expires
        if known is not None and fresh and (not version or version == known.version):
            return known.build
        task = self._probing.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._probe(upstream, role, model, version, openai)
            )
            self._probing[key] = task
            task.add_done_callback(lambda _: self._probing.pop(key, None))
        return await asyncio.shield(task)

    async def _probe(
        self, upstream: UpstreamSettings, role: str, model: str, version: str | None, openai: bool
    ) -> str:
        key = (upstream.name, model)
        cand = upstream if isinstance(upstream, CandidateSettings) else None
        facts = await probe(
            self._session,
            upstream=upstream.name,
            url=upstream.url,
            model=model,
            served=cand.served_name(model) if cand else model,
            version=version or None,
            hardware=upstream.hardware,
            metrics_url=upstream.metrics_url,
            model_map=cand.model_map if cand else {},
            openai=openai,
        )
        known = self._known.get(key)
        if facts.get("server") is None and known is not None:
            # Its metadata did not answer (restarting?): the build known before still serves.
            known.expires = self._clock() + RETRY_S
            return known.build
        bid = build_id(facts)
        recorded = False
        if self._ledger is not None:
            try:
                await self._ledger.record(bid, facts, role)
                recorded = True
            except StoreError as exc:
                log.warning("build %s of %s not recorded yet: %s", bid, upstream.name, exc)
        ttl = REFRESH_S if recorded or self._ledger is None else RETRY_S
        self._known[key] = _Known(
            bid, facts.get("version") or version, self._clock() + ttl, recorded
        )
        return bid

    async def close(self) -> None:
        for task in list(self._probing.values()):
            task.cancel()
        await asyncio.gather(*self._probing.values(), return_exceptions=True)
