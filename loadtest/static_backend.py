"""A static NGINX V2 backend: the fastest reference (or candidate) this machine can offer.

The Python fake backend (``fake_backend.py``) costs ~0.3 ms of CPU per answer on these cores, and
its own latency and jitter sit inside every figure measured through it. For the live-path points
(saturation and small JSON at 1000 req/s) the reference and the candidate are instead an NGINX
server block that answers ``POST /v2/models/{m}/infer`` with a fixed small V2 answer
(``return 200 '...'``), keep-alive on: what remains in a latency is the proxy's own share, which
is the fairest ground on which to compare shadowproxy with NGINX's ``mirror``.

Routes (a subset of KServe V2 / Triton, what the proxy and the load generator use):

- ``POST /v2/models/{m}[/versions/{v}]/infer``: the fixed answer (one 1x8 FP32 output, the
  same values as ``fake_backend``), whatever the request said; the body is read and discarded;
- ``GET /v2/models/{m}/config``: a minimal Triton config without sequence batching, so the proxy
  treats the model as stateless (mirrorable), as it does behind Triton;
- ``GET /v2/health/ready``: 200; anything else: 404.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .fake_backend import OUTPUT_VALUES
from .nginx import TEMP_PATHS, config_head, nginx_binary
from .procs import Processes

# NGINX substitutes $model (the named capture of the location) inside the answer text.
_ANSWER = json.dumps(
    {
        "model_name": "$model",
        "model_version": "1",
        "outputs": [
            {"name": "OUTPUT0", "datatype": "FP32", "shape": [1, 8], "data": list(OUTPUT_VALUES)}
        ],
    },
    separators=(",", ":"),
)
_CONFIG = json.dumps(
    {"name": "$model", "platform": "python", "max_batch_size": 0, "backend": "python"},
    separators=(",", ":"),
)
_MODEL = r"(?<model>[^/]+)"


def static_config(work: Path, port: int) -> str:
    """The whole nginx.conf of a static V2 backend on 127.0.0.1:``port``."""
    return (
        config_head(work)
        + f"""    keepalive_timeout 300s;
    default_type application/json;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location ~ ^/v2/models/{_MODEL}(/versions/[^/]+)?/infer$ {{
            return 200 '{_ANSWER}';
        }}
        location ~ ^/v2/models/{_MODEL}/config$ {{
            return 200 '{_CONFIG}';
        }}
        location = /v2/health/ready {{
            return 200 '';
        }}
        location / {{
            return 404 '{{"error":"not found"}}';
        }}
    }}
}}
"""
    )


def start_static_backend(
    procs: Processes, name: str, work: Path, port: int
) -> subprocess.Popen[bytes]:
    """Start a static V2 backend (its own NGINX, in the foreground) as a child of ``procs``."""
    binary = nginx_binary()
    if binary is None:
        raise FileNotFoundError("nginx is not installed")
    work.mkdir(parents=True, exist_ok=True)
    # Run as root, NGINX's worker drops to an unprivileged user: it must still reach its paths.
    work.chmod(0o755)
    for sub in TEMP_PATHS:
        (work / sub).mkdir(exist_ok=True)
        (work / sub).chmod(0o777)
    config = work / "nginx.conf"
    config.write_text(static_config(work, port))
    return procs.start(
        name, [binary, "-p", str(work), "-e", str(work / "error.log"), "-c", str(config)]
    )
