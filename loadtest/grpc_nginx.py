"""NGINX for gRPC: a static gRPC backend, and ``grpc_pass`` with or without ``mirror``.

Both run like the REST ones (``nginx.py``, ``static_backend.py``): generated into a temporary
directory, ``daemon off``, one worker, no access log, a child of the benchmark stopped by pid.
Debian's NGINX (1.22, ``--with-http_v2_module``) does both:

- **a static gRPC answer**: NGINX cannot ``return`` a gRPC answer (the body is binary, a 5-byte
  length prefix and the protobuf, and gRPC's status travels in HTTP/2 trailers), but it can send
  a file: each fixed answer (``grpc_backend.FIXED``, length-prefixed) is a file, served with
  ``default_type application/grpc`` and ``add_trailer grpc-status 0 always``. NGINX's static
  handler refuses POST (405), so ``error_page 405 =200`` sends the same file from an internal
  location. This is the fastest gRPC backend the machine has: no Python in the loop.
  A second, HTTP/1 listener serves ``stub_status``, whose request counter tells how many calls
  the backend received (``nginx_requests``);
- **grpc_pass with mirror**: ``mirror /mirror; mirror_request_body on;`` in front of
  ``grpc_pass grpc://reference``, and in the internal ``/mirror`` location
  ``rewrite ^ $request_uri break;`` before ``grpc_pass grpc://candidate``: gRPC's method is the
  ``:path``, and without the rewrite the copy would be sent to ``/mirror``. The candidate's
  answer is discarded (mirror subrequests' answers are).

Upstream connections are kept alive (``keepalive 64``); NGINX sends one call per upstream HTTP/2
connection (no multiplexing), so under 32 concurrent calls it holds up to 32 of them. With
``mirror``, a call's HTTP/2 stream stays counted until its copy is answered too, so at saturation
the default ``http2_max_concurrent_streams 128`` refused live calls (REFUSED_STREAM, then GOAWAY
"too many refused streams"): the proxy's config raises it to 1024.
"""

from __future__ import annotations

import os
import re
import stat
import struct
import subprocess
import tempfile
from pathlib import Path

import aiohttp

from .grpc_backend import FIXED
from .nginx import TEMP_PATHS, config_head, nginx_binary
from .procs import Processes


def _head(work: Path) -> str:
    # Many calls per connection: a gRPC client keeps one HTTP/2 connection for all of them.
    return config_head(work, keepalive_requests=100_000_000) + "    keepalive_timeout 300s;\n"


def static_grpc_config(work: Path, port: int, status_port: int) -> str:
    """nginx.conf of a static gRPC backend on ``port`` (h2c), stub_status on ``status_port``."""
    names = "|".join(method.rsplit("/", 1)[1] for method in FIXED)
    return (
        _head(work)
        + f"""    types {{ }}
    default_type application/grpc;
    server {{
        listen 127.0.0.1:{port} http2 backlog=4096;
        root {work};
        add_trailer grpc-status 0 always;
        add_trailer grpc-message "" always;
        location ~ ^/inference\\.GRPCInferenceService/(?<method>{names})$ {{
            mirror /_drain;
            mirror_request_body on;
            try_files /$method.bin =404;
            error_page 405 =200 /$method.bin;
        }}
        location = /_drain {{
            internal;
            return 204;
        }}
        location ~ ^/({names})\\.bin$ {{
            internal;
        }}
        location / {{
            add_trailer grpc-status 12 always;
            add_trailer grpc-message "not served here" always;
            return 200 '';
        }}
    }}
    server {{
        listen 127.0.0.1:{status_port};
        location = /status {{ stub_status; }}
    }}
}}
"""
    )


def grpc_proxy_config(work: Path, port: int, reference: str, candidate: str | None) -> str:
    """nginx.conf of ``grpc_pass`` to ``reference`` (host:port), mirroring to ``candidate``."""
    upstreams = f"    upstream reference {{ server {reference}; keepalive 64; }}\n"
    mirror = location = ""
    if candidate:
        upstreams += f"    upstream candidate {{ server {candidate}; keepalive 64; }}\n"
        mirror = "mirror /mirror;\n            mirror_request_body on;\n            "
        location = """
        location = /mirror {
            internal;
            rewrite ^ $request_uri break;
            grpc_pass grpc://candidate;
        }"""
    return (
        _head(work)
        + upstreams
        + f"""    # A mirrored call's stream stays counted until its copy is answered (see above).
    http2_max_concurrent_streams 1024;
    server {{
        listen 127.0.0.1:{port} http2 backlog=4096;
        location / {{
            {mirror}grpc_pass grpc://reference;
        }}{location}
    }}
}}
"""
    )


def _prepare(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    # Run as root, NGINX's worker drops to an unprivileged user: it must still reach its paths.
    work.chmod(0o755)
    for sub in TEMP_PATHS:
        (work / sub).mkdir(exist_ok=True)
        (work / sub).chmod(0o777)


def _start(procs: Processes, name: str, work: Path, config: str) -> subprocess.Popen[bytes]:
    binary = nginx_binary()
    if binary is None:
        raise FileNotFoundError("nginx is not installed")
    path = work / "nginx.conf"
    path.write_text(config)
    return procs.start(
        name, [binary, "-p", str(work), "-e", str(work / "error.log"), "-c", str(path)]
    )


def _traversable(work: Path) -> None:
    """Let NGINX's unprivileged worker reach the answer files: add the traverse bit (only
    that) to each of ``work``'s parents inside the temporary directory that are ours (a
    ``TemporaryDirectory`` is 0700)."""
    top = Path(tempfile.gettempdir()).resolve()
    for parent in work.resolve().parents:
        if parent == top or top not in parent.parents:
            break
        info = parent.stat()
        if info.st_uid == os.geteuid() and not info.st_mode & stat.S_IXOTH:
            parent.chmod(stat.S_IMODE(info.st_mode) | stat.S_IXOTH)


def start_static_grpc(
    procs: Processes, name: str, work: Path, port: int, status_port: int
) -> subprocess.Popen[bytes]:
    """A static gRPC backend on 127.0.0.1:``port``, its stub_status on ``status_port``."""
    _prepare(work)
    _traversable(work)
    for method, answer in FIXED.items():
        path = work / f"{method.rsplit('/', 1)[1]}.bin"
        path.write_bytes(b"\x00" + struct.pack(">I", len(answer)) + answer)
        path.chmod(0o644)
    return _start(procs, name, work, static_grpc_config(work, port, status_port))


def start_grpc_nginx(
    procs: Processes, name: str, work: Path, port: int, reference: str, candidate: str | None
) -> subprocess.Popen[bytes]:
    _prepare(work)
    return _start(procs, name, work, grpc_proxy_config(work, port, reference, candidate))


async def nginx_requests(control: aiohttp.ClientSession, status_url: str) -> int | None:
    """NGINX's request counter (stub_status): every request it received, status reads included
    (each read counts itself: whoever reads it subtracts its own reads)."""
    try:
        async with control.get(status_url) as resp:
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError):
        return None
    m = re.search(r"^\s*\d+\s+\d+\s+(\d+)\s*$", text, re.MULTILINE)
    return int(m.group(1)) if m else None
