"""Configuration validation: every error names the key path."""

import logging
import os
from pathlib import Path
from typing import Any

import pytest

from xks_proxy.config import ConfigError, load_config, parse_config

AKID = "AKIAI2SFODNN7EXAMPLEAB"
SECRET = "FYtE5EFA5FT0mCc3DrGUe2sti527BitkQ0Zr9MO9fvE"


def document(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "server": {"allow_plain_http": True},
        "hsm": {"module": "/usr/lib/softhsm/libsofthsm2.so", "token_label": "t", "pin": "1234"},
        "key_stores": [
            {
                "name": "a",
                "uri_prefix": "example/uri/path/prefix",
                "credentials": [{"access_key_id": AKID, "secret_access_key": SECRET}],
            }
        ],
    }
    doc.update(overrides)
    return doc


def parse(doc: dict[str, Any], tmp_path: Path | None = None) -> Any:
    return parse_config(doc, base_dir=tmp_path or Path("/"))


def test_minimal_config_and_defaults() -> None:
    config = parse(document())
    assert config.server.port == 8000 and config.server.workers == 1
    store = config.key_stores[0]
    assert store.uri_prefix == "/example/uri/path/prefix"
    assert store.uri_path == "/example/uri/path/prefix/kms/xks/v1"
    assert store.external_key_ids is None
    assert config.hsm.sessions == 1
    assert config.limits.max_aad_bytes == 65535


def test_secrets_never_appear_in_reprs() -> None:
    config = parse(document())
    text = repr(config)
    assert SECRET not in text and "1234" not in text
    assert "redacted" in text


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (lambda d: d["server"].update(port=70000), "server.port"),
        (lambda d: d["server"].update(port=True), "server.port"),
        (lambda d: d["server"].update(prot=1), "server.prot"),
        (lambda d: d.pop("hsm"), "hsm"),
        (lambda d: d["hsm"].pop("pin"), "hsm.pin"),
        (lambda d: d["hsm"].update(pin_env="X"), "hsm.pin"),
        (lambda d: d["hsm"].update(slot=0), "hsm.token_label"),
        (lambda d: d.update(key_stores=[]), "key_stores"),
        (lambda d: d["key_stores"][0].update(uri_prefix="a.b"), "key_stores[0].uri_prefix"),
        (lambda d: d["key_stores"][0].update(credentials=[]), "key_stores[0].credentials"),
        (
            lambda d: d["key_stores"][0]["credentials"][0].update(access_key_id="short"),
            "key_stores[0].credentials[0].access_key_id",
        ),
        (
            lambda d: d["key_stores"][0]["credentials"][0].update(secret_access_key="x" * 42),
            "key_stores[0].credentials[0].secret_access_key",
        ),
        (
            lambda d: d["key_stores"][0].update(external_key_ids=["ok", "b a d"]),
            "key_stores[0].external_key_ids[1]",
        ),
        (
            lambda d: d["key_stores"][0].update(ciphertext_metadata="m" * 21),
            "key_stores[0].ciphertext_metadata",
        ),
        (lambda d: d.update(limits={"max_plaintext_bytes": 100}), "limits"),
        (lambda d: d.update(logging={"level": "loud"}), "logging.level"),
    ],
)
def test_errors_name_the_key(change: Any, where: str) -> None:
    doc = document()
    change(doc)
    with pytest.raises(ConfigError) as caught:
        parse(doc)
    assert str(caught.value).startswith(where), str(caught.value)


def test_duplicate_prefix_and_access_key_are_rejected() -> None:
    doc = document()
    doc["key_stores"].append(dict(doc["key_stores"][0], name="b"))
    with pytest.raises(ConfigError, match=r"key_stores\[1\]\.uri_prefix: already used"):
        parse(doc)
    doc["key_stores"][1]["uri_prefix"] = "other"
    with pytest.raises(ConfigError, match=r"access_key_id: already used"):
        parse(doc)


def test_two_credentials_per_key_store() -> None:
    doc = document()
    doc["key_stores"][0]["credentials"].append(
        {"access_key_id": "B" * 20, "secret_access_key": SECRET[::-1]}
    )
    assert len(parse(doc).key_stores[0].credentials) == 2


def test_secret_from_env_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("XKS_TEST_SECRET", SECRET)
    secret_file = tmp_path / "pin"
    secret_file.write_text("98765\n")
    os.chmod(secret_file, 0o644)
    doc = document()
    doc["hsm"].pop("pin")
    doc["hsm"]["pin_file"] = "pin"  # relative to the config's directory
    cred = doc["key_stores"][0]["credentials"][0]
    cred.pop("secret_access_key")
    cred["secret_access_key_env"] = "XKS_TEST_SECRET"
    with caplog.at_level(logging.WARNING):
        config = parse(doc, tmp_path)
    assert config.hsm.pin == "98765"
    assert config.key_stores[0].credentials[0].secret_access_key == SECRET
    assert "accessible by group/others" in caplog.text
    monkeypatch.delenv("XKS_TEST_SECRET")
    with pytest.raises(ConfigError, match="secret_access_key_env: environment variable"):
        parse(doc, tmp_path)


def test_load_config_reports_toml_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


def test_hsm_recovery_pace_and_probation() -> None:
    # Issue 4: the PKCS#11 recovery pace and the failover probation are operator settings.
    default = parse(document())
    assert (default.hsm.recovery_interval, default.hsm.recovery_max_interval) == (1.0, 30.0)
    assert default.hsm.acquire_timeout == 1.0 and default.health.probation_seconds == 30.0
    doc = document(health={"probation_seconds": 5})
    doc["hsm"].update(
        recovery_interval_seconds=0.5, recovery_max_interval_seconds=4, acquire_timeout_seconds=0.2
    )
    config = parse(doc)
    assert (config.hsm.recovery_interval, config.hsm.recovery_max_interval) == (0.5, 4.0)
    assert config.hsm.acquire_timeout == 0.2 and config.health.probation_seconds == 5.0
    backwards = document()
    backwards["hsm"].update(recovery_interval_seconds=10, recovery_max_interval_seconds=2)
    with pytest.raises(ConfigError, match=r"hsm\.recovery_max_interval_seconds"):
        parse(backwards)
    zero = document()
    zero["hsm"].update(recovery_interval_seconds=0)
    with pytest.raises(ConfigError, match=r"hsm\.recovery_interval_seconds"):
        parse(zero)
