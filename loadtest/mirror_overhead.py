"""Mirror overhead: does a slow or dead candidate hurt live latency?

``python -m loadtest.mirror_overhead [--rate 300] [--duration 20] [--warmup 3] [--out DIR]``

The requirement it checks: with a candidate that answers after 200 ms, or refuses connections,
live p99 at 300 requests/s stays within 1.5x of the p99 without mirroring.

Scenarios, each against a fresh ``python -m proxy serve`` in front of the same fake V2 backend
(``loadtest/fake_backend.py``, its own process):

- ``direct``: the load generator straight to the backend, no proxy (the floor, for context);
- ``baseline``: through the proxy with no candidate (no mirroring);
- ``slow-candidate``: one candidate that answers after 200 ms, every request mirrored;
- ``dead-candidate``: one candidate on a loopback port where nothing listens;
- ``fast-candidate`` (only on request): a candidate that answers at once, which separates the
  cost of comparing and storing every copy from the cost of a candidate being slow.

The load is open-loop: request ``i`` is due at ``t0 + i / rate`` whatever happened before, and
its latency is measured from that due time (no coordinated omission: a stalled generator or proxy
shows up as latency). The warmup seconds are discarded. Percentiles are over the answers with
status 200; everything else is counted as an error. Results go to stdout and, as markdown and
JSON, to ``DIR/mirror_overhead.md`` and ``DIR/mirror_overhead.json``; each server's log is kept
in ``DIR/logs/``. Exit status: 0 when every check passes, 1 when one fails, 2 on a setup error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import yaml

from .procs import (
    ROOT,
    Processes,
    SetupError,
    free_port,
    memory_mb,
    snapshot,
    start_backend,
    wait_http_ok,
)

MODEL = "loadtest"
REQUEST_BODY = json.dumps(
    {
        "inputs": [
            {
                "name": "INPUT0",
                "datatype": "FP32",
                "shape": [1, 8],
                "data": [0.5, -1.0, 2.0, 0.25, 1.5, -0.75, 3.0, 0.0],
            }
        ]
    },
    separators=(",", ":"),
).encode()
REQUEST_HEADERS = {"Content-Type": "application/json"}
SLOW_DELAY_MS = 200.0
P99_LIMIT = 1.5
CHECKED = ("slow-candidate", "dead-candidate")
SCENARIOS = ("direct", "baseline", "slow-candidate", "dead-candidate")
EXTRA_SCENARIOS = ("fast-candidate",)
THREAD_SUFFIX = "-loop"
"""Marks a thread's CPU entry (already counted in its process's)."""
OTHER_LOAD_WARN = 15.0
"""CPU % (100 = one core) used by foreign processes above which the report warns."""
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
# Outcomes worth a column of their own; any other outcome seen is listed too.
KEY_OUTCOMES = ("compared", "unavailable", "dropped_queue_age")
_METRIC_LINE = re.compile(r"^(\w+?)(?:_total)?\{([^}]*)\}\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass
class LoadResult:
    rate: float
    duration_s: float
    measured: int
    latency_ms: np.ndarray[Any, np.dtype[np.float64]]
    """From each request's due time to its answer, status 200 only (measured window)."""
    service_ms: np.ndarray[Any, np.dtype[np.float64]]
    """From the actual send to the answer (what a closed-loop tool would report)."""
    send_lag_ms: np.ndarray[Any, np.dtype[np.float64]]
    """How late the generator sent each request: its own contribution to ``latency_ms``."""
    errors: Counter[str]
    """Failed requests of the measured window, by HTTP status or exception."""
    warmup_errors: Counter[str]
    """The same for the discarded warmup (shown, never part of a check)."""
    cpu_percent: dict[str, float]
    host_cpu_percent: float | None
    """Busy share of all cores, whoever used them."""
    other_cpu_percent: float | None
    """CPU used by processes outside this benchmark (100 = one core): other load on the host."""


