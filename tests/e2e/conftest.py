"""A real `xks-proxy serve` process on a real SoftHSMv2 token, shared by the e2e tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from e2e.proxy import ProxyProcess, free_port, start_proxy

PREFIX = "example/uri/path/prefix"
OTHER_PREFIX = "other/store"
# Two live credentials on the main key store (spec: SigV4 credentials rotation).
CREDENTIAL = ("BETWEEN2TENAND3TENCHARACTERS", "PleaseReplaceThisWithSomeSecretOfLength43To64")
SECOND_CREDENTIAL = (
    "ROTATEDKEYIDABCDEFGHIJ234567",
    "c2Vjb25kLXNlY3JldC1mb3ItdGhlLXJvdGF0aW9uLXRlc3Q=",
)
OTHER_CREDENTIAL = (
    "OTHERSTOREKEYIDABCDEFGH2345",
    "b3RoZXItc3RvcmUtc2VjcmV0LXZhbHVlLWZvci10ZXN0cw==",
)
KEY_IDS = ("foo", "encrypt_only_key", "decrypt_only_key", "impotent_key", "not_on_the_hsm")


@dataclass
class Proxy:
    process: ProxyProcess
    prefix: str = "/" + PREFIX

    def path(self, tail: str, prefix: str | None = None) -> str:
        return f"{self.prefix if prefix is None else prefix}/kms/xks/v1/{tail}"

    def call(self, tail: str, body: dict[str, Any] | bytes, **kwargs: Any) -> Any:
        kwargs.setdefault("credential", CREDENTIAL)
        return self.process.request("POST", self.path(tail), body, **kwargs)


def write_config(
    directory: Path, token: Any, port: int, *, pin: str | None = None, extra: str = ""
) -> Path:
    secret_file = directory / "second-secret"
    secret_file.write_text(SECOND_CREDENTIAL[1] + "\n")
    os.chmod(secret_file, 0o600)
    environment = "\n".join(f'{k} = "{v}"' for k, v in token.environment.items())
    key_ids = ", ".join(f'"{k}"' for k in KEY_IDS)
    config = directory / "config.toml"
    config.write_text(
        f"""
[server]
port = {port}
allow_plain_http = true
max_body_bytes = 65536

[hsm]
module = "{token.module_path}"
token_label = "{token.token_label}"
pin = "{pin if pin is not None else token.pin}"
health_check_key = "xks-health-check"

[hsm.environment]
{environment}

[proxy]
fleet_size = 3

[limits]
max_aad_bytes = 16384

[[key_stores]]
name = "main"
uri_prefix = "{PREFIX}"
external_key_ids = [{key_ids}]

[[key_stores.credentials]]
access_key_id = "{CREDENTIAL[0]}"
secret_access_key = "{CREDENTIAL[1]}"

[[key_stores.credentials]]
access_key_id = "{SECOND_CREDENTIAL[0]}"
secret_access_key_file = "{secret_file}"

[[key_stores]]
name = "other"
uri_prefix = "{OTHER_PREFIX}"
ciphertext_metadata = "xks:v1"

[[key_stores.credentials]]
access_key_id = "{OTHER_CREDENTIAL[0]}"
secret_access_key = "{OTHER_CREDENTIAL[1]}"
{extra}
"""
    )
    os.chmod(config, 0o600)
    return config


@pytest.fixture(scope="session")
def proxy(softhsm_token: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    directory = tmp_path_factory.mktemp("proxy")
    port = free_port()
    config = write_config(directory, softhsm_token, port)
    process = start_proxy(config, directory / "proxy.log", port)
    try:
        yield Proxy(process)
    finally:
        process.stop()
