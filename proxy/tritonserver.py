"""Launch a real Triton server from the `nvidia-pytriton` wheel, Python backend on the CPU.

Used by `shadowproxy demo` and the test suite. What it takes to make the wheel's `tritonserver`
serve a plain model repository (see DESIGN.md, "Running real Triton on these machines"):

- a backend directory holding `python/` (libtriton_python.so + utils) and the stub built for the
  running Python's major.minor, copied into a work dir;
- `LD_LIBRARY_PATH` holding the wheel's `nvidia_pytriton.libs`;
- `SHADOWPROXY_SITE_PACKAGES`: the stub embeds the system libpython and never sees the venv, so
  each model.py puts this path first on `sys.path` itself.

A stub that crashes leaves its model answering 500 "Stub process ... is not healthy" forever;
`wait_ready` and `check_models` turn that into a plain error naming the model.

Blocking (subprocess + urllib) on purpose: this runs at startup, never on an event loop.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .server_process import LOG_TAIL_LINES, ServerProcess

_STOP_GRACE_S = 15.0
_POLL_S = 0.5
# Triton's own line for a model whose load failed, with the reason (Python traceback included).
_LOAD_FAILED = re.compile(r"failed to load '([^']+)' version \d+: (.*?)\"?$", re.MULTILINE)
_STUB_NAME = "triton_python_backend_stub"


class TritonError(Exception):
    """Base of every error this module raises."""


class TritonNotInstalled(TritonError):
    """The `nvidia-pytriton` wheel (which ships the tritonserver binary) is missing or broken."""


class TritonStartError(TritonError):
    """The server or one of its models did not become ready."""


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    python_backend: Path
    stub: Path
    libs: Path


def find_tritonserver() -> TritonInstall:
    """Locate the binary, Python backend, stub and libraries inside the installed `pytriton`."""
    hint = "install it with `pip install nvidia-pytriton` (or run `make demo`, which does)"
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotInstalled(f"the nvidia-pytriton package is not installed; {hint}")
    package = Path(next(iter(spec.submodule_search_locations)))
    root = package / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(
        binary=root / "bin" / "tritonserver",
        python_backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
        libs=package.parent / "nvidia_pytriton.libs",
    )
    for path in (install.binary, install.python_backend, install.stub, install.libs):
        if not path.exists():
            raise TritonNotInstalled(f"nvidia-pytriton is incomplete, {path} is missing; {hint}")
    return install


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _get(url: str, timeout_s: float = 2.0) -> tuple[int, str]:
    """(status, body); status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return int(resp.status), resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
    except (OSError, urllib.error.URLError):
        return 0, ""


def _error_text(status: int, body: str) -> str:
    with contextlib.suppress(ValueError, AttributeError):
        message = json.loads(body).get("error")
        if message:
            return str(message)
    return f"HTTP {status}: {body.strip()[:200]}" if status else "no answer"