async def generate_load(
    session: aiohttp.ClientSession,
    url: str,
    rate: float,
    warmup_s: float,
    duration_s: float,
    pids: dict[str, int | str],
    drain_s: float = 15.0,
) -> LoadResult:
    """Send ``rate`` requests/s for warmup + duration seconds; measure the last ``duration``."""
    n_warm = round(rate * warmup_s)
    n_total = n_warm + round(rate * duration_s)
    due = np.empty(n_total)
    sent = np.full(n_total, np.nan)
    done = np.full(n_total, np.nan)
    status = np.zeros(n_total, dtype=np.int32)
    failures: dict[int, str] = {}

    async def one(i: int) -> None:
        sent[i] = time.perf_counter()
        try:
            async with session.post(url, data=REQUEST_BODY, headers=REQUEST_HEADERS) as resp:
                await resp.read()
                status[i] = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            failures[i] = type(exc).__name__
        done[i] = time.perf_counter()

    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []
    start = end = snapshot(pids)
    t0 = time.perf_counter() + 0.05
    for i in range(n_total):
        due[i] = t0 + i / rate
        delay = due[i] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if i == n_warm:
            start = snapshot(pids)
        tasks.append(loop.create_task(one(i)))
    end = snapshot(pids)
    _, pending = await asyncio.wait(tasks, timeout=drain_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)

    window = slice(n_warm, n_total)
    ok = status[window] == 200
    errors: Counter[str] = Counter()
    warmup_errors: Counter[str] = Counter()
    for i in range(n_total):
        tally = errors if i >= n_warm else warmup_errors
        if i in failures:
            tally[failures[i]] += 1
        elif np.isnan(done[i]):
            tally["unfinished"] += 1
        elif status[i] != 200:
            tally[f"HTTP {status[i]}"] += 1
    elapsed = end.at - start.at
    cpu: dict[str, float] = {}
    for key, before in start.cpu.items():
        after = end.cpu.get(key)
        if before is not None and after is not None and elapsed > 0:
            cpu[key] = 100.0 * (after - before) / elapsed
    host = other = None
    if start.host and end.host and end.host[1] > start.host[1] and elapsed > 0:
        busy = end.host[0] - start.host[0]
        host = 100.0 * busy / (end.host[1] - start.host[1])
        ours = sum(v for k, v in cpu.items() if not k.endswith(THREAD_SUFFIX))
        other = max(0.0, 100.0 * busy / os.sysconf("SC_CLK_TCK") / elapsed - ours)
    return LoadResult(
        rate=rate,
        duration_s=duration_s,
        measured=n_total - n_warm,
        latency_ms=(done[window][ok] - due[window][ok]) * 1000,
        service_ms=(done[window][ok] - sent[window][ok]) * 1000,
        send_lag_ms=(sent[window] - due[window])[~np.isnan(sent[window])] * 1000,
        errors=errors,
        warmup_errors=warmup_errors,
        cpu_percent=cpu,
        host_cpu_percent=host,
        other_cpu_percent=other,
    )


# ----------------------------------------------------------------------------------------------
# Proxy scenarios.


@dataclass
class ScenarioResult:
    name: str
    load: LoadResult
    mirror: dict[str, int] = field(default_factory=dict)
    """Mirror outcomes (and ``skipped:REASON``) from the proxy's ``/metrics``."""
    stored: dict[str, int] = field(default_factory=dict)
    """Verdict writes to Redis by result (``stored`` / ``store_failed``)."""
    live_requests: dict[str, int] = field(default_factory=dict)
    """Live requests by status class, from the proxy's ``/metrics``."""
    backend_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    """Requests each fake server received during the scenario, by route."""
    proxy_memory_mb: tuple[float, float, float] | None = None
    """Proxy resident memory before the measured window, after it, and its peak."""


def percentiles(values: np.ndarray[Any, np.dtype[np.float64]]) -> dict[str, float]:
    if values.size == 0:
        return {}
    figures = np.percentile(values, PERCENTILES)
    out = {f"p{p:g}": float(v) for p, v in zip(PERCENTILES, figures, strict=True)}
    out["max"] = float(values.max())
    return out


def proxy_config(
    data_port: int,
    admin_port: int,
    token: str,
    reference: str,
    state_dir: Path,
    candidate: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": data_port},
        "admin": {"host": "127.0.0.1", "port": admin_port, "token": token},
        "reference": {"name": "reference", "url": reference},
        "candidates": [candidate] if candidate else [],
        "buffer": {"state_dir": str(state_dir)},
        "proxy": {"drain_timeout_s": 2.0},
        "log_level": "INFO",
    }


