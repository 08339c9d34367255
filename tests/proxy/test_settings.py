"""Config: errors name the key and the file; env expansion; secrets stay out of repr."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.errors import ConfigError
from proxy.settings import load_settings

GOOD = """
listen: {host: 127.0.0.1, port: 8000}
admin:  {host: 127.0.0.1, port: 8001, token: ${SP_TEST_TOKEN}}
reference: {name: fp32, url: http://127.0.0.1:9000}
candidates:
  - {name: int8, url: http://127.0.0.1:9100, sample_rate: 1.0, timeout_s: 5}
buffer: {redis_url: "redis://:hunter2@127.0.0.1:6379/0"}
comparisons:
  "*": {"*": {metric: auto}}
  minilm: {embedding: {metric: cosine, min_cosine: 0.99}}
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "shadowproxy.yaml"
    p.write_text(text)
    return p


def test_good_config_loads_with_env_and_hides_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SP_TEST_TOKEN", "s3cret-token")
    s = load_settings(_write(tmp_path, GOOD))
    assert s.admin.token is not None and s.admin.token.get_secret_value() == "s3cret-token"
    assert s.candidates[0].name == "int8" and s.reference.url == "http://127.0.0.1:9000"
    text = repr(s) + str(s)
    assert "s3cret-token" not in text and "hunter2" not in text


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("port: 8000}", "port: 8000, prot: 1}"), "listen.prot: unknown key"),
        (("sample_rate: 1.0", "sample_rate: 2.0"), "candidates[0].sample_rate"),
        (("url: http://127.0.0.1:9000", "url: 127.0.0.1:9000"), "reference.url: must be an http"),
        (
            ("metric: cosine,", "metric: cosin,"),
            "comparisons: ['minilm']['embedding']: unknown metric 'cosin'",
        ),
        (("min_cosine: 0.99", "atol: 0.99"), "'cosine'"),
        (
            ("reference: {name: fp32, url: http://127.0.0.1:9000}\n", ""),
            "reference: required key is missing",
        ),
        (
            ("${SP_TEST_TOKEN}", "${SP_UNSET_VAR_XYZ}"),
            "admin.token: environment variable SP_UNSET_VAR_XYZ",
        ),
    ],
)
def test_config_errors_name_the_file_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edit: tuple[str, str], expected: str
) -> None:
    monkeypatch.setenv("SP_TEST_TOKEN", "t")
    path = _write(tmp_path, GOOD.replace(*edit))
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_unreadable_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_settings(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(_write(tmp_path, "a: [\n"))


def test_duplicate_candidate_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SP_TEST_TOKEN", "t")
    dup = GOOD.replace(
        "timeout_s: 5}", "timeout_s: 5}\n  - {name: int8, url: http://127.0.0.1:9200}"
    )
    with pytest.raises(ConfigError, match="repeated: int8"):
        load_settings(_write(tmp_path, dup))
