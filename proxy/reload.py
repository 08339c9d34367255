"""SIGHUP: which changed keys a running proxy takes on, and which wait for a restart.

Taken on at once, without dropping a connection: ``candidates`` (sampling included),
``comparisons``, ``noise``, ``redact`` (a new mirror process takes over the copies while the old
one drains: see ``MirrorLink.reload``), the admin plane's ``admin.token``, ``admin.users``,
and ``admin.session_ttl_s``, and ``log_level``. Everything else
(ports, TLS, the reference, Redis, ``proxy.*``, telemetry, the canary and the canary's own
candidate) needs a restart: a reload keeps the running value and names the key in the log.
With ``proxy.mirror_process: false`` the mirroring keys need a restart too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .settings import Settings

MIRRORING = ("candidates", "comparisons", "noise", "redact")
ADMIN_RELOADABLE = ("token", "users", "session_ttl_s")


@dataclass
class SettingsRef:
    """The settings a running proxy uses now: what reads it sees a reload at once (the apps'
    ``SETTINGS`` stay as they started)."""

    settings: Settings


@dataclass
class ReloadPlan:
    settings: Settings
    """What the proxy runs with after the reload."""
    applied: list[str] = field(default_factory=list)
    """Keys that changed and were taken on."""
    need_restart: list[str] = field(default_factory=list)
    """Keys that changed and keep their running value until a restart."""

    @property
    def mirroring_changed(self) -> bool:
        return any(key in MIRRORING for key in self.applied)


def _dump(value: Any) -> Any:
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def plan_reload(running: Settings, new: Settings) -> ReloadPlan:
    """Compare ``new`` (freshly loaded and valid) with the running settings."""
    update: dict[str, Any] = {}
    plan = ReloadPlan(running)
    for key in Settings.model_fields:
        old_value, new_value = getattr(running, key), getattr(new, key)
        if _dump(old_value) == _dump(new_value):
            continue
        if key == "admin":
            admin_update = {}
            for sub in running.admin.model_fields:
                if _dump(getattr(running.admin, sub)) == _dump(getattr(new.admin, sub)):
                    continue
                if sub in ADMIN_RELOADABLE:
                    admin_update[sub] = getattr(new.admin, sub)
                    plan.applied.append(f"admin.{sub}")
                else:
                    plan.need_restart.append(f"admin.{sub}")
            if admin_update:
                update["admin"] = running.admin.model_copy(update=admin_update)
        elif (key in MIRRORING and running.proxy.mirror_process) or key == "log_level":
            update[key] = new_value
            plan.applied.append(key)
        else:
            plan.need_restart.append(key)
    if "candidates" in update and running.canary is not None:
        update["candidates"] = _keep_canary_candidate(running, new, plan)
    plan.settings = running.model_copy(update=update)
    return plan


def _keep_canary_candidate(running: Settings, new: Settings, plan: ReloadPlan) -> list[Any]:
    """The canary's candidate stays as it runs: its rollout was judged against that entry."""
    assert running.canary is not None
    name = running.canary.candidate
    kept = running.candidate(name)
    others = [c for c in new.candidates if c.name != name]
    changed = not any(c.name == name and _dump(c) == _dump(kept) for c in new.candidates)
    if changed:
        plan.need_restart.append(f"candidates[{name}] (the canary's candidate)")
    return [kept, *others]
