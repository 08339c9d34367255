"""The canary controller: one per proxy process, all of them acting on one rollout in Redis.

Every ``canary.interval_s`` each replica reads the rollout (its weight is what this process's live
path uses), evaluates the gates on the step's evidence (summed by every replica), and proposes the
next state through a check-and-set: the first replica to propose wins, the others see the new
state on their next read. The live path only calls ``split`` and ``count``, which never await.
If Redis cannot be read for ``canary.stale_after_s``, this replica serves everything from the
reference until it can again: it never serves the candidate on a weight it cannot confirm. A
state it reads but cannot parse (corrupt, or written by another version) is no weight either:
it serves the reference at once, counts ``outcome="state_unreadable"`` and says why, and leaves
the key to ``shadowproxy canary restart``.

Fail-safe: a rollout whose state disappears from Redis (a flush, an eviction, a Redis restarted
without persistence) is never started again from its first step by a controller. The first replica
to notice writes a ``lost`` state in its place (weight 0: every replica serves the reference), the
decision log and ``shadowproxy_canary_decisions_total{outcome="state_lost"}`` say why, and only
``shadowproxy canary restart`` starts it again. A replica notices from what it saw itself (the
state it last read), or, when it has just started, from the decision log if that survived; one
that started afresh where nothing was left is overruled by any replica that knew the rollout.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation

from ..buffer.store import SampleStore
from ..errors import StoreError
from ..settings import Settings
from ..shadow.guards import stop_task
from ..telemetry import Telemetry
from . import gates as g
from .evidence import CanaryTag, EvidenceBuffer
from .state import (
    CanaryStore,
    Change,
    Decision,
    RolloutState,
    StateUnreadable,
    fingerprint,
    lost_state,
)

log = logging.getLogger("shadowproxy.canary")

_STATUS_VALUE = {"pass": 1, "skip": 1, "wait": 0, "fail": -1}


def has_twin(settings: Settings) -> bool:
    """Whether a noise-floor twin answers (some of) the requests the canary candidate does."""
    assert settings.canary is not None
    cand = settings.candidate(settings.canary.candidate)
    return any(
        c.noise_floor and (not c.models or not cand.models or set(c.models) & set(cand.models))
        for c in settings.candidates
    )


def decide(
    cur: RolloutState | None,
    seen: RolloutState,
    evaluation: g.Evaluation,
    settings: Settings,
    now: float,
) -> Change:
    """The controller's move after evaluating ``seen``; None when there is nothing to do or the
    rollout changed meanwhile (another replica or a person moved it: evaluate again next time)."""
    canary = settings.canary
    assert canary is not None
    if cur is None or (cur.attempt, cur.step, cur.status) != (seen.attempt, seen.step, seen.status):
        return None
    gates = [r.to_dict() for r in evaluation.gates]
    at = f"{cur.weight:g}%"
    if evaluation.status == "fail":
        why = f"gate failed at {at}: {evaluation.summary()}"
        return replace(cur, status="rolled_back", updated_at=now, reason=why), Decision(
            "rolled_back", why, gates=gates, measured_at=cur.weight
        )
    if cur.status != "running" or not canary.split:
        # Paused or awaiting approval (or an external controller moves the traffic): the gates
        # still guard it, nothing advances here.
        return None
    if evaluation.status == "pass":
        last = cur.step == len(cur.steps) - 1
        if last:
            why = f"every gate passed at {at}, the last step"
            return replace(cur, status="promoted", updated_at=now, reason=why), Decision(
                "promoted", why, gates=gates, measured_at=cur.weight
            )
        nxt = cur.step + 1
        weight = cur.steps[nxt]
        if weight in canary.approve_before and nxt not in cur.approved:
            why = (
                f"every gate passed at {at}; moving to {weight:g}% needs a person's approval "
                "(shadowproxy canary resume)"
            )
            new = replace(cur, status="awaiting_approval", updated_at=now, reason=why)
            return new, Decision("awaiting_approval", why, gates=gates, measured_at=cur.weight)
        why = f"every gate passed at {at}; now {weight:g}%"
        new = replace(
            cur, step=nxt, step_started_at=now, updated_at=now, reason=why, noted_wait=False
        )
        return new, Decision("advanced", why, gates=gates, measured_at=cur.weight)
    # Say once per step that it is stuck for want of evidence, once it has clearly overrun its
    # minimum time (a step that merely needs a few more seconds is not news).
    overrun = max(2 * canary.min_duration_s, canary.min_duration_s + 5 * canary.interval_s)
    if not cur.noted_wait and now - cur.step_started_at >= overrun:
        why = f"no verdict at {at} yet, neither advancing nor failing: {evaluation.summary()}"
        return replace(cur, noted_wait=True, updated_at=now, reason=why), Decision(
            "waiting", why, gates=gates
        )
    return None


class CanaryController:
    def __init__(
        self,
        settings: Settings,
        store: SampleStore,
        evidence: EvidenceBuffer,
        telemetry: Telemetry,
    ) -> None:
        assert settings.canary is not None
        self._settings = settings
        self.config = settings.canary
        self.candidate = settings.candidate(self.config.candidate)
        self.reference = settings.reference
        self.store = CanaryStore(store.redis, store.keys, self.config.rollout_id)
        self.evidence = evidence
        self._tel = telemetry
        self._state: RolloutState | None = None
        self._read_at = float("-inf")
        self._last_eval: g.Evaluation | None = None
        self._rng = random.Random()
        self._task: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._fingerprint = fingerprint(settings)
        self._warned_mismatch = False
        self._seen: RolloutState | None = None
        """The rollout as this process last read it (never forgotten, unlike ``_state``): its
        disappearance is a loss, not a rollout to start."""
        self._logged: dict[str, Any] | None = None
        """The newest decision in the log, read while this process has not seen the rollout."""
        self._unreadable: str | None = None
        """Why the stored state cannot be read, while it cannot: the reference serves here."""

    # ------------------------------------------------------------------ the live path

    @property
    def state(self) -> RolloutState | None:
        """The rollout as this replica last confirmed it; None when unknown or stale."""
        if time.monotonic() - self._read_at > self.config.stale_after_s:
            return None
        return self._state

    def split(self, headers: Mapping[str, str]) -> tuple[bool, CanaryTag | None]:
        """(the candidate answers this request?, the step whose evidence it feeds)."""
        state = self.state
        if state is None or not self._ours(state):
            return False, None
        tag = (state.rollout, state.attempt, state.step) if state.active else None
        weight = state.weight if self.config.split else 0.0
        if weight <= 0:
            return False, tag
        if weight >= 100:
            return True, tag
        key = headers.get(self.config.sticky_header) if self.config.sticky_header else None
        if key is not None:
            # Salted by the rollout: independent of shadow sampling, the same across replicas,
            # and monotone in the weight, so a user on the candidate stays there as it grows.
            digest = hashlib.blake2b(f"{state.rollout}\0{key}".encode(), digest_size=8).digest()
            u = int.from_bytes(digest, "big") / 2.0**64
        else:
            u = self._rng.random()
        return u * 100.0 < weight, tag

    def count(
        self,
        tag: CanaryTag | None,
        by_candidate: bool,
        status: int,
        seconds: float,
        *,
        fallback: bool = False,
    ) -> None:
        """Record who answered a live request, how fast, and whether it failed (a 5xx or no
        answer)."""
        side = self.candidate.name if by_candidate else self.reference.name
        self._tel.canary_served(self.config.rollout_id, side, fallback)
        if tag is None:
            return
        error = int(status >= 500)
        if by_candidate:
            counters = {g.SERVED_CAND: 1, g.CAND_CALLS: 1, g.CAND_ERRORS: error}
        else:
            counters = {g.SERVED_REF: 1, g.REF_CALLS: 1, g.REF_ERRORS: error}
        if fallback:
            counters = {g.CAND_CALLS: 1, g.CAND_ERRORS: 1, g.FALLBACKS: 1, **counters}
        elif status == 200:
            side = g.LIVE_LAT_CAND if by_candidate else g.LIVE_LAT_REF
            counters[g.latency_field(side, seconds)] = 1
        self.evidence.add(tag, counters)

    def _ours(self, state: RolloutState) -> bool:
        """Whether this proxy is configured for what the stored rollout rolls out. If not (its
        config changed under a running rollout, or replicas run two configs), it serves the
        reference and takes no decision, and says so once."""
        if state.fingerprint == self._fingerprint:
            self._warned_mismatch = False
            return True
        if not self._warned_mismatch:
            log.warning(
                "canary %s: the running rollout is of another configuration than this proxy's; "
                "serving the reference here (run `shadowproxy canary restart` to roll this one "
                "out)",
                state.rollout,
            )
            self._warned_mismatch = True
        return False

    # ------------------------------------------------------------------ the control loop

    async def start(self) -> None:
        # Nothing in Redis may keep the proxy from starting: until a rollout is read, the
        # reference serves.
        try:
            await self.tick()
        except StoreError as exc:
            log.warning("canary: cannot read the rollout yet (%s); serving the reference", exc)
        except Exception:
            log.exception("canary: the first evaluation failed; serving the reference")
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._loop())
        self._listener = loop.create_task(self._listen())

    async def close(self) -> None:
        self._closing = True
        await stop_task(self._listener)
        await stop_task(self._task)

    async def _listen(self) -> None:
        """Apply every change another replica (or a person) writes the moment it is announced,
        then evaluate at once: a rollback reaches this replica in milliseconds, not at its next
        interval. Without the subscription it still converges at its next read."""
        while not self._closing:
            try:
                async for state in self.store.changes():
                    if state.rollout != self.config.rollout_id:
                        continue
                    known = self._seen
                    if known is not None and state.identity == known.identity:
                        # The attempt this replica knows, moved on: apply it now. Anything else
                        # (a new or re-created attempt) goes through the evaluation's checks.
                        self._adopt(state, None)
                    self.poke()
            except StoreError as exc:
                log.debug("canary: change announcements unavailable: %s", exc)
            await asyncio.sleep(1.0)

    def poke(self) -> None:
        """Evaluate now rather than at the next interval (after a command)."""
        self._wake.set()

    async def _loop(self) -> None:
        # asyncio.timeout, not wait_for: in 3.11 wait_for can swallow a cancel that lands as its
        # inner wait completes, and close() would then wait on this loop forever (seen in tests).
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.interval_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.tick()
            except StoreError as exc:
                log.warning("canary: rollout not evaluated: %s", exc)
            except Exception:
                log.exception("canary: evaluation failed")

    def _start_if_new(self, cur: RolloutState | None) -> Change:
        """Start the rollout; or, when a finished one rolled out something else (a new build
        under the same id), a new attempt of it. A running rollout of something else is left to
        the proxies configured for it (and ``canary restart``). A rollout whose state was lost
        is halted instead (see the module's docstring)."""
        now = time.time()
        known = self._seen
        if cur is None:
            if known is not None:
                return lost_state(known, now)
            if self._logged is not None:
                return lost_state(self._from_log(self._logged, now), now)
            new = RolloutState.initial(self._settings, now)
            steps = ", ".join(f"{w:g}%" for w in new.steps)
            return new, Decision("started", f"rollout of {new.candidate} started: steps {steps}")
        if known is not None and _recreated(known, cur):
            return lost_state(known, now)
        if cur.fingerprint == self._fingerprint or cur.active:
            return None
        new = RolloutState.initial(self._settings, now, cur.attempt + 1)
        why = (
            f"the {cur.status.replace('_', ' ')} rollout was of another configuration "
            "(candidate, URL, models or steps changed): a new attempt from the first step"
        )
        return new, Decision("restarted", why)

    def _from_log(self, record: dict[str, Any], now: float) -> RolloutState:
        """The rollout as its newest decision describes it (the state itself is gone)."""
        start = RolloutState.initial(self._settings, now, int(record.get("attempt", 1)))
        step = min(max(int(record.get("step", 0)), 0), len(start.steps) - 1)
        status = str(record.get("status", "running"))
        return replace(start, step=step, status=status, started_at=0.0)  # type: ignore[arg-type]

    async def tick(self) -> None:
        """Read the rollout, evaluate its step, and move it if the gates say so."""
        if self._seen is None:
            # Until this process has seen the rollout, a surviving decision log is the witness
            # that a missing state was lost rather than never made.
            newest = await self.store.decisions(1)
            self._logged = newest[-1] if newest else None
        try:
            state, record = await self.store.update(self._start_if_new)
        except StateUnreadable as exc:
            self._adopt_unreadable(str(exc))
            return
        self._adopt(state, record)
        if state is None or not state.active or not self._ours(state):
            return
        await self.evidence.flush()  # this replica's own counts count too
        evidence = await self.store.evidence(state.attempt, state.step)
        now = time.time()
        evaluation = evaluate_step(self._settings, state, evidence, now)
        self._last_eval = evaluation
        new, record = await self.store.update(
            lambda cur: decide(cur, state, evaluation, self._settings, now)
        )
        self._adopt(new, record)

    def _adopt_unreadable(self, why: str) -> None:
        """The state key holds no rollout state: serve the reference now (not once the last
        weight read goes stale), say why once, and leave the key to a person: ``canary
        restart`` writes a new state over it."""
        self._state = None
        self._last_eval = None
        if self._unreadable is None:
            self._tel.canary_decision(self.config.rollout_id, "state_unreadable")
            log.warning(
                "canary %s: %s; serving the reference until `shadowproxy canary restart`",
                self.config.rollout_id,
                why,
            )
        self._unreadable = why

    def _adopt(self, state: RolloutState | None, record: dict[str, Any] | None) -> None:
        self._unreadable = None
        if state is not None and self._state is not None:
            moved = (state.attempt, state.step) != (self._state.attempt, self._state.step)
            if moved or not state.active:
                self._last_eval = None
        newly_lost = self._seen is None or self._seen.status != "lost"
        if state is not None and state.status == "lost" and newly_lost:
            log.warning("canary %s: %s", state.rollout, state.reason)
        if state is not None:
            self._seen = state
        self._state = state
        self._read_at = time.monotonic()
        if record is not None:
            self._tel.canary_decision(record["rollout"], record["outcome"])
            log.info(
                "canary %s: %s at step %d (%g%%): %s",
                record["rollout"],
                record["outcome"],
                record["step"] + 1,
                record["weight"],
                record["reason"],
            )

    async def status(self, decisions: int = 50) -> dict[str, Any]:
        """The rollout, the current step's gates (measured values and thresholds), and the log."""
        out = await describe(self._settings, self.store, decisions)
        out["serving_weight_here"] = self._serving_weight()
        return out

    def _serving_weight(self) -> float:
        """The weight this replica serves: 0 while its view is stale or unreadable, or when the
        rollout is of another configuration than its own."""
        state = self.state
        return state.weight if state is not None and self._ours(state) else 0.0

    def brief(self) -> dict[str, Any]:
        """For ``/api/summary``: the rollout as this replica last read it, and whether it was
        lost (then this replica serves the reference until ``canary restart``)."""
        seen = self._seen
        return {
            "rollout": self.config.rollout_id,
            "status": seen.status if seen is not None else None,
            "state_lost": seen is not None and seen.status == "lost",
            "state_unreadable": self._unreadable is not None,
            "reason": self._unreadable or (seen.reason if seen is not None else ""),
            "serving_weight_here": self._serving_weight(),
        }

    def observe_gauges(self, options: CallbackOptions) -> Iterator[Observation]:
        """OpenTelemetry callback: the weight, the step and each gate's value and threshold."""
        attrs = {"rollout": self.config.rollout_id, "candidate": self.candidate.name}
        state = self.state
        yield Observation(self._serving_weight(), {**attrs, "stat": "weight"})
        lost = self._seen is not None and self._seen.status == "lost"
        yield Observation(int(lost), {**attrs, "stat": "state_lost"})
        if state is not None:
            yield Observation(state.step + 1, {**attrs, "stat": "step"})
        for r in self._last_eval.gates if self._last_eval else []:
            gate = {**attrs, "gate": r.gate}
            yield Observation(_STATUS_VALUE[r.status], {**gate, "stat": "gate_status"})
            if r.value is not None:
                yield Observation(r.value, {**gate, "stat": "gate_value"})
            if r.threshold is not None:
                yield Observation(r.threshold, {**gate, "stat": "gate_threshold"})


def _recreated(known: RolloutState, cur: RolloutState) -> bool:
    """Whether ``cur`` is an attempt a controller began afresh without knowing ``known`` (the
    state was lost and a replica that never saw it started the rollout again). A controller's
    new attempt always numbers above the one it replaced, and a person's restart is legitimate
    whatever its number."""
    return (
        cur.status != "lost"
        and cur.origin == "controller"
        and cur.identity != known.identity
        and cur.attempt <= known.attempt
    )


def evidence_view(evidence: Mapping[str, int]) -> dict[str, Any]:
    """The counters, and the latency histograms as quantiles rather than buckets."""
    plain: dict[str, Any] = {k: v for k, v in evidence.items() if ":" not in k}
    for side in (g.LAT_REF, g.LAT_CAND, g.LIVE_LAT_REF, g.LIVE_LAT_CAND):
        for q in (0.5, 0.99):
            value, samples = g.latency_quantile(evidence, side, q)
            plain[f"{side}_p{round(q * 100)}_ms"] = None if value is None else round(value, 3)
        plain[f"{side}_samples"] = samples
    return plain


async def describe(settings: Settings, store: CanaryStore, decisions: int = 50) -> dict[str, Any]:
    """The rollout as Redis has it, its current step's gates evaluated now, and the log (the
    admin API and the CLI show the same)."""
    canary = settings.canary
    assert canary is not None
    state = await store.read()
    out: dict[str, Any] = {
        "rollout": canary.rollout_id,
        "candidate": canary.candidate,
        "reference": settings.reference.name,
        "state": state.view() if state is not None else None,
        "evaluation": None,
        "evidence": None,
        "decisions": await store.decisions(decisions),
    }
    if state is not None:
        evidence = await store.evidence(state.attempt, state.step)
        out["evidence"] = evidence_view(evidence)
        out["evaluation"] = evaluate_step(settings, state, evidence, time.time()).to_dict()
    return out


def evaluate_step(
    settings: Settings, state: RolloutState, evidence: Mapping[str, int], now: float
) -> g.Evaluation:
    canary = settings.canary
    assert canary is not None
    return g.evaluate(
        evidence,
        canary.gates,
        min_samples=canary.min_samples,
        elapsed_s=now - state.step_started_at,
        min_duration_s=canary.min_duration_s,
        has_twin=has_twin(settings),
        weight=state.weight,
    )
