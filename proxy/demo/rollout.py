"""A model version rolled out on a running Triton, through its model repository API.

Triton serves the versions its config's ``version_policy`` names. ``load_versions`` reads the
config the server is serving now (complete, as a load's config override must be), sets its
``version_policy`` to the given versions and loads the model with it
(``POST /v2/repository/models/{m}/load`` with ``{"parameters": {"config": ...}}``; the server
must run in explicit or poll model control mode). Triton answers once the load is done; versions
already serving keep answering meanwhile, and un-versioned requests go to the newest version
loaded from then on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import aiohttp

LOAD_TIMEOUT_S = 300.0


class RolloutError(Exception):
    """The server refused the load, or could not be asked."""


async def _json(resp: aiohttp.ClientResponse) -> Any:
    text = await resp.text()
    try:
        return json.loads(text) if text else None
    except ValueError:
        return text


async def served_versions(url: str, model: str) -> list[str]:
    """The versions of ``model`` that ``url`` serves now (its V2 model metadata)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url.rstrip('/')}/v2/models/{model}") as r,
    ):
        body = await _json(r)
        if r.status != 200 or not isinstance(body, dict):
            raise RolloutError(f"{model}: no metadata from {url} (HTTP {r.status}: {body})")
        return [str(v) for v in body.get("versions") or []]


async def load_versions(
    url: str, model: str, versions: Sequence[int], *, timeout_s: float = LOAD_TIMEOUT_S
) -> dict[str, Any]:
    """Serve exactly ``versions`` of ``model``; returns the config it was loaded with."""
    base = url.rstrip("/")
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(f"{base}/v2/models/{model}/config") as r:
            config = await _json(r)
            if r.status != 200 or not isinstance(config, dict):
                raise RolloutError(f"{model}: no config from {url} (HTTP {r.status}: {config})")
        config["version_policy"] = {"specific": {"versions": [int(v) for v in versions]}}
        body = {"parameters": {"config": json.dumps(config)}}
        async with session.post(f"{base}/v2/repository/models/{model}/load", json=body) as r:
            if r.status != 200:
                raise RolloutError(
                    f"{model}: loading versions {list(versions)} failed "
                    f"(HTTP {r.status}: {await _json(r)})"
                )
    return config
