"""Importing the AWS sample proxy's settings TOML (xks_proxy.migration).

The sample settings below are written for these tests in the shape of the sample's
settings structs (xks-axum/src/settings.rs), not copied from its example files.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from xks_proxy.config import ProxyConfig, parse_config
from xks_proxy.migration import (
    TOKEN_LABEL_PLACEHOLDER,
    ImportResult,
    SampleSettingsError,
    import_sample_settings,
)

AKID_A = "ABCDEFGHIJKLMNOPQRSTUVWX234567"
AKID_B = "MIGRATIONTESTKEYIDZZ"
SECRET_A = "aW1wb3J0LXRlc3Qtc2VjcmV0LW51bWJlci1vbmUtMDEyMzQ1Njc4OQ=="
SECRET_B = "Zm9yLXRoZS1zZWNvbmQta2V5LXN0b3JlLW9mLXRoZS10ZXN0LTAxMjM="
PIN = 'user:p"in\\1'  # quotes and a backslash must survive the TOML round trip
PIN_TOML = '"user:p\\"in\\\\1"'

TLS_SAMPLE = f"""
# A sample-style settings file: HTTPS with mTLS, two key stores, Oso, pkcs11-logger.
[server]
ip = "0.0.0.0"
port = 443
port_http_ping = 8080
region = "eu-west-1"
service = "kms-xks-proxy"
ciphertext_metadata_b64 = "a2V5LXYy"

[server.tcp_keepalive]
tcp_keepalive_secs = 30
tcp_keepalive_retries = 5
tcp_keepalive_interval_secs = 2

[tracing]
is_stdout_writer_enabled = false
is_file_writer_enabled = true
level = "INFO"
directory = "/var/log/xks"
file_prefix = "proxy.log"
rotation_kind = "DAILY"

[security]
is_sigv4_auth_enabled = true
is_tls_enabled = true
is_mtls_enabled = true
secondary_auth = "Oso"

[security.oso]
polar_file_path = "configuration/policy.polar"

[tls]
tls_cert_pem = "tls/cert.pem"
tls_key_pem = "tls/key.pem"
mtls_client_ca_pem = "tls/ca.pem"
mtls_client_dns_name = "cks.kms.eu-west-1.amazonaws.com"

[[external_key_stores]]
uri_path_prefix = "/tenants/alpha"
sigv4_access_key_id = "{AKID_A}"
sigv4_secret_access_key = "{SECRET_A}"
xks_key_id_set = ["orders", "payments", "orders"]

[[external_key_stores]]
uri_path_prefix = ""
sigv4_access_key_id = "{AKID_B}"
sigv4_secret_access_key = "{SECRET_B}"
xks_key_id_set = ["root-key"]

[pkcs11]
session_pool_max_size = 16
session_pool_timeout_milli = 0
session_eager_close = false
user_pin = {PIN_TOML}
PKCS11_HSM_MODULE = "/opt/logger/pkcs11-logger-x64.so"
context_read_timeout_milli = 10

[pkcs11_logger]
PKCS11_LOGGER_LIBRARY_PATH = "/usr/lib/softhsm/libsofthsm2.so"
PKCS11_LOGGER_LOG_FILE_PATH = "/var/log/xks/pkcs11.log"
PKCS11_LOGGER_FLAGS = "0"

[limits]
max_plaintext_in_base64 = 8192
max_aad_in_base64 = 16384

[hsm_capabilities]
can_generate_iv = false
is_zero_iv_required = false
"""

PLAIN_SAMPLE = f"""
[server]
ip = "127.0.0.1"
port = 80
region = "us-east-1"
service = "kms-xks-proxy"

[server.tcp_keepalive]

[tracing]
is_stdout_writer_enabled = true
is_file_writer_enabled = false
level = "DEBUG"

[security]
is_sigv4_auth_enabled = true
is_tls_enabled = false
is_mtls_enabled = false

[[external_key_stores]]
uri_path_prefix = ""
sigv4_access_key_id = ""
sigv4_secret_access_key = ""
xks_key_id_set = ["foo"]

