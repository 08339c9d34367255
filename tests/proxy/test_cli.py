"""The review CLI reads the same data as the API; bad arguments get clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import make_settings, send_infers

BODY = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,2],"data":[1,2]}]}'


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=60
    )


async def test_review_list_show_label_export(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str, tmp_path: Path
) -> None:
    ref, drifted = await fake(), await fake(drift=0.5)
    proxy = await proxy_factory(
        make_settings(ref.url, redis_url, candidates=[{"name": "int8", "url": drifted.url}])
    )
    await send_infers(proxy, ["cli-0", "cli-1"])
    config = tmp_path / "c.yaml"
    config.write_text(
        f"reference: {{name: ref, url: '{ref.url}'}}\nbuffer: {{redis_url: '{redis_url}'}}\n"
    )
    listed = _cli("review", "list", "--flagged", "--json", "--config", str(config))
    assert listed.returncode == 0, listed.stderr
    items = json.loads(listed.stdout)
    assert sorted(i["request_id"] for i in items) == ["cli-0", "cli-1"]
    table = _cli("review", "list", "--flagged", "--config", str(config))
    assert "int8" in table.stdout and "cli-0" in table.stdout
    short = items[0]["id"][:12]
    shown = _cli("review", "show", short, "--json", "--config", str(config))
    assert json.loads(shown.stdout)["id"] == items[0]["id"]
    labelled = _cli(
        "review",
        "label",
        short,
        "--verdict",
        "regression",
        "--note",
        "drift",
        "--config",
        str(config),
    )
    assert labelled.returncode == 0 and "regression" in labelled.stdout
    out = tmp_path / "golden.jsonl"
    exported = _cli("review", "export", "--out", str(out), "--config", str(config))
    assert exported.returncode == 0, exported.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and {r["label"] for r in rows} == {"regression", None}
    assert rows[0]["request"]["json"]["inputs"][0]["name"] == "x"
    assert out.stat().st_mode & 0o777 == 0o600  # it holds samples: its owner's only
    deleted = _cli("review", "delete", short, "--config", str(config))
    assert deleted.returncode == 0 and "deleted" in deleted.stdout, deleted.stderr
    gone = _cli("review", "show", items[0]["id"], "--config", str(config))
    assert gone.returncode == 2 and "matches no stored sample" in gone.stderr
    listed = _cli("review", "list", "--flagged", "--json", "--config", str(config))
    assert [i["request_id"] for i in json.loads(listed.stdout)] == [items[1]["request_id"]]


def test_bad_arguments_and_config_say_what_is_wrong(tmp_path: Path) -> None:
    bad = _cli("review", "label", "x", "--verdict", "great", "--config", "c.yaml")
    assert bad.returncode == 2 and "invalid choice: 'great'" in bad.stderr
    config = tmp_path / "c.yaml"
    config.write_text("reference: {name: ref, url: http://127.0.0.1:1}\nlisten: {prot: 1}\n")
    res = _cli("serve", "--config", str(config))
    assert res.returncode == 2 and f"{config}: listen.prot: unknown key" in res.stderr
    config.write_text(
        "reference: {name: ref, url: http://127.0.0.1:1}\n"
        "admin: {token: ${SP_NOT_SET_ANYWHERE:-}}\n"
    )
    empty = _cli("serve", "--config", str(config))
    assert empty.returncode == 2
    assert f"{config}: admin.token: must be at least 16 characters (got 0)" in empty.stderr
    unknown = _cli("review", "show", "nope", "--config", str(tmp_path / "missing.yaml"))
    assert unknown.returncode == 2 and "cannot read config file" in unknown.stderr
