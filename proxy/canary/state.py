"""The rollout in Redis: its state, its decision log and each step's evidence.

Several proxy processes (and the CLI) act on one rollout, so every change is a check-and-set:
``CanaryStore.update`` WATCHes the state key, computes the next state from what it read, and
writes it in a MULTI with the decision that explains it; a concurrent writer makes it retry on
the new state. Nothing here runs on the live path.

A rollout's keys (state, decisions, evidence) share its hash tag (``keys``), so on a Redis
Cluster the check-and-set and an evidence batch each stay in one slot.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, get_args

import redis.asyncio as aioredis
from redis.exceptions import RedisError, WatchError

from ..buffer.connect import RedisClient
from ..buffer.keys import CANARY_DECISIONS_MAX, CANARY_EVIDENCE_TTL_S, KeySchema
from ..buffer.store import wait_running
from ..errors import CanaryError, StoreError
from ..settings import Settings

log = logging.getLogger("shadowproxy.canary")

Status = Literal[
    "running", "paused", "awaiting_approval", "promoted", "rolled_back", "aborted", "lost"
]
ACTIVE: frozenset[str] = frozenset({"running", "paused", "awaiting_approval"})
ACTIONS = ("pause", "resume", "abort", "promote", "restart")
_CAS_RETRIES = 8


@dataclass(frozen=True, slots=True)
class RolloutState:
    rollout: str
    candidate: str
    steps: tuple[float, ...]
    status: Status
    step: int
    attempt: int
    step_started_at: float
    updated_at: float
    reason: str = ""
    approved: tuple[int, ...] = ()
    """Steps a person has approved moving to (``approve_before``)."""
    noted_wait: bool = False
    """The decision log already says this step is waiting for data (said once per step)."""
    fingerprint: str = ""
    """What was rolled out (candidate, where, which models, the steps): a proxy configured for
    something else does not act on this rollout."""
    started_at: float = 0.0
    """When this attempt began: with ``attempt``, tells an attempt from one re-created under the
    same number after the state was lost."""
    origin: str = "controller"
    """Who began this attempt: a controller (first start, a new build) or a person (restart)."""

    @property
    def weight(self) -> float:
        """Percent of eligible live requests the candidate answers now."""
        if self.status == "promoted":
            return 100.0
        if self.status in ("rolled_back", "aborted", "lost"):
            return 0.0
        return self.steps[self.step]

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> RolloutState:
        """The state as stored; ``StateUnreadable`` when it is not one (corrupt, written by
        hand or by another version): no weight can be read from it."""
        try:
            data = json.loads(raw)
            data["steps"] = tuple(float(w) for w in data["steps"])
            data["approved"] = tuple(data.get("approved", ()))
            state = cls(**data)
            if state.status not in get_args(Status) or not 0 <= state.step < len(state.steps):
                raise ValueError(f"status {state.status!r} at step {state.step!r}")
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise StateUnreadable(f"the rollout's state in Redis is unreadable ({exc!r})") from exc
        return state

    @property
    def identity(self) -> tuple[int, float]:
        """Which attempt this is: the same number re-created later is another attempt."""
        return self.attempt, self.started_at

    @classmethod
    def initial(
        cls, settings: Settings, now: float, attempt: int = 1, origin: str = "controller"
    ) -> RolloutState:
        canary = settings.canary
        assert canary is not None
        return cls(
            rollout=canary.rollout_id,
            candidate=canary.candidate,
            steps=tuple(canary.steps),
            status="running",
            step=0,
            attempt=attempt,
            step_started_at=now,
            updated_at=now,
            fingerprint=fingerprint(settings),
            started_at=now,
            origin=origin,
        )

    def view(self) -> dict[str, Any]:
        """What the API and CLI show."""
        data = asdict(self)
        data.pop("noted_wait")
        data.pop("fingerprint")
        data.pop("started_at")
        data["weight"] = self.weight
        data["step_number"] = f"{self.step + 1}/{len(self.steps)}"
        return data


@dataclass(slots=True)
class Decision:
    outcome: str
    reason: str
    by: str = "controller"
    gates: list[dict[str, Any]] = field(default_factory=list)
    measured_at: float | None = None
    """The weight the gates were measured at, when the decision changed it."""

    def record(self, state: RolloutState) -> dict[str, Any]:
        return {
            "ts": state.updated_at,
            "rollout": state.rollout,
            "attempt": state.attempt,
            "step": state.step,
            "weight": state.weight,
            "measured_at_weight": self.measured_at,
            "status": state.status,
            "outcome": self.outcome,
            "reason": self.reason,
            "by": self.by,
            "gates": self.gates,
        }


class StateUnreadable(StoreError):
    """The rollout's state key holds something that is not a rollout state."""


class EvidenceLost(StoreError):
    """An evidence write whose outcome is unknown: dropped, not retried (never counted twice)."""


Change = tuple[RolloutState, Decision] | None
"""What an update function returns: the new state and why, or None to leave it as it is."""


