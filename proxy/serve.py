"""``shadowproxy serve``: run both planes until SIGINT/SIGTERM, then drain and stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from .app import ProxyRunner
from .errors import ConfigError
from .settings import Settings

log = logging.getLogger("shadowproxy")


def install_event_loop_policy() -> None:
    """uvloop where it is installed: a faster loop for the live path."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(settings: Settings) -> None:
    if settings.admin.token is None:
        raise ConfigError("admin.token: required by serve (the admin plane needs a token)")
    runner = ProxyRunner(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await runner.start()
    log.info(
        "shadowproxy: data plane on %s:%d -> reference %s (%s); admin on %s:%d; candidates: %s",
        settings.listen.host,
        runner.data_port,
        settings.reference.name,
        settings.reference.url,
        settings.admin.host,
        runner.admin_port,
        ", ".join(c.name for c in settings.candidates) or "none",
    )
    try:
        await stop.wait()
    finally:
        log.info("shadowproxy: stopping (draining mirrors)")
        await runner.stop()