def parse_metrics(text: str) -> dict[str, Any]:
    """The counters this benchmark reads from Prometheus text, keyed by a label summary.

    ``mirror`` sums the copies' outcomes over candidates (the live process's refusals, which
    name no candidate, as ``dropped_REASON``); ``by_candidate`` has each candidate's own.
    """
    out: dict[str, Any] = {"mirror": {}, "requests": {}, "stored": {}, "by_candidate": {}}
    for line in text.splitlines():
        m = _METRIC_LINE.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), dict(_LABEL.findall(m.group(2))), m.group(3)
        count = int(float(value))
        if name == "shadowproxy_mirror_outcomes":
            outcome = labels.get("outcome", "?")
            out["mirror"][outcome] = out["mirror"].get(outcome, 0) + count
            mine = out["by_candidate"].setdefault(labels.get("candidate", "?"), {})
            mine[outcome] = count
        elif name == "shadowproxy_mirror_skipped" and labels.get("candidate", "*") != "*":
            key = f"skipped:{labels.get('reason', '?')}"
            out["mirror"][key] = out["mirror"].get(key, 0) + count
        elif name == "shadowproxy_mirror_link_dropped":
            # Copies the live process dropped before the worker saw them (pacing, worker down).
            # Per candidate since the shadow side was rebuilt: sum them, as outcomes are summed.
            key = f"dropped_{labels.get('reason', '?')}"
            out["mirror"][key] = out["mirror"].get(key, 0) + count
        elif name == "shadowproxy_samples_stored":
            out["stored"][labels.get("result", "?")] = count
        elif name == "shadowproxy_requests":
            key = f"{labels.get('route', '?')} {labels.get('status_class', '?')}"
            out["requests"][key] = count
    return out