[[external_key_stores]]
uri_path_prefix = "/example/uri/path/prefix"
sigv4_access_key_id = "{AKID_A}"
sigv4_secret_access_key = "{SECRET_A}"
xks_key_id_set = ["foo", "bar", "not a key id"]

[pkcs11]
session_pool_max_size = 30
session_pool_timeout_milli = 0
session_eager_close = false
user_pin = "1234"
PKCS11_HSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
context_read_timeout_milli = 10

[limits]
max_plaintext_in_base64 = 8192
max_aad_in_base64 = 16384

[hsm_capabilities]
can_generate_iv = false
is_zero_iv_required = false
"""


def write(tmp_path: Path, text: str, name: str = "settings.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def tls_files(directory: Path) -> None:
    (directory / "tls").mkdir(parents=True, exist_ok=True)
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (directory / "tls" / name).write_text("placeholder\n", encoding="utf-8")


def load(result: ImportResult, base_dir: Path) -> ProxyConfig:
    """parse_config on the generated TOML, as `xks-proxy serve` would load it."""
    document: dict[str, Any] = tomllib.loads(result.config_toml)
    config = parse_config(document, base_dir=base_dir)
    assert all(store.compatibility == "aws-sample" for store in config.key_stores)
    return config


def has(report: list[str], *words: str) -> bool:
    return any(all(word in line for word in words) for line in report)


# ----------------------------------------------------------------- conversions


def test_tls_sample_converts_and_loads(tmp_path: Path) -> None:
    tls_files(tmp_path)
    result = import_sample_settings(
        write(tmp_path, TLS_SAMPLE), token_label="xks-token", working_dir=tmp_path
    )
    document = tomllib.loads(result.config_toml)
    assert [s["compatibility"] for s in document["key_stores"]] == ["aws-sample"] * 2
    config = load(result, tmp_path)

    assert (config.server.host, config.server.port) == ("0.0.0.0", 443)
    assert (config.server.health_host, config.server.health_port) == ("0.0.0.0", 8080)
    assert not config.server.allow_plain_http
    assert config.tls is not None
    assert config.tls.cert_file == tmp_path / "tls" / "cert.pem"
    assert config.tls.key_file == tmp_path / "tls" / "key.pem"
    assert config.tls.client_ca_file == tmp_path / "tls" / "ca.pem"
    assert config.tls.client_names == ("cks.kms.eu-west-1.amazonaws.com",)

    hsm = config.hsm
    assert hsm.module == "/opt/logger/pkcs11-logger-x64.so"
    assert (hsm.token_label, hsm.slot, hsm.pin, hsm.sessions) == ("xks-token", None, PIN, 1)
    assert dict(hsm.environment) == {
        "PKCS11_LOGGER_LIBRARY_PATH": "/usr/lib/softhsm/libsofthsm2.so",
        "PKCS11_LOGGER_LOG_FILE_PATH": "/var/log/xks/pkcs11.log",
        "PKCS11_LOGGER_FLAGS": "0",
    }
    assert config.log_level == "info"

    alpha, root = config.key_stores
    assert (alpha.name, alpha.uri_prefix, alpha.region) == (
        "tenants-alpha",
        "/tenants/alpha",
        "eu-west-1",
    )
    assert alpha.external_key_ids == frozenset({"orders", "payments"})
    assert [(c.access_key_id, c.secret_access_key) for c in alpha.credentials] == [
        (AKID_A, SECRET_A)
    ]
    assert alpha.ciphertext_metadata == b"key-v2"  # the marker is added by the service
    assert (root.name, root.uri_prefix, root.uri_path) == ("default", "", "/kms/xks/v1")
    assert root.external_key_ids == frozenset({"root-key"})
    assert [c.access_key_id for c in root.credentials] == [AKID_B]


def test_tls_sample_report(tmp_path: Path) -> None:
    tls_files(tmp_path)
    result = import_sample_settings(write(tmp_path, TLS_SAMPLE), working_dir=tmp_path)
    report = result.report
    severities = [line.split(":", 1)[0] for line in report]
    assert severities == sorted(severities, key=["ACTION", "CHANGED", "DROPPED", "NOTE"].index)
    assert has(report, "ACTION", "token_label", TOKEN_LABEL_PLACEHOLDER)
    assert has(report, "ACTION", "secret_access_key_file", "pin_file")
    assert has(report, "ACTION", "health-check")
    assert has(report, "ACTION", "Oso", "policy.polar", "Cedar")
    assert has(report, "CHANGED", "pkcs11-logger")
    assert has(report, "CHANGED", "~XK1key-v2")
    assert has(report, "CHANGED", "health_port = 8080")
    assert has(report, "CHANGED", "eu-west-1", "region")
    assert has(report, "DROPPED", "tcp_keepalive")
    assert has(report, "DROPPED", "session_pool_max_size")
    assert has(report, "DROPPED", "rotation_kind")
    assert has(report, "NOTE", "compatibility", "aws-sample")
    assert not has(report, "relative paths")  # resolved against working_dir
    for secret in (SECRET_A, SECRET_B, PIN, "1234"):
        assert all(secret not in line for line in report)
    # The report is also the config's header, as comments.
    assert "#   ACTION: hsm.token_label" in result.config_toml
    assert tomllib.loads(result.config_toml)["hsm"]["token_label"] == TOKEN_LABEL_PLACEHOLDER


def test_relative_paths_are_kept_and_reported(tmp_path: Path) -> None:
    settings_dir = tmp_path / "configuration"
    settings_dir.mkdir()
    result = import_sample_settings(write(settings_dir, TLS_SAMPLE), token_label="t")
    document = tomllib.loads(result.config_toml)
    assert document["tls"]["cert_file"] == "tls/cert.pem"
    assert has(result.report, "ACTION", "relative paths", "tls.tls_cert_pem")
    # Loads where the config's directory holds them (our rule for relative paths).
    tls_files(tmp_path)
    assert load(result, tmp_path).tls is not None


def test_plain_http_sample(tmp_path: Path) -> None:
    result = import_sample_settings(write(tmp_path, PLAIN_SAMPLE), token_label="xks")
    config = load(result, tmp_path)
    assert config.tls is None and config.server.allow_plain_http
    assert config.server.health_port is None  # ping port 80 = API port 80
    assert config.log_level == "debug"
    [store] = config.key_stores  # the store with empty credentials is skipped
    assert store.uri_prefix == "/example/uri/path/prefix"
    assert store.external_key_ids == frozenset({"foo", "bar"})
    assert store.ciphertext_metadata is None
    assert config.limits.max_plaintext_bytes == 65536  # covers the sample's 6144 bytes
    report = result.report
    assert has(report, "ACTION", "allow_plain_http")
    assert has(report, "CHANGED", "/ping", "health_port")
    assert has(report, "DROPPED", "external_key_stores[0]", "skipped")
    assert has(report, "DROPPED", "'not a key id'")
    assert has(report, "CHANGED", "DEBUG", "info")
    assert has(report, "NOTE", "max_plaintext_in_base64 = 8192")


def test_unknown_sample_keys_are_reported(tmp_path: Path) -> None:
    text = PLAIN_SAMPLE.replace("[limits]", "[limits]\nmax_ciphertext = 3") + "\n[extra]\nx = 1\n"
    report = import_sample_settings(write(tmp_path, text), token_label="t").report
    assert has(report, "NOTE", "limits.max_ciphertext", "ignored")
    assert has(report, "NOTE", "(top level).extra")


def test_large_plaintext_limit_is_carried_with_a_body_cap(tmp_path: Path) -> None:
    text = PLAIN_SAMPLE.replace(
        "max_plaintext_in_base64 = 8192", "max_plaintext_in_base64 = 400000"
    )
    config = load(import_sample_settings(write(tmp_path, text), token_label="t"), tmp_path)
    assert config.limits.max_plaintext_bytes == 300000
    assert config.server.max_body_bytes >= 400000 + 87380


@pytest.mark.parametrize(
    ("metadata_b64", "carried"),
    [
        ("djAuMC4x", "v0.0.1"),  # printable, fits after the marker
        ("MDEyMzQ1Njc4OWFiY2RlZmc=", None),  # 17 bytes: too long after the 4-byte marker
        ("/wAB", None),  # binary
    ],
)
def test_sample_ciphertext_metadata(tmp_path: Path, metadata_b64: str, carried: str | None) -> None:
    text = PLAIN_SAMPLE.replace(
        'service = "kms-xks-proxy"',
        f'service = "kms-xks-proxy"\nciphertext_metadata_b64 = "{metadata_b64}"',
    )
    result = import_sample_settings(write(tmp_path, text), token_label="t")
    [store] = tomllib.loads(result.config_toml)["key_stores"]
    assert store.get("ciphertext_metadata") == carried
    if carried is None:
        assert has(result.report, "DROPPED", "ciphertext_metadata_b64", "marker only")
    load(result, tmp_path)


@pytest.mark.parametrize(
    ("can_generate", "zero_iv", "word"), [(True, True, "CloudHSM"), (True, False, "Luna")]
)
def test_hsm_generated_ivs_need_attention(
    tmp_path: Path, can_generate: bool, zero_iv: bool, word: str
) -> None:
    text = PLAIN_SAMPLE.replace(
        "can_generate_iv = false\nis_zero_iv_required = false",
        f"can_generate_iv = {str(can_generate).lower()}\n"
        f"is_zero_iv_required = {str(zero_iv).lower()}",
    )
    report = import_sample_settings(write(tmp_path, text), token_label="t").report
    assert has(report, "ACTION", "can_generate_iv", word)


def test_mtls_name_that_kms_does_not_present(tmp_path: Path) -> None:
    tls_files(tmp_path)
    text = TLS_SAMPLE.replace(
        "cks.kms.eu-west-1.amazonaws.com", "eu-west-1.alpha.cks.kms.aws.internal.amazonaws.com"
    )
    result = import_sample_settings(write(tmp_path, text), working_dir=tmp_path)
    assert has(result.report, "ACTION", "client_names", "cks.kms.<region>.amazonaws.com")


def test_control_characters_survive(tmp_path: Path) -> None:
    text = PLAIN_SAMPLE.replace('user_pin = "1234"', 'user_pin = "a\\tb\\u007fc\\u0001"')
    result = import_sample_settings(write(tmp_path, text), token_label='lab"el')
    assert load(result, tmp_path).hsm.pin == "a\tb\x7fc\x01"
    assert load(result, tmp_path).hsm.token_label == 'lab"el'


# ----------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (  # both stores share an access key id: ours picks the key store by it
            'sigv4_access_key_id = ""\nsigv4_secret_access_key = ""',
            f'sigv4_access_key_id = "{AKID_A}"\nsigv4_secret_access_key = "{SECRET_B}"',
            "also used by",
        ),
        (
            f'sigv4_access_key_id = "{AKID_A}"',
            'sigv4_access_key_id = ""',
            "no key store has a usable credential",
        ),
        (
            'service = "kms-xks-proxy"',
            'service = "kms-xks-proxy"\nciphertext_metadata_b64 = "dn5YSzE="',  # "v~XK1"
            "reserves",
        ),
        (
            'service = "kms-xks-proxy"',
            'service = "kms-xks-proxy"\nciphertext_metadata_b64 = "djAuMC4x="',
            "base64",
        ),
        ("is_tls_enabled = false", "is_tls_enabled = true", "[tls]: missing"),
        ('PKCS11_HSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"', "", "PKCS11_HSM_MODULE"),
        ('uri_path_prefix = ""', 'uri_path_prefix = "/example/uri/path/prefix"', "same as"),
        ('uri_path_prefix = ""', 'uri_path_prefix = "/has space"', "may only contain"),
    ],
)
def test_refusals(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert old in PLAIN_SAMPLE
    text = PLAIN_SAMPLE.replace(old, new, 1)
    with pytest.raises(SampleSettingsError, match=message.replace("[", r"\[")):
        import_sample_settings(write(tmp_path, text), token_label="t")


def test_refuses_what_is_not_toml(tmp_path: Path) -> None:
    with pytest.raises(SampleSettingsError, match="not valid TOML"):
        import_sample_settings(write(tmp_path, "[server\nip = 1"))
    with pytest.raises(SampleSettingsError, match="cannot read"):
        import_sample_settings(tmp_path / "missing.toml")
