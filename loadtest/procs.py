"""Servers as child processes, and what they cost: ports, start/stop, CPU and memory from /proc.

Shared by the load tests (``mirror_overhead``, ``bench``) and the ``serve --workers`` test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import aiohttp

ROOT = Path(__file__).resolve().parent.parent


class SetupError(Exception):
    """A server did not start or answer; the message says which and where its log is."""


# ----------------------------------------------------------------------------------------------
# Processes: every server is a child in its own session, stopped by pid on the way out.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_stat(target: int | str) -> list[str] | None:
    """Fields of ``/proc/TARGET/stat`` after the command name (index 0 is the state).

    ``TARGET`` is a pid, or ``PID/task/TID`` for one thread.
    """
    try:
        raw = Path(f"/proc/{target}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """Child processes of ``pid`` and theirs (Linux ``/proc``; empty elsewhere)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _proc_stat(int(entry.name))
        if fields is not None:
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found.extend(kids)
        todo.extend(kids)
    return found


def cpu_seconds(target: int | str) -> float | None:
    """CPU time (user + system) of a process, or of one thread given as ``PID/task/TID``."""
    fields = _proc_stat(target)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_and_start(pid: int) -> tuple[float, int] | None:
    """(CPU seconds, start time in clock ticks since boot) of a process, or None if it is gone.

    The start time tells a process from a later one that reuses its pid.
    """
    fields = _proc_stat(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[19])


def is_redis(pid: int) -> bool:
    """Whether ``pid`` runs a Redis server (the proxy's embedded one is its child, not its work)."""
    try:
        return b"redis" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def memory_mb(pid: int) -> tuple[float, float] | None:
    """(resident now, peak resident) in MiB."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.MULTILINE))
    if len(values) < 2:
        return None
    return int(values["VmRSS"]) / 1024, int(values["VmHWM"]) / 1024


def host_cpu() -> tuple[int, int] | None:
    """(busy, total) jiffies over all cores since boot."""
    try:
        line = Path("/proc/stat").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    ticks = [int(v) for v in line.split()[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return sum(ticks) - idle, sum(ticks)


class Processes:
    """The servers this benchmark started; ``stop_all`` ends each by its pid."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._procs: dict[int, tuple[subprocess.Popen[bytes], IO[bytes], list[int]]] = {}

    def start(
        self, name: str, args: Sequence[str], cwd: Path = ROOT, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            list(args),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._procs[proc.pid] = (proc, log, [])
        return proc

    def adopt_children(self, proc: subprocess.Popen[bytes]) -> list[int]:
        """Remember the children ``proc`` started (the embedded Redis), to end them if it dies."""
        kids = descendants(proc.pid)
        self._procs[proc.pid][2][:] = kids
        return kids

    def stop(self, proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
        entry = self._procs.pop(proc.pid, None)
        if entry is None:
            return
        _, log, kids = entry
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in kids:  # normally stopped by their parent already
            if _proc_stat(pid) is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        log.close()

    def stop_all(self) -> None:
        for proc, _, _ in list(self._procs.values())[::-1]:
            self.stop(proc, timeout_s=10.0)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def wait_http_ok(
    session: aiohttp.ClientSession,
    urls: Sequence[str],
    proc: subprocess.Popen[bytes],
    log: Path,
    timeout_s: float = 45.0,
) -> None:
    """Poll until every URL answers 200; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    pending = list(urls)
    while pending:
        if proc.poll() is not None:
            raise SetupError(f"{log.stem} exited with {proc.returncode}:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            raise SetupError(f"{log.stem}: no answer from {pending[0]} in {timeout_s:.0f}s")
        try:
            async with session.get(pending[0], timeout=aiohttp.ClientTimeout(total=1)) as r:
                if r.status == 200:
                    pending.pop(0)
                    continue
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.1)


async def start_backend(
    procs: Processes, session: aiohttp.ClientSession, name: str, delay_ms: float = 0.0
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    args = [sys.executable, "-m", "loadtest.fake_backend", "--port", str(port)]
    if delay_ms:
        args += ["--delay-ms", str(delay_ms)]
    proc = procs.start(name, args)
    url = f"http://127.0.0.1:{port}"
    await wait_http_ok(session, [f"{url}/v2/health/ready"], proc, procs.log_dir / f"{name}.log")
    return proc, url


# CPU snapshots: what each process (and the whole host) used between two moments.


@dataclass
class Snapshot:
    at: float
    cpu: dict[str, float | None]
    host: tuple[int, int] | None


def snapshot(pids: dict[str, int | str]) -> Snapshot:
    return Snapshot(time.perf_counter(), {k: cpu_seconds(p) for k, p in pids.items()}, host_cpu())