async def scrape(session: aiohttp.ClientSession, admin: str, token: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    async with session.get(f"{admin}/metrics", headers=headers) as resp:
        resp.raise_for_status()
        return parse_metrics(await resp.text())


async def settled_metrics(
    session: aiohttp.ClientSession, admin: str, token: str, expected: int, timeout_s: float
) -> dict[str, Any]:
    """Scrape until every offered copy has an outcome (or the time is up)."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = await scrape(session, admin, token)
        if sum(metrics["mirror"].values()) >= expected or time.monotonic() > deadline:
            return metrics
        await asyncio.sleep(0.25)


async def backend_counts(session: aiohttp.ClientSession, url: str) -> dict[str, int]:
    async with session.get(f"{url}/loadtest/stats") as resp:
        return {str(k): int(v) for k, v in (await resp.json()).items()}


def _diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


@dataclass
class Bench:
    args: argparse.Namespace
    procs: Processes
    session: aiohttp.ClientSession
    """For the load: one session, a large connection pool."""
    control: aiohttp.ClientSession
    """For health checks, scrapes and stats."""
    work_dir: Path
    backend: str = ""
    backend_pid: int = 0
    servers: dict[str, str] = field(default_factory=dict)

    async def load(self, url: str, pids: dict[str, int | str]) -> LoadResult:
        pids = {"loadgen": os.getpid(), "backend": self.backend_pid, **pids}
        a = self.args
        return await generate_load(
            self.session, url, a.rate, a.warmup, a.duration, pids, drain_s=a.request_timeout + 1
        )

    async def direct(self, name: str) -> ScenarioResult:
        load = await self.load(f"{self.backend}/v2/models/{MODEL}/infer", {})
        return ScenarioResult(name, load)

    async def proxied(self, name: str, candidate: dict[str, Any] | None) -> ScenarioResult:
        token = secrets.token_urlsafe(16)
        data_port, admin_port = free_port(), free_port()
        scenario_dir = self.work_dir / name.replace("#", "-")
        scenario_dir.mkdir(parents=True)
        config = scenario_dir / "config.yaml"
        cfg = proxy_config(
            data_port, admin_port, token, self.backend, scenario_dir / "state", candidate
        )
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        data, admin = f"http://127.0.0.1:{data_port}", f"http://127.0.0.1:{admin_port}"
        log_name = f"proxy-{name.replace('#', '-')}"
        proc = self.procs.start(
            log_name, [sys.executable, "-m", "proxy", "serve", "--config", str(config)]
        )
        try:
            await wait_http_ok(
                self.control,
                [f"{admin}/healthz", f"{data}/v2/health/ready"],
                proc,
                self.procs.log_dir / f"{log_name}.log",
            )
            # The event loop runs on the main thread ("proxy-loop"); the proxy's children (its
            # embedded Redis and its mirror worker) are named by what they run.
            pids: dict[str, int | str] = {
                "proxy": proc.pid,
                f"proxy{THREAD_SUFFIX}": f"{proc.pid}/task/{proc.pid}",
            }
            for pid in self.procs.adopt_children(proc):
                pids[child_name(pid, pids)] = pid
            before = {k: await backend_counts(self.control, u) for k, u in self.servers.items()}
            mem_before = memory_mb(proc.pid)
            load = await self.load(f"{data}/v2/models/{MODEL}/infer", pids)
            mem_after = memory_mb(proc.pid)
            expected = round(self.args.rate * (self.args.warmup + self.args.duration))
            metrics = await settled_metrics(
                self.control, admin, token, expected if candidate else 0, timeout_s=6.0
            )
            after = {k: await backend_counts(self.control, u) for k, u in self.servers.items()}
        finally:
            self.procs.stop(proc)
        memory = None
        if mem_before and mem_after:
            memory = (mem_before[0], mem_after[0], mem_after[1])
        return ScenarioResult(
            name,
            load,
            metrics["mirror"],
            metrics["stored"],
            metrics["requests"],
            {k: _diff(after[k], before[k]) for k in after},
            memory,
        )

    async def run(self, name: str) -> ScenarioResult:
        kind = name.split("#")[0]
        if kind == "direct":
            return await self.direct(name)
        if kind == "baseline":
            return await self.proxied(name, None)
        candidate: dict[str, Any] = {
            "name": kind.removesuffix("-candidate"),
            "sample_rate": 1.0,
            "timeout_s": 5.0,
            "max_in_flight": 128,
        }
        if kind in ("slow-candidate", "fast-candidate"):
            candidate["url"] = self.servers[kind.removesuffix("-candidate")]
        else:
            candidate["url"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        return await self.proxied(name, candidate)


# ----------------------------------------------------------------------------------------------
# Report.


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _errors(c: Counter[str]) -> str:
    return str(sum(c.values())) + (
        " (" + ", ".join(f"{k}: {v}" for k, v in c.most_common()) + ")" if c else ""
    )


def baseline_p99(results: Sequence[ScenarioResult]) -> float | None:
    for r in results:
        if r.name == "baseline":
            return percentiles(r.load.latency_ms).get("p99")
    return None


def main_table(results: Sequence[ScenarioResult]) -> tuple[list[str], list[list[str]]]:
    base = baseline_p99(results)
    header = [
        "scenario",
        "ok/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "errors",
        "p99 / baseline",
    ]
    rows = []
    for r in results:
        p = percentiles(r.load.latency_ms)
        ratio = f"{p['p99'] / base:.2f}x" if base and "p99" in p else "-"
        rows.append(
            [
                r.name,
                f"{r.load.latency_ms.size / r.load.duration_s:.1f}",
                *(_ms(p.get(k)) for k in ("p50", "p90", "p99", "p99.9", "max")),
                _errors(r.load.errors)
                + (f"; warmup: {_errors(r.load.warmup_errors)}" if r.load.warmup_errors else ""),
                ratio,
            ]
        )
    return header, rows


def child_name(pid: int, taken: Mapping[str, object]) -> str:
    """A readable label for one of the proxy's child processes."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        cmdline = b""
    base = (
        "mirror-worker"
        if b"mirror_worker" in cmdline
        else "redis"
        if b"redis" in cmdline
        else "child"
    )
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}{n}"
    return name


def detail_table(results: Sequence[ScenarioResult]) -> tuple[list[str], list[list[str]]]:
    header = [
        "scenario",
        "send lag p99/max ms",
        "service p50/p99 ms",
        "CPU % (100 = 1 core; proxy-loop: its event-loop thread)",
        "proxy CPU ms/req",
        "host busy %",
        "other procs CPU %",
        "proxy RSS MiB (start/end/peak)",
    ]
    rows = []
    for r in results:
        lag, svc = percentiles(r.load.send_lag_ms), percentiles(r.load.service_ms)
        cpu = " ".join(f"{k} {v:.0f}" for k, v in r.load.cpu_percent.items())
        host, other = r.load.host_cpu_percent, r.load.other_cpu_percent
        proxy_cpu = r.load.cpu_percent.get("proxy")
        per_req = "-" if proxy_cpu is None else f"{proxy_cpu * 10 / r.load.rate:.2f}"
        mem = "/".join(f"{v:.0f}" for v in r.proxy_memory_mb) if r.proxy_memory_mb else "-"
        rows.append(
            [
                r.name,
                f"{_ms(lag.get('p99'))} / {_ms(lag.get('max'))}",
                f"{_ms(svc.get('p50'))} / {_ms(svc.get('p99'))}",
                cpu,
                per_req,
                "-" if host is None else f"{host:.0f}",
                "-" if other is None else f"{other:.0f}",
                mem,
            ]
        )
    return header, rows


