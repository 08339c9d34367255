"""The builds ledger in Redis: every build seen, when, and what it replaced.

``record`` is one Lua script on the ledger's slot: it adds the build if it is new, bumps its
``last_seen``, and when the (upstream, model) it serves now differs from what was recorded
(a first answer, a new version loaded, a config change) appends a timeline event. Every
replica and worker calls it; the script makes the event appear once however many saw the
change. Keys are in ``proxy/buffer/keys.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from redis.exceptions import RedisError

from ..buffer.connect import RedisClient
from ..buffer.keys import BUILD_EVENTS_MAX, BUILD_REPLAYS_MAX, KeySchema
from ..buffer.store import wait_running
from ..errors import StoreError

RECORD_TIMEOUT_S = 5.0

_RECORD = """
local builds, current, events, build = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, slot, now, facts = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local upstream, model, role, max_events = ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[8])
local serving = ARGV[9] == '1'
local new = redis.call('ZADD', builds, 'NX', now, id) == 1
if new then
  redis.call('HSET', build, 'facts', facts, 'upstream', upstream, 'model', model,
             'role', role, 'first_seen', now)
end
redis.call('HSET', build, 'last_seen', now)
if not serving then return 0 end
local previous = redis.call('HGET', current, slot)
if previous == id then return 0 end
redis.call('HSET', current, slot, id)
local event = cjson.encode({ts = tonumber(now), upstream = upstream, model = model,
                            build = id, previous = previous or cjson.null})
redis.call('LPUSH', events, event)
redis.call('LTRIM', events, 0, max_events - 1)
return 1
"""


def _text(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


class BuildLedger:
    """Reads and writes the ledger; shares its owner's Redis client."""

    def __init__(self, client: RedisClient, keys: KeySchema) -> None:
        self._r = client
        self._keys = keys
        self._record = client.register_script(_RECORD)  # type: ignore[misc]

    async def record(
        self,
        build_id: str,
        facts: Mapping[str, Any],
        role: str,
        now: float | None = None,
        *,
        serving: bool = True,
    ) -> bool:
        """Record that ``build_id`` serves its (upstream, model) now; True when that is a change
        (a new timeline event). ``serving=False``: only add the build if it is new (a replay
        against an explicitly chosen version says nothing about what serves live traffic)."""
        k = self._keys
        upstream, model = str(facts.get("upstream", "")), str(facts.get("model", ""))
        try:
            # Bounded: every comparison waits on its builds, so a Redis that stops answering
            # must cost a retry later, not the compare stage.
            changed = await wait_running(
                self._record(
                    keys=[k.builds, k.builds_current, k.builds_events, k.build(build_id)],
                    args=[
                        build_id,
                        f"{upstream}|{model}",
                        repr(time.time() if now is None else now),
                        json.dumps(facts, sort_keys=True),
                        upstream,
                        model,
                        role,
                        BUILD_EVENTS_MAX,
                        "1" if serving else "0",
                    ],
                ),
                RECORD_TIMEOUT_S,
            )
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreError(f"build {build_id} not recorded: {exc}") from exc
        return bool(changed)

    async def add_replay(self, build_id: str, run: Mapping[str, Any]) -> None:
        key = self._keys.build_replays(build_id)
        try:
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.lpush(key, json.dumps(run, sort_keys=True))
                pipe.ltrim(key, 0, BUILD_REPLAYS_MAX - 1)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"replay run not recorded: {exc}") from exc

    async def builds(self) -> list[dict[str, Any]]:
        """Every build, oldest first: id, upstream, model, role, first/last seen, facts."""
        try:
            ids = [_text(i) for i in await self._r.zrange(self._keys.builds, 0, -1)]
            async with self._r.pipeline(transaction=False) as pipe:
                for bid in ids:
                    pipe.hgetall(self._keys.build(bid))
                rows = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"builds unreadable: {exc}") from exc
        return [_build(bid, raw) for bid, raw in zip(ids, rows, strict=True) if raw]

    async def get(self, build_id: str) -> dict[str, Any] | None:
        try:
            raw = await self._r.hgetall(self._keys.build(build_id))  # type: ignore[misc]
        except (RedisError, OSError) as exc:
            raise StoreError(f"build unreadable: {exc}") from exc
        return _build(build_id, raw) if raw else None

    async def resolve(self, prefix: str) -> str:
        """The one build id starting with ``prefix``; ``StoreError`` naming why not."""
        ids = [str(b["id"]) for b in await self.builds() if str(b["id"]).startswith(prefix)]
        if len(ids) != 1:
            what = "is ambiguous" if ids else "matches no build"
            raise StoreError(f"build id {prefix!r} {what}")
        return ids[0]

    async def events(self, limit: int = 1000) -> list[dict[str, Any]]:
        try:
            raw = await self._r.lrange(self._keys.builds_events, 0, limit - 1)  # type: ignore[misc]
        except (RedisError, OSError) as exc:
            raise StoreError(f"build timeline unreadable: {exc}") from exc
        return [json.loads(e) for e in raw]

    async def current(self) -> dict[str, str]:
        """``upstream|model`` -> the build serving it now."""
        try:
            raw = await self._r.hgetall(self._keys.builds_current)  # type: ignore[misc]
        except (RedisError, OSError) as exc:
            raise StoreError(f"builds unreadable: {exc}") from exc
        return {_text(k): _text(v) for k, v in raw.items()}

    async def replays(self, build_id: str) -> list[dict[str, Any]]:
        try:
            raw = await self._r.lrange(self._keys.build_replays(build_id), 0, -1)  # type: ignore[misc]
        except (RedisError, OSError) as exc:
            raise StoreError(f"replay runs unreadable: {exc}") from exc
        return [json.loads(r) for r in raw]


def _build(build_id: str, raw: Mapping[Any, Any]) -> dict[str, Any]:
    h = {_text(k): _text(v) for k, v in raw.items()}
    return {
        "id": build_id,
        "upstream": h.get("upstream", ""),
        "model": h.get("model", ""),
        "role": h.get("role", ""),
        "first_seen": float(h.get("first_seen", 0)),
        "last_seen": float(h.get("last_seen", 0)),
        "facts": json.loads(h.get("facts", "{}")),
    }