def fingerprint(settings: Settings) -> str:
    """A digest of what a rollout rolls out: the candidate, where it is, the models it serves
    and under which names, and the steps (not the gates: those may be tuned in flight)."""
    canary = settings.canary
    assert canary is not None
    cand = settings.candidate(canary.candidate)
    what = [cand.name, cand.url, sorted(cand.model_map.items()), sorted(cand.models), canary.steps]
    return hashlib.blake2b(json.dumps(what).encode(), digest_size=8).hexdigest()


def lost_state(last: RolloutState, now: float) -> tuple[RolloutState, Decision]:
    """What a controller writes where the rollout it knew is missing (or was re-created by a
    controller that did not know it): a halted rollout that serves the reference until a person
    restarts it. Never a fresh start, which would replay steps nobody approved again."""
    why = (
        f"the rollout's state disappeared from Redis (flushed, evicted, or Redis restarted "
        f"without persistence) while it was {last.status.replace('_', ' ')} at step "
        f"{last.step + 1} ({last.weight:g}%) of attempt {last.attempt}; serving the reference "
        "until `shadowproxy canary restart`"
    )
    new = replace(last, status="lost", updated_at=now, reason=why, noted_wait=False)
    return new, Decision("state_lost", why)


def apply_action(
    state: RolloutState | None,
    action: str,
    settings: Settings,
    by: str,
    reason: str,
    last_attempt: int = 0,
) -> tuple[RolloutState, Decision]:
    """A person's command (pause, resume, abort, promote, restart) applied to the rollout.

    ``last_attempt``: the highest attempt the decision log knows, so a restart with the state
    gone does not reuse an attempt number (and its evidence, if that survived)."""
    now = time.time()
    why = reason or f"{action} by {by}"
    assert settings.canary is not None
    if action == "restart":
        attempt = max(state.attempt if state is not None else 0, last_attempt) + 1
        new = RolloutState.initial(settings, now, attempt, origin=by)
        return new, Decision("restarted", why, by)
    if state is None:
        raise CanaryError(f"rollout {settings.canary.rollout_id!r} has not started yet")
    if not state.active:
        raise CanaryError(
            f"rollout {state.rollout!r} is {state.status}; only `restart` starts it again"
        )
    if action == "pause":
        if state.status == "paused":
            raise CanaryError(f"rollout {state.rollout!r} is already paused")
        new = replace(state, status="paused", updated_at=now, reason=why)
        return new, Decision("paused", why, by)
    if action == "resume":
        if state.status == "running":
            raise CanaryError(f"rollout {state.rollout!r} is not paused or awaiting approval")
        if state.status == "awaiting_approval":
            nxt = state.step + 1
            new = replace(
                state,
                status="running",
                step=nxt,
                step_started_at=now,
                updated_at=now,
                reason=why,
                approved=(*state.approved, nxt),
                noted_wait=False,
            )
            return new, Decision("approved", why, by)
        return replace(state, status="running", updated_at=now, reason=why), Decision(
            "resumed", why, by
        )
    if action == "abort":
        return replace(state, status="aborted", updated_at=now, reason=why), Decision(
            "aborted", why, by
        )
    if action == "promote":
        return replace(state, status="promoted", updated_at=now, reason=why), Decision(
            "promoted", why, by
        )
    raise CanaryError(f"unknown action {action!r}; use one of {', '.join(ACTIONS)}")