def mirror_table(results: Sequence[ScenarioResult]) -> tuple[list[str], list[list[str]]]:
    header = [
        "scenario",
        *KEY_OUTCOMES,
        "other outcomes",
        "verdict writes",
        "live requests (proxy)",
        "candidate received",
    ]
    rows = []
    for r in results:
        if not r.name.split("#")[0].endswith("-candidate"):
            continue
        other = ", ".join(f"{k}={v}" for k, v in sorted(r.mirror.items()) if k not in KEY_OUTCOMES)
        live = ", ".join(f"{k}={v}" for k, v in sorted(r.live_requests.items()))
        server = r.name.split("-")[0]
        got = r.backend_counts[server].get("infer", 0) if server in r.backend_counts else "-"
        stored = ", ".join(f"{k}={v}" for k, v in sorted(r.stored.items()))
        rows.append(
            [
                r.name,
                *(str(r.mirror.get(k, 0)) for k in KEY_OUTCOMES),
                other or "-",
                stored or "-",
                live,
                str(got),
            ]
        )
    return header, rows


def checks(results: Sequence[ScenarioResult]) -> list[tuple[bool, str]]:
    base = baseline_p99(results)
    out = []
    for r in results:
        if r.name not in CHECKED:
            continue
        p99 = percentiles(r.load.latency_ms).get("p99")
        if base is None or p99 is None:
            out.append((False, f"{r.name}: no baseline p99 to compare with"))
            continue
        ratio = p99 / base
        errs = sum(r.load.errors.values())
        ok = ratio <= P99_LIMIT and errs == 0
        out.append(
            (
                ok,
                f"{'PASS' if ok else 'FAIL'} {r.name}: live p99 {p99:.2f} ms = {ratio:.2f}x "
                f"baseline {base:.2f} ms (limit {P99_LIMIT}x), live errors {errs}",
            )
        )
    return out


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(c.replace("|", "/") for c in line) + " |" for line in lines)


