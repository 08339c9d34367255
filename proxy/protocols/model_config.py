"""What the reference says about a model's config, cached: is it stateful or decoupled? Then it
is never mirrored."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp

_CONFIG_RETRY_S = 60.0


class ModelConfigs:
    def __init__(self, session: aiohttp.ClientSession, reference_url: str) -> None:
        self._session = session
        self._reference_url = reference_url
        # model -> (stateful, retry-after monotonic time, or None when known for good)
        self._stateful: dict[str, tuple[bool, float | None]] = {}
        self._lookups: dict[str, asyncio.Task[bool]] = {}
        self._decoupled: set[str] = set()

    def why_unsafe(self, model: str) -> str:
        """Why a model found stateful is never mirrored, by name: a decoupled model answers a
        request with any number of messages (its answers cannot be paired), a sequence model
        keeps state across requests (a copy would corrupt the candidate's)."""
        return "decoupled_model" if model in self._decoupled else "sequence_model"

    def peek(self, model: str) -> bool | None:
        """What is known now, without waiting: True/False, or None (unknown; a lookup starts in
        the background, so the live path never waits on it)."""
        if model in self._lookups:
            return None
        cached = self._stateful.get(model)
        if cached is not None and (cached[1] is None or cached[1] > time.monotonic()):
            return cached[0]  # known, or (no config route) assumed until the retry time
        task = asyncio.get_running_loop().create_task(self.is_stateful(model))
        self._lookups[model] = task
        task.add_done_callback(lambda _: self._lookups.pop(model, None))
        return None

    async def close(self) -> None:
        for task in list(self._lookups.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def is_stateful(self, model: str) -> bool:
        """Whether the reference's config for ``model`` uses sequence batching.

        Cached per model; a server without a config route (or a failed lookup) is remembered for
        ``_CONFIG_RETRY_S`` too, so mirroring never costs an extra round trip per request.
        Requests that carry sequence ids are caught from their parameters regardless.
        """
        now = time.monotonic()
        cached = self._stateful.get(model)
        if cached is not None and (cached[1] is None or cached[1] > now):
            return cached[0]
        url = f"{self._reference_url}/v2/models/{model}/config"
        stateful = False
        self._stateful[model] = (False, now + _CONFIG_RETRY_S)
        try:
            timeout = aiohttp.ClientTimeout(total=2.0)
            async with self._session.get(url, timeout=timeout) as resp:
                if resp.status == 200:
                    config = await resp.json(content_type=None)
                    if not isinstance(config, dict):
                        # A JSON list, a string: no model config, so it says nothing about
                        # state; unreadable, like invalid JSON.
                        raise ValueError(f"the config of {model!r} is not a JSON object")
                    policy = config.get("model_transaction_policy") or {}
                    if not isinstance(policy, dict):
                        raise ValueError(f"the transaction policy of {model!r} is no object")
                    decoupled = bool(policy.get("decoupled"))
                    stateful = bool(config.get("sequence_batching")) or decoupled
                    self._stateful[model] = (stateful, None)
                    if decoupled:
                        self._decoupled.add(model)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            pass  # remembered as unknown until the retry time above
        return stateful
