"""NGINX as the peer to beat: a plain reverse proxy, or one with the ``mirror`` module.

Everything lives in a temporary directory (config, pid file, logs, temp paths), NGINX runs in
the foreground (``daemon off``) as a child of the benchmark and is stopped by its pid. The
configuration is what an SRE would write for the job: one worker process, no access log,
keep-alive connections to the upstreams, bodies buffered in memory; with a candidate,
``mirror /mirror; mirror_request_body on;`` and an internal location that proxies to it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from .procs import Processes

TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )


def _host_port(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"


def config_head(work: Path, keepalive_requests: int = 1_000_000) -> str:
    """How every nginx.conf of the bench starts: one worker in the foreground, its files under
    ``work``, and an ``http`` block (left open for the caller) taking bodies up to 64 MiB on
    long-lived keep-alive connections."""
    temp = "\n".join(f"    {name}_temp_path {work / name};" for name in TEMP_PATHS)
    return f"""worker_processes 1;
daemon off;
pid {work / "nginx.pid"};
error_log {work / "error.log"} warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
{temp}
    client_max_body_size 64m;
    client_body_buffer_size 2m;
    keepalive_requests {keepalive_requests};
"""


def nginx_config(work: Path, port: int, reference: str, candidate: str | None) -> str:
    """The config for a reverse proxy to ``reference``, mirroring to ``candidate`` when given."""
    mirror = "mirror /mirror;\n            mirror_request_body on;" if candidate else ""
    upstream_candidate = mirror_location = ""
    if candidate:
        upstream_candidate = (
            f"    upstream candidate {{ server {_host_port(candidate)}; keepalive 64; }}\n"
        )
        mirror_location = """
        location = /mirror {
            internal;
            proxy_pass http://candidate$request_uri;
        }"""
    return (
        config_head(work)
        + f"""    proxy_http_version 1.1;
    proxy_set_header Connection "";
    upstream reference {{ server {_host_port(reference)}; keepalive 64; }}
{upstream_candidate}    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            {mirror}
            proxy_pass http://reference;
        }}{mirror_location}
    }}
}}
"""
    )


def start_nginx(
    procs: Processes, name: str, work: Path, port: int, reference: str, candidate: str | None
) -> subprocess.Popen[bytes]:
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
    config.write_text(nginx_config(work, port, reference, candidate))
    return procs.start(
        name, [binary, "-p", str(work), "-e", str(work / "error.log"), "-c", str(config)]
    )
