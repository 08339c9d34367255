"""``shadowproxy check-config FILE``: load a config file as ``serve`` and ``worker`` would, and say
whether it is valid, without contacting Redis or any upstream (a static check for CI and for a
ConfigMap before it is applied)."""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import ConfigError
from .settings import load_settings


def check_config(path: Path) -> int:
    """0 and one ``ok:`` line on stdout, or 1 and the error (which names the key) on stderr."""
    try:
        settings = load_settings(path)
        if settings.admin.token is None:
            # serve refuses to start without it; say so now rather than at deploy time.
            raise ConfigError(f"{path}: admin.token: required by serve (the admin plane needs one)")
    except ConfigError as exc:
        # load_settings names the file at the front of each line (one per wrong key already).
        for line in str(exc).splitlines():
            message = line.removeprefix(f"{path}: ")
            print(f"shadowproxy: check-config: {path}: {message}", file=sys.stderr)
        return 1
    candidates = ", ".join(c.name for c in settings.candidates) or "none"
    redis = "external Redis" if settings.buffer.redis_url is not None else "embedded Redis"
    canary = f", canary {settings.canary.candidate}" if settings.canary is not None else ""
    print(
        f"ok: {path} ({len(settings.candidates)} candidates: {candidates}; "
        f"reference {settings.reference.name}; {redis}{canary})"
    )
    return 0
