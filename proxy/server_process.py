"""What the real servers the demo and the suite start (Triton, vLLM) share: a log to read the
end of when they fail, and a context manager that stops them whatever happens."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Self

LOG_TAIL_LINES = 40


class ServerProcess:
    """A server process started by ``start``, ready after ``wait_ready``, ended by ``stop``."""

    log_path: Path

    def start(self) -> None:
        raise NotImplementedError

    def wait_ready(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
