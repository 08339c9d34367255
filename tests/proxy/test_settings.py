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
    monkeypatch.setenv("SP_TEST_TOKEN", "s3cret-token-0123456")
    s = load_settings(_write(tmp_path, GOOD))
    assert s.admin.token is not None and s.admin.token.get_secret_value() == "s3cret-token-0123456"
    assert s.candidates[0].name == "int8" and s.reference.url == "http://127.0.0.1:9000"
    text = repr(s) + str(s)
    assert "s3cret-token-0123456" not in text and "hunter2" not in text


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
    monkeypatch.setenv("SP_TEST_TOKEN", "t" * 16)
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
    monkeypatch.setenv("SP_TEST_TOKEN", "t" * 16)
    dup = GOOD.replace(
        "timeout_s: 5}", "timeout_s: 5}\n  - {name: int8, url: http://127.0.0.1:9200}"
    )
    with pytest.raises(ConfigError, match="repeated: int8"):
        load_settings(_write(tmp_path, dup))


def test_empty_or_short_tokens_are_refused_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SP_UNSET_TOKEN", raising=False)
    empty = GOOD.replace("${SP_TEST_TOKEN}", "${SP_UNSET_TOKEN:-}")
    with pytest.raises(ConfigError) as err:
        load_settings(_write(tmp_path, empty))
    assert "admin.token: must be at least 16 characters (got 0)" in str(err.value)
    monkeypatch.setenv("SP_TEST_TOKEN", "x" * 16)
    short_user = GOOD.replace(
        "token: ${SP_TEST_TOKEN}}",
        "token: ${SP_TEST_TOKEN}, users: [{name: vera, token: short-one}]}",
    )
    with pytest.raises(ConfigError) as err:
        load_settings(_write(tmp_path, short_user))
    assert "admin.users[0].token: must be at least 16 characters (got 9)" in str(err.value)


def test_redact_and_tls_settings_are_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SP_TEST_TOKEN", "x" * 16)
    no_secret = GOOD + "redact: {inputs: [ssn]}\n"
    with pytest.raises(ConfigError, match=r"redact\.secret: required when inputs"):
        load_settings(_write(tmp_path, no_secret))
    bad_pointer = GOOD + "redact: {json_pointers: [user/email], secret: 0123456789abcdef}\n"
    with pytest.raises(ConfigError, match="'user/email' is not a JSON pointer"):
        load_settings(_write(tmp_path, bad_pointer))
    half_tls = GOOD.replace("port: 8001,", "port: 8001, tls_cert: /tmp/c.pem,")
    with pytest.raises(ConfigError, match="give both or neither"):
        load_settings(_write(tmp_path, half_tls))
    good = GOOD + (
        "redact: {outputs: [embedding], secret: 0123456789abcdef, store_payloads: false}\n"
    )
    s = load_settings(_write(tmp_path, good))
    assert s.redact.hashes_values() and not s.redact.store_payloads
    assert "0123456789abcdef" not in repr(s)


def test_grpc_settings_load_and_default_to_no_listener(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SP_TEST_TOKEN", "x" * 16)
    plain = load_settings(_write(tmp_path, GOOD))
    assert plain.listen.grpc_port is None and plain.reference.grpc_url is None
    assert plain.proxy.max_body_bytes == 64 * 1024 * 1024  # gRPC's 4 MiB would refuse tensors
    (tmp_path / "ca.pem").write_text("roots")
    (tmp_path / "c.pem").write_text("cert")
    (tmp_path / "k.pem").write_text("key")
    text = GOOD.replace("port: 8000}", "port: 8000, grpc_port: 8010}").replace(
        "url: http://127.0.0.1:9000}",
        f"url: http://127.0.0.1:9000, grpc_url: 'grpcs://[::1]:9001', grpc_ca: {tmp_path}/ca.pem,"
        f" grpc_cert: {tmp_path}/c.pem, grpc_key: {tmp_path}/k.pem}}",
    )
    s = load_settings(_write(tmp_path, text))
    assert s.listen.grpc_port == 8010
    assert s.reference.grpc_tls and s.reference.grpc_target == "[::1]:9001"
    assert s.reference.grpc_key == tmp_path / "k.pem"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            ("port: 8000}", "port: 8000, grpc_port: 8010}"),
            "listen.grpc_port: set, but reference.grpc_url is not",
        ),
        (
            ("url: http://127.0.0.1:9000}", "url: http://127.0.0.1:9000, grpc_url: h:1/v2}"),
            "reference.grpc_url: must be host:port or grpcs://host:port",
        ),
        (
            ("timeout_s: 5}", "timeout_s: 5, grpc_url: 'http://127.0.0.1:9101'}"),
            "candidates[0].grpc_url: must be host:port",
        ),
        (
            ("url: http://127.0.0.1:9000}", "url: http://a:1, grpc_url: a:1, grpc_ca: /no/ca.pem}"),
            "reference.grpc_ca: no such file: /no/ca.pem",
        ),
        (
            ("url: http://127.0.0.1:9000}", "url: http://a:1, grpc_url: a:1, grpc_ca: {ca}}"),
            "reference: grpc_ca, grpc_cert, grpc_key: need a grpcs:// grpc_url (got 'a:1')",
        ),
        (
            (
                "url: http://127.0.0.1:9000}",
                "url: http://a:1, grpc_url: grpcs://a:1, grpc_cert: {ca}}",
            ),
            "reference: grpc_cert and grpc_key: give both or neither",
        ),
    ],
)
def test_grpc_settings_errors_name_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edit: tuple[str, str], expected: str
) -> None:
    monkeypatch.setenv("SP_TEST_TOKEN", "x" * 16)
    ca = tmp_path / "ca.pem"
    ca.write_text("roots")
    path = _write(tmp_path, GOOD.replace(edit[0], edit[1].replace("{ca}", str(ca))))
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert f"{path}: {expected}" in str(info.value)