class CanaryStore:
    """One rollout's keys, over a client someone else owns (the sample store's pool)."""

    def __init__(
        self, client: RedisClient, keys: KeySchema, rollout: str, timeout_s: float = 2.0
    ) -> None:
        self._r = client
        self._keys = keys
        self.rollout = rollout
        self._timeout = timeout_s

    async def _guard(self, coro: Any) -> Any:
        # redis-py types its commands as sync-or-async; on the asyncio client they are awaitable.
        try:
            return await asyncio.wait_for(coro, self._timeout)
        except TimeoutError as exc:
            raise StoreError("redis did not answer in time") from exc
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis failed: {exc}") from exc

    async def read(self) -> RolloutState | None:
        raw = await self._guard(self._r.get(self._keys.canary(self.rollout)))
        return None if raw is None else RolloutState.from_json(raw)

    async def update(
        self, change: Callable[[RolloutState | None], Change], *, overwrite_unreadable: bool = False
    ) -> tuple[RolloutState | None, dict[str, Any] | None]:
        """Check-and-set: (the state now, the decision recorded or None).

        An unreadable state raises ``StateUnreadable``, unless ``overwrite_unreadable`` (a
        person's restart): then ``change`` sees None, as if the state were gone."""
        coro = self._update(change, overwrite_unreadable)
        return await self._guard(coro)  # type: ignore[no-any-return]

    async def _update(
        self, change: Callable[[RolloutState | None], Change], overwrite_unreadable: bool
    ) -> tuple[RolloutState | None, dict[str, Any] | None]:
        key = self._keys.canary(self.rollout)
        log_key = self._keys.canary_decisions(self.rollout)
        for _ in range(_CAS_RETRIES):
            async with self._r.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    try:
                        current = None if raw is None else RolloutState.from_json(raw)
                    except StateUnreadable:
                        if not overwrite_unreadable:
                            raise
                        current = None
                    result = change(current)
                    if result is None:
                        await pipe.unwatch()  # type: ignore[no-untyped-call]
                        return current, None
                    new, decision = result
                    record = decision.record(new)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.set(key, new.to_json())
                    pipe.lpush(log_key, json.dumps(record))
                    pipe.ltrim(log_key, 0, CANARY_DECISIONS_MAX - 1)
                    await pipe.execute()
                    await self._announce(new)
                    return new, record
                except WatchError:
                    continue
        raise StoreError(f"rollout {self.rollout!r} kept changing under us; try again")

    async def _announce(self, state: RolloutState) -> None:
        """Tell every replica now (they apply it within a moment). A replica that misses it
        still converges at its next read, so a failed publish is only logged."""
        channel = self._keys.canary_channel(self.rollout)
        try:
            # PUBLISH by name: a cluster forwards it to every node's subscribers.
            await self._r.execute_command("PUBLISH", channel, state.to_json())
        except (RedisError, OSError) as exc:
            log.warning(
                "canary %s: change not announced (replicas read it at their next evaluation): %s",
                self.rollout,
                exc,
            )

    async def changes(self) -> AsyncIterator[RolloutState]:
        """The states other writers announce, as they come (until cancelled); raises
        ``StoreError`` when the subscription breaks."""
        if not isinstance(self._r, aioredis.Redis):
            # redis-py's asyncio Cluster client has no pub/sub: replicas read at each interval.
            raise StoreError("canary changes are not announced to a Redis Cluster client")
        try:
            pubsub = self._r.pubsub()
            async with pubsub:
                await pubsub.subscribe(self._keys.canary_channel(self.rollout))
                while True:
                    # An explicit timeout: listen() would wait under the connection's socket
                    # timeout (seconds, in the live process), fail, and drop the subscription.
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is None or message.get("type") != "message":
                        continue
                    try:
                        yield RolloutState.from_json(message["data"])
                    except StateUnreadable:
                        continue  # not a state: the next read decides
        except (RedisError, OSError) as exc:
            raise StoreError(f"canary changes not received: {exc}") from exc

    async def decisions(self, limit: int = 100) -> list[dict[str, Any]]:
        """The decision log, oldest first (the newest ``limit``)."""
        if limit <= 0:
            return []
        raw = await self._guard(
            self._r.lrange(self._keys.canary_decisions(self.rollout), 0, limit - 1)
        )
        return [json.loads(x) for x in reversed(raw)]

    async def last_attempt(self) -> int:
        """The attempt of the newest decision logged (0 when the log is empty or gone)."""
        newest = await self.decisions(1)
        return int(newest[-1].get("attempt", 0)) if newest else 0

    async def command(
        self, action: str, settings: Settings, by: str, reason: str
    ) -> tuple[RolloutState | None, dict[str, Any] | None]:
        """A person's command, by check-and-set (what the admin API and the CLI both run)."""
        restart = action == "restart"
        floor = await self.last_attempt() if restart else 0
        return await self.update(
            lambda cur: apply_action(cur, action, settings, by, reason, floor),
            overwrite_unreadable=restart,  # the way out of an unreadable state
        )

    async def evidence(self, attempt: int, step: int) -> dict[str, int]:
        key = self._keys.canary_evidence(self.rollout, attempt, step)
        raw = await self._guard(self._r.hgetall(key))
        return {k.decode(): int(v) for k, v in raw.items()}


async def add_evidence(
    client: RedisClient,
    keys: KeySchema,
    batch: Mapping[tuple[str, int, int], Mapping[str, int]],
    timeout_s: float,
) -> None:
    """Add counters to steps' evidence hashes in one round trip, all or nothing (MULTI/EXEC).
    On a Redis Cluster the batch must hold one rollout's steps (one hash tag).

    Raises ``EvidenceLost`` when Redis may have applied the batch but did not say so (a timeout:
    retrying could count it twice), ``StoreError`` when it certainly did not (try again)."""
    try:
        async with client.pipeline(transaction=True) as pipe:
            for (rollout, attempt, step), counters in batch.items():
                key = keys.canary_evidence(rollout, attempt, step)
                for name, n in counters.items():
                    pipe.hincrby(key, name, n)
                pipe.expire(key, CANARY_EVIDENCE_TTL_S)
            # Counting only time this process could run: evidence is also written by the
            # compare workers, at idle CPU priority.
            await wait_running(pipe.execute(), timeout_s)
    except TimeoutError as exc:
        raise EvidenceLost("redis did not answer in time; the batch may or may not be in") from exc
    except (RedisError, OSError) as exc:
        raise StoreError(f"redis failed: {exc}") from exc