class TritonServer(ServerProcess):
    """One `tritonserver` process serving `model_repository`; stop it with `stop()` or `with`."""

    def __init__(
        self,
        model_repository: Path,
        *,
        workdir: Path,
        models: Sequence[str] | None = None,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        # Absolute: Triton runs with cwd=workdir and resolves its own paths from there.
        self.workdir = Path(workdir).resolve()
        self.models = list(models) if models is not None else None
        self.http_port = http_port or _free_port()
        self.grpc_port = grpc_port or _free_port()
        self.metrics_port = metrics_port or _free_port()
        self.log_path = self.workdir / "triton.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._shm_regions: set[str] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _backend_dir(self, install: TritonInstall) -> Path:
        backends = self.workdir / "backends"
        python_dir = backends / "python"
        if python_dir.exists():
            shutil.rmtree(python_dir)
        shutil.copytree(
            install.python_backend, python_dir, ignore=shutil.ignore_patterns("__pycache__")
        )
        shutil.copy2(install.stub, python_dir / install.stub.name)
        return backends

    def _environment(self, install: TritonInstall) -> dict[str, str]:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(install.libs), env.get("LD_LIBRARY_PATH", "")) if p
        )
        env["SHADOWPROXY_SITE_PACKAGES"] = sysconfig.get_paths()["purelib"]
        # The demo models load bundled weights; never let a stub wait on the network.
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
        return env

    def start(self) -> None:
        if self._proc is not None:
            raise TritonStartError("this TritonServer was already started")
        install = find_tritonserver()
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(install.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={self._backend_dir(install)}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--log-verbose=0",
            # Below stop()'s grace period, so a clean shutdown finishes before the SIGKILL.
            "--exit-timeout-secs=5",
            # Every config.pbtxt is complete: without this, each Python model starts a stub
            # process once more only to be asked for its config (twice the process launches;
            # under load, a launch storm once aborted the server in boost's interprocess lock).
            "--disable-auto-complete-config",
        ]
        if self.models is not None:
            cmd.append("--model-control-mode=explicit")
            cmd += [f"--load-model={name}" for name in self.models]
        with self.log_path.open("wb") as log:
            # Its own process group: stop() signals the server and every stub it forked.
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._environment(install),
                cwd=self.workdir,
                start_new_session=True,
            )

    def _fail(self, what: str) -> TritonStartError:
        return TritonStartError(
            f"{what}\n--- last {LOG_TAIL_LINES} lines of {self.log_path} ---\n{self.log_tail()}"
        )

    def _failed_models(self) -> dict[str, str]:
        """Model -> reason, for each model the log says failed to load."""
        log = self.log_tail(lines=100_000)
        return {
            name: reason.replace("\\n", "\n").strip() for name, reason in _LOAD_FAILED.findall(log)
        }

    def wait_ready(self, timeout_s: float = 180) -> None:
        """Block until the server and each requested model are ready, or raise TritonStartError."""
        if self._proc is None:
            raise TritonStartError("start() was not called")
        deadline = time.monotonic() + timeout_s
        while True:
            failed = self._failed_models()
            if failed:
                reasons = "\n".join(f"- {name}: {why}" for name, why in sorted(failed.items()))
                raise self._fail(f"Triton could not load model(s) {', '.join(failed)}:\n{reasons}")
            code = self._proc.poll()
            if code is not None:
                raise self._fail(f"tritonserver exited with code {code} before it was ready")
            server_ready = _get(f"{self.url}/v2/health/ready")[0] == 200
            states = self.check_models() if server_ready else {}
            dead = [m for m, state in states.items() if "is dead" in state]
            if dead:
                raise self._fail("\n".join(states[m] for m in dead))
            if server_ready and all(state == "ready" for state in states.values()):
                return
            if time.monotonic() > deadline:
                pending = [m for m, s in self.check_models().items() if s != "ready"]
                raise self._fail(
                    f"Triton not ready after {timeout_s:.0f}s (not ready: {', '.join(pending)})"
                )
            time.sleep(_POLL_S)

    def _model_names(self) -> list[str]:
        if self.models is not None:
            return self.models
        return sorted(
            p.name for p in self.model_repository.iterdir() if (p / "config.pbtxt").exists()
        )

    def check_models(self) -> dict[str, str]:
        """Model -> "ready", or why not.

        A Python-backend model whose stub process died still reports ready on
        `/v2/models/{m}/ready` while every inference answers 500 "Stub process ... is not
        healthy", so readiness alone cannot see it: a ready Python model must also have a live
        stub among the server's children.
        """
        states: dict[str, str] = {}
        stubs = self._live_stub_models()
        for name in self._model_names():
            status, body = _get(f"{self.url}/v2/models/{name}/ready")
            if status != 200:
                states[name] = _error_text(status, body)
            elif stubs is not None and self._is_python_model(name) and name not in stubs:
                states[name] = (
                    f"the Python backend stub of {name} is dead: Triton reports it ready but "
                    f"answers every request with 500 'Stub process is not healthy'; "
                    f"restart the server (log: {self.log_path})"
                )
            else:
                states[name] = "ready"
        return states

    def _is_python_model(self, name: str) -> bool:
        return any((self.model_repository / name).glob("*/model.py"))

    def _live_stub_models(self) -> set[str] | None:
        """Names of the models with a live stub under this server; None where /proc is absent."""
        if self._proc is None or not Path("/proc").is_dir():
            return None
        names: set[str] = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue  # exited while we looked, or not ours to read
            if ppid != self._proc.pid or len(args) < 3 or not args[0].endswith(_STUB_NAME.encode()):
                continue
            # The stub's arguments: <repository>/<model>/<version>/model.py, its shm region, ...
            model_py = Path(os.fsdecode(args[1]))
            if model_py.parent.parent.parent == self.model_repository:
                names.add(model_py.parent.parent.name)
            self._shm_regions.add(os.fsdecode(args[2]))
        return names

    def _remove_shm_regions(self) -> None:
        # A stub that is killed, not unloaded, leaves its /dev/shm region behind for good.
        for region in self._shm_regions:
            if region and "/" not in region:
                with contextlib.suppress(OSError):
                    (Path("/dev/shm") / region).unlink()
        self._shm_regions.clear()

    def stop(self) -> None:
        """SIGTERM the server, SIGKILL its group after 15 s. Safe to call more than once."""
        if self._proc is None:
            return
        self._live_stub_models()  # note the shm regions of the stubs still alive
        proc, self._proc = self._proc, None
        # SIGTERM to the server alone: it unloads each model, which ends each stub cleanly.
        # Signalling the whole group kills the stubs under it and then it waits out its timeout.
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        # Whatever is left in the group (a stub the server lost track of) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self._remove_shm_regions()
