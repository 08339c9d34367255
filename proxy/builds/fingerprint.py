"""What an upstream serves for one model, as facts, and the build id those facts make.

A build is identified by everything that can change an answer without the request changing:
the model's name and version as the server reports them, its config where the server has one,
the server's own name, version and extensions, the URL and ``model_map`` it is reached by, the
declared ``hardware:`` string, and the GPUs its Prometheus metrics name (``metrics_url``). Facts
that change on their own (load, timestamps) are never part of it. For an OpenAI-compatible
server, the served model id, its ``/v1/models`` root and the server's ``/version``.

The probes are plain GETs with a short timeout; a route a server lacks is simply absent from
the facts (its absence is part of the fingerprint, the same every time).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

PROBE_TIMEOUT_S = 5.0
# Labels a GPU's name may come under (Triton's own nv_gpu_* series carry only gpu_uuid; DCGM's
# exporter adds modelName).
_NAME_LABELS = ("modelName", "model_name", "gpu_name", "name")
_ID_LABELS = ("gpu_uuid", "UUID", "uuid", "gpu")


def gpus_from_metrics(text: str) -> dict[str, Any]:
    """The GPUs a metrics page names in its ``nv_gpu_*`` (Triton) or ``DCGM_FI_*`` series:
    their count, names where a label gives them, and each one's total memory (which tells an
    L4 from an A100 where no name is given). Raises ``ValueError`` on text that is not in the
    Prometheus exposition format."""
    gpus: dict[str, dict[str, Any]] = {}
    for family in text_string_to_metric_families(text):
        if not (family.name.startswith("nv_gpu_") or family.name.startswith("DCGM_FI_")):
            continue
        for sample in family.samples:
            gid = next((sample.labels[k] for k in _ID_LABELS if k in sample.labels), None)
            if gid is None:
                continue
            gpu = gpus.setdefault(gid, {})
            name = next((sample.labels[k] for k in _NAME_LABELS if k in sample.labels), None)
            if name:
                gpu["name"] = name
            if sample.name == "nv_gpu_memory_total_bytes":
                gpu["memory_bytes"] = int(sample.value)
    ordered = [gpus[k] for k in sorted(gpus)]
    return {
        "count": len(ordered),
        "names": sorted({g["name"] for g in ordered if "name" in g}),
        "memory_bytes": sorted(g["memory_bytes"] for g in ordered if "memory_bytes" in g),
    }


def build_id(facts: Mapping[str, Any]) -> str:
    """12 hex digits of the facts' canonical JSON: the same facts, the same id, everywhere."""
    raw = json.dumps(facts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def config_lines(config: Any) -> list[str]:
    """A model config flattened to ``path = value`` lines, sorted: what ``builds diff`` shows."""
    lines: list[str] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k in sorted(value):
                walk(f"{prefix}.{k}" if prefix else str(k), value[k])
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(f"{prefix}[{i}]", v)
        else:
            lines.append(f"{prefix} = {json.dumps(value, sort_keys=True)}")

    walk("", config)
    return lines


async def _get_json(session: aiohttp.ClientSession, url: str) -> Any | None:
    try:
        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
        async with session.get(url, timeout=timeout) as r:
            if r.status != 200:
                return None
            return await r.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def _get_text(session: aiohttp.ClientSession, url: str) -> str | None:
    try:
        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
        async with session.get(url, timeout=timeout) as r:
            return await r.text() if r.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
        return None


async def probe(
    session: aiohttp.ClientSession,
    *,
    upstream: str,
    url: str,
    model: str,
    served: str,
    version: str | None,
    hardware: str | None,
    metrics_url: str | None,
    model_map: Mapping[str, str],
    openai: bool = False,
) -> dict[str, Any]:
    """The facts of the build ``upstream`` serves ``model`` with (as ``served``; ``version``:
    the one that answered, when the answer said)."""
    facts: dict[str, Any] = {
        "upstream": upstream,
        # Credentials in the URL authenticate the probes; the ledger keeps the URL without them.
        "url": _without_userinfo(url),
        "model": model,
        "served": served,
        "model_map": dict(sorted(model_map.items())),
        "hardware": hardware,
    }
    if openai:
        models = await _get_json(session, f"{url}/v1/models")
        data = models.get("data") if isinstance(models, dict) else None
        listed = data if isinstance(data, list) else []
        entry = next((m for m in listed if isinstance(m, dict) and m.get("id") == served), None)
        facts["openai_model"] = (
            {k: entry.get(k) for k in ("id", "root", "owned_by", "max_model_len")}
            if entry
            else None
        )
        server = await _get_json(session, f"{url}/version")
        facts["server"] = server if isinstance(server, dict) else None
    else:
        server = await _get_json(session, f"{url}/v2")
        facts["server"] = (
            {k: server.get(k) for k in ("name", "version", "extensions")}
            if isinstance(server, dict)
            else None
        )
        meta = await _get_json(session, f"{url}/v2/models/{served}")
        loaded = meta.get("versions") if isinstance(meta, dict) else None
        versions = [str(v) for v in loaded] if isinstance(loaded, list) else []
        facts["version"] = version or (max(versions, key=_version_key) if versions else None)
        facts["platform"] = meta.get("platform") if isinstance(meta, dict) else None
        path = f"{url}/v2/models/{served}"
        if facts["version"]:
            path += f"/versions/{facts['version']}"
        config = await _get_json(session, f"{path}/config")
        facts["config"] = config_lines(config) if isinstance(config, dict) else None
    if metrics_url:
        text = await _get_text(session, metrics_url)
        try:
            facts["gpus"] = gpus_from_metrics(text) if text is not None else None
        except (ValueError, OverflowError):  # not the exposition format; an infinite memory
            facts["gpus"] = None
    return facts


def _without_userinfo(url: str) -> str:
    head, sep, rest = url.partition("://")
    host = rest.split("/", 1)[0]
    if "@" not in host:
        return url
    return f"{head}{sep}{rest[len(host.rpartition('@')[0]) + 1 :]}"


def _version_key(v: str) -> tuple[int, str]:
    return (int(v), v) if v.isdigit() else (-1, v)