def git_revision() -> str:
    """The checked-out commit, marked ``+dirty`` when proxy/ has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "proxy"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def environment() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = found.group(1) if found else cpu
    return (
        f"proxy at commit {git_revision()}; "
        f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
        f"aiohttp {aiohttp.__version__}, loopback only; everything (load generator, proxy, "
        f"embedded Redis, fake servers) shares these cores"
    )


def render(
    results: Sequence[ScenarioResult], args: argparse.Namespace, env: str, markdown: bool
) -> str:
    table = md_table if markdown else text_table
    verdicts = checks(results)
    lines = [line for _, line in verdicts] or ["(no checked scenario ran)"]
    intro = (
        f"rate {args.rate:g} req/s open-loop, {args.duration:g} s measured after "
        f"{args.warmup:g} s warmup; slow candidate answers after {SLOW_DELAY_MS:.0f} ms; "
        f"latency from each request's due time, status 200 only"
    )
    busy = {r.name: r.load.other_cpu_percent or 0.0 for r in results}
    if any(v > OTHER_LOAD_WARN for v in busy.values()):
        worst = ", ".join(f"{k} {v:.0f}%" for k, v in busy.items())
        lines.append(
            f"WARNING: processes outside this benchmark used CPU during the runs ({worst}; "
            "100% = one core): the host was not quiet, so these figures are contaminated."
        )
    head: list[str] = []
    if markdown:
        command = " ".join(["python -m loadtest.mirror_overhead", *sys.argv[1:]])
        head = [
            "# Mirror overhead",
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}; {env}.",
            f"`{command}`",
        ]
        lines = [f"- **{line}**" for line in lines]
    parts = [
        *head,
        intro,
        table(*main_table(results)),
        "\n".join(lines),
        "Mirror outcomes (proxy /metrics, warmup included):",
        table(*mirror_table(results)),
        "Generator and resources over the measured window:",
        table(*detail_table(results)),
    ]
    return "\n\n".join(parts) + "\n"


def to_json(
    results: Sequence[ScenarioResult], args: argparse.Namespace, env: str
) -> dict[str, Any]:
    return {
        "rate": args.rate,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "environment": env,
        "checks": [{"passed": ok, "line": line} for ok, line in checks(results)],
        "scenarios": [
            {
                "name": r.name,
                "latency_ms": percentiles(r.load.latency_ms),
                "service_ms": percentiles(r.load.service_ms),
                "send_lag_ms": percentiles(r.load.send_lag_ms),
                "measured": r.load.measured,
                "ok": int(r.load.latency_ms.size),
                "errors": dict(r.load.errors),
                "warmup_errors": dict(r.load.warmup_errors),
                "cpu_percent": r.load.cpu_percent,
                "host_cpu_percent": r.load.host_cpu_percent,
                "other_cpu_percent": r.load.other_cpu_percent,
                "proxy_memory_mb": r.proxy_memory_mb,
                "mirror": r.mirror,
                "stored": r.stored,
                "live_requests": r.live_requests,
                "backend_counts": r.backend_counts,
            }
            for r in results
        ],
    }


# ----------------------------------------------------------------------------------------------
# Entry point.


def scenario_names(spec: str) -> list[str]:
    names, seen = [], Counter[str]()
    for raw in spec.split(","):
        name = raw.strip()
        if name not in SCENARIOS + EXTRA_SCENARIOS:
            known = ", ".join(SCENARIOS + EXTRA_SCENARIOS)
            raise SystemExit(f"unknown scenario {name!r}; choose from {known}")
        seen[name] += 1
        names.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return names


async def run_all(
    args: argparse.Namespace, procs: Processes, say: Callable[[str], None]
) -> list[ScenarioResult]:
    names = scenario_names(args.scenarios)
    # Ctrl-C or SIGTERM cancels the run; main() then stops every server. A signal that was
    # ignored when we started (nohup, a background job) stays ignored.
    loop, main_task = asyncio.get_running_loop(), asyncio.current_task()
    assert main_task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            loop.add_signal_handler(sig, main_task.cancel)
    connector = aiohttp.TCPConnector(limit=4096, force_close=False)
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as control,
    ):
        with tempfile.TemporaryDirectory(prefix="shadowproxy-loadtest-") as tmp:
            bench = Bench(args, procs, session, control, Path(tmp))
            backend_proc, bench.backend = await start_backend(procs, control, "backend")
            bench.backend_pid = backend_proc.pid
            bench.servers["backend"] = bench.backend
            for kind, delay_ms in (("slow", SLOW_DELAY_MS), ("fast", 0.0)):
                if any(n.startswith(f"{kind}-candidate") for n in names):
                    _, url = await start_backend(procs, control, f"{kind}-candidate", delay_ms)
                    bench.servers[kind] = url
            results = []
            for name in names:
                say(f"[{time.strftime('%H:%M:%S')}] {name}: {args.warmup + args.duration:g} s")
                results.append(await bench.run(name))
            return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.mirror_overhead",
        description="Live latency through shadowproxy with a slow or dead candidate.",
    )
    parser.add_argument("--rate", type=float, default=300.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="discarded seconds first")
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest" / "out")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, run in order, repeats allowed; also: {','.join(EXTRA_SCENARIOS)}",
    )
    parser.add_argument("--request-timeout", type=float, default=10.0, help="per request, s")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rate <= 0 or args.duration <= 0 or args.warmup < 0:
        raise SystemExit("--rate and --duration must be positive, --warmup not negative")
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    procs = Processes(args.out / "logs")
    env = environment()  # the commit as the run starts: the tree may change while it runs
    loop_factory = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            results = runner.run(run_all(args, procs, lambda s: print(s, flush=True)))
    except SetupError as exc:
        print(f"mirror_overhead: setup failed: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("mirror_overhead: interrupted", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
    print()
    print(render(results, args, env, markdown=False))
    (args.out / "mirror_overhead.md").write_text(render(results, args, env, markdown=True))
    report = json.dumps(to_json(results, args, env), indent=2)
    (args.out / "mirror_overhead.json").write_text(report)
    print(f"written: {args.out / 'mirror_overhead.md'}, {args.out / 'mirror_overhead.json'}")
    return 0 if all(ok for ok, _ in checks(results)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
