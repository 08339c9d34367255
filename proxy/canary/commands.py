"""``shadowproxy canary status|pause|resume|abort|promote|restart``: the rollout from a terminal.

Commands act on Redis directly (the same check-and-set as the admin API), so they work with any
number of proxies running, or none; each proxy applies the change at its next evaluation.
"""

from __future__ import annotations

import argparse
import getpass
import json
import time
from pathlib import Path
from typing import Any

from ..buffer.store import SampleStore
from ..errors import ConfigError
from ..settings import Settings
from .controller import describe
from .state import ACTIONS, CanaryStore


def add_parser(sub: Any) -> None:
    canary = sub.add_parser("canary", help="see and steer the canary rollout")
    csub = canary.add_subparsers(dest="canary_command", required=True, metavar="ACTION")
    status = csub.add_parser("status", help="the rollout, its gates and the decision log")
    status.add_argument("--decisions", type=int, default=20, help="log entries to show")
    status.add_argument("--json", action="store_true", help="JSON for scripts")
    status.add_argument("--config", required=True, type=Path, metavar="FILE")
    helps = {
        "pause": "hold the rollout at its step (gates still roll it back)",
        "resume": "go on after a pause, or approve the next step",
        "abort": "send every request to the reference and stop the rollout",
        "promote": "send every eligible request to the candidate now",
        "restart": "start the rollout again from its first step (a new attempt)",
    }
    for action in ACTIONS:
        p = csub.add_parser(action, help=helps[action])
        p.add_argument("--reason", default="", help="why (kept in the decision log)")
        p.add_argument("--json", action="store_true")
        p.add_argument("--config", required=True, type=Path, metavar="FILE")


async def run(args: argparse.Namespace, settings: Settings, store: SampleStore) -> int:
    if settings.canary is None:
        raise ConfigError(f"{args.config}: canary: no canary is configured in this file")
    canary = CanaryStore(store.redis, store.keys, settings.canary.rollout_id)
    if args.canary_command == "status":
        snap = await describe(settings, canary, args.decisions)
        print(json.dumps(snap, indent=2) if args.json else render_status(snap))
        return 0
    by = f"cli:{getpass.getuser()}"
    state, record = await canary.command(args.canary_command, settings, by, args.reason)
    if args.json:
        print(json.dumps({"state": state.view() if state else None, "decision": record}))
    elif record is not None:
        print(render_decision(record))
    return 0


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_decision(d: dict[str, Any]) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(d["ts"]))
    at = d.get("measured_at_weight")
    moved = f"{at:g}% -> " if at is not None and at != d["weight"] else ""
    step = f"step {d['step'] + 1} ({moved}{d['weight']:g}%)"
    return f"{when}  {d['outcome']:<17} {step:<20} {d['reason']}  [{d['by']}]"


def render_gates(gates: list[dict[str, Any]], indent: str = "  ") -> list[str]:
    lines = []
    for gate in gates:
        lines.append(
            f"{indent}{gate['status']:<5} {gate['gate']:<16} value {_fmt(gate['value']):<10} "
            f"threshold {_fmt(gate['threshold']):<10} {gate['detail']}"
        )
    return lines


def render_status(snap: dict[str, Any]) -> str:
    state = snap["state"]
    lines = [f"rollout {snap['rollout']}: {snap['candidate']} replacing {snap['reference']}"]
    if state is None:
        lines.append("  not started (a proxy with this config starts it)")
        return "\n".join(lines)
    steps = ", ".join(f"{w:g}%" for w in state["steps"])
    lines += [
        f"  status   {state['status']} (attempt {state['attempt']})",
        f"  step     {state['step_number']} at {state['weight']:g}% of eligible requests"
        f" (steps: {steps})",
        f"  reason   {state['reason'] or '-'}",
    ]
    if snap["evaluation"] is not None:
        lines.append(f"gates now: {snap['evaluation']['status']}")
        lines += render_gates(snap["evaluation"]["gates"])
    if snap["decisions"]:
        lines.append("decisions:")
        lines += ["  " + render_decision(d) for d in snap["decisions"]]
    return "\n".join(lines)
