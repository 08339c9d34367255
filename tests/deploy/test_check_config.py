"""``shadowproxy check-config FILE``: a static check that exits 0 with a summary, or 1 with the
error naming the key, and never connects to anything."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from proxy.check_config import check_config
from tests.conftest import repo_root

TOKEN = "a-token-of-at-least-16-chars"


def run_cli(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real command, as a deploy pipeline would run it."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", str(path)],
        cwd=repo_root(),
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_a_valid_config_says_ok_with_its_candidates_and_exits_0(tmp_path: Path) -> None:
    # Redis and both upstreams are unreachable addresses: a static check must not care.
    path = write(
        tmp_path,
        """
        admin: {token: ${TEST_ADMIN_TOKEN}}
        reference: {name: fp32, url: "http://127.0.0.1:1"}
        candidates:
          - {name: int8, url: "http://127.0.0.1:2", sample_rate: 0.1}
          - {name: twin, url: "http://127.0.0.1:3", noise_floor: true}
        buffer: {redis_url: "redis://127.0.0.1:1/0"}
        """,
    )
    done = run_cli(path, {"TEST_ADMIN_TOKEN": TOKEN})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"ok: {path} (2 candidates: int8, twin;"), done.stdout
    assert "external Redis" in done.stdout
    assert done.stderr == ""
    assert TOKEN not in done.stdout  # a secret is never echoed


def test_an_unknown_key_exits_1_naming_the_file_and_the_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        admin: {{token: {TOKEN}}}
        reference: {{name: fp32, url: "http://127.0.0.1:1"}}
        candidates:
          - {{name: int8, url: "http://127.0.0.1:2", sampel_rate: 0.1}}
        """,
    )
    done = run_cli(path)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == (
        f"shadowproxy: check-config: {path}: candidates[0].sampel_rate: unknown key\n"
    )


def test_each_wrong_key_is_a_line_of_its_own(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        admin: {{token: {TOKEN}, prot: 1}}
        reference: {{name: fp32, url: "ftp://x"}}
        """,
    )
    done = run_cli(path)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 2, done.stderr
    assert all(line.startswith(f"shadowproxy: check-config: {path}: ") for line in lines)
    assert any("admin.prot: unknown key" in line for line in lines)
    assert any("reference.url: must be an http:// or https:// URL" in line for line in lines)


def test_an_unset_environment_variable_is_named_with_its_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        admin: {token: ${SHADOWPROXY_TEST_UNSET_TOKEN}}
        reference: {name: fp32, url: "http://127.0.0.1:1"}
        """,
    )
    env = {k: v for k, v in os.environ.items() if k != "SHADOWPROXY_TEST_UNSET_TOKEN"}
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", str(path)],
        cwd=repo_root(),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "admin.token: environment variable SHADOWPROXY_TEST_UNSET_TOKEN is not set" in (
        done.stderr
    )


def test_a_config_that_serve_would_refuse_for_want_of_a_token_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, 'reference: {name: fp32, url: "http://127.0.0.1:1"}\n')
    assert check_config(path) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"shadowproxy: check-config: {path}: admin.token: required by serve")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, "cannot read config file"),
        ("- just\n- a list\n", "the top level must be a mapping"),
        ("reference: {name: [\n", "not valid YAML"),
    ],
)
def test_unreadable_files_exit_1_and_say_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str | None, expected: str
) -> None:
    path = tmp_path / "config.yaml"
    if text is not None:
        path.write_text(text)
    assert check_config(path) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"shadowproxy: check-config: {path}: ") and expected in err, err


def test_a_malformed_redis_url_is_named_without_its_password(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        admin: {{token: {TOKEN}}}
        reference: {{name: fp32, url: "http://127.0.0.1:1"}}
        buffer: {{redis_url: "redis+sentinel://:hunter2-secret@10.0.0.1:26379"}}
        """,
    )
    done = run_cli(path)
    assert done.returncode == 1
    assert "buffer.redis_url" in done.stderr and "service name" in done.stderr
    assert "hunter2" not in done.stderr + done.stdout


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://user:ab/cd-hunter2@h1,h2/",  # a base64 password with a slash
        "redis://:ab/cd-hunter2@localhost:70000/0",
        "redis+cluster://:hunter2?x@h1:notaport",
    ],
)
def test_a_password_with_reserved_characters_never_reaches_the_message(
    tmp_path: Path, url: str
) -> None:
    path = write(
        tmp_path,
        f"""
        admin: {{token: {TOKEN}}}
        reference: {{name: fp32, url: "http://127.0.0.1:1"}}
        buffer: {{redis_url: "{url}"}}
        """,
    )
    done = run_cli(path)
    assert done.returncode == 1 and "buffer.redis_url" in done.stderr
    assert "hunter2" not in done.stderr + done.stdout, done.stderr
