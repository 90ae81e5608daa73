"""``xks-proxy demo``: a ready-to-use proxy on a SoftHSMv2 token it provisions itself.

Everything lives under one directory and is re-used on the next run (the token and its
keys are never regenerated, so ciphertexts made yesterday still decrypt):

    DIR/softhsm/           SoftHSMv2 token store and softhsm2.conf
    DIR/hsm-pin            user PIN (mode 600)
    DIR/sigv4-*            SigV4 access key id and secret access key (mode 600)
    DIR/config.toml        the proxy configuration, pointing at the files above
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from xks_proxy.config import Credential
from xks_proxy.credentials import new_credential
from xks_proxy.keymanager.softhsm import (
    DEMO_KEYS,
    HEALTH_CHECK_KEY_LABEL,
    provision_softhsm_token,
)

DEMO_TOKEN_LABEL = "xks-proxy-demo"  # noqa: S105 - a token label, not a secret
DEFAULT_URI_PREFIX = "demo"
DEMO_CLIENT_CN = "cks.kms.us-east-1.amazonaws.com"  # what KMS presents in us-east-1


@dataclass(frozen=True, slots=True)
class DemoSetup:
    config_path: Path
    uri_prefix: str
    credential: Credential
    host: str
    port: int


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, without a window where others could."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _load_or_make_credential(
    directory: Path, access_key_id: str | None, secret: str | None
) -> tuple[Credential, Path]:
    akid_path = directory / "sigv4-access-key-id"
    secret_path = directory / "sigv4-secret-access-key"
    if access_key_id and secret:
        credential = Credential(access_key_id, secret)
    elif akid_path.exists() and secret_path.exists():
        credential = Credential(
            akid_path.read_text(encoding="utf-8").strip(),
            secret_path.read_text(encoding="utf-8").strip(),
        )
    else:
        credential = new_credential()
    write_private(akid_path, credential.access_key_id + "\n")
    write_private(secret_path, credential.secret_access_key + "\n")
    return credential, secret_path


def prepare_demo(
    directory: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    uri_prefix: str = DEFAULT_URI_PREFIX,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    workers: int = 1,
    tls: bool = False,
    mtls: bool = False,
) -> DemoSetup:
    """Provision (idempotently) the token, keys, credentials and config under directory."""
    directory = directory.expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    pin_path = directory / "hsm-pin"
    if not pin_path.exists():
        write_private(pin_path, secrets.token_hex(16))
    pin = pin_path.read_text(encoding="utf-8").strip()
    token = provision_softhsm_token(
        directory / "softhsm",
        token_label=DEMO_TOKEN_LABEL,
        pin=pin,
        so_pin=secrets.token_hex(16),
        keys=DEMO_KEYS,
        health_check_key_label=HEALTH_CHECK_KEY_LABEL,
    )
    credential, secret_path = _load_or_make_credential(directory, access_key_id, secret_access_key)
    config_path = directory / "config.toml"
    server_section = "allow_plain_http = true   # demo on loopback only: KMS itself requires HTTPS"
    tls_section = ""
    if tls or mtls:
        from xks_proxy.server.tls import make_demo_pki

        names = dict.fromkeys(["localhost", "127.0.0.1", host])
        names.pop("0.0.0.0", None)  # noqa: S104 - a bind address is no certificate name
        pki = make_demo_pki(directory / "pki", server_names=tuple(names), client_cn=DEMO_CLIENT_CN)
        server_section = "allow_plain_http = false"
        tls_section = (
            "\n[tls]\n"
            f"cert_file = {_toml_string(str(pki.server_cert))}\n"
            f"key_file = {_toml_string(str(pki.server_key))}\n"
        )
        if mtls:
            tls_section += (
                f"client_ca_file = {_toml_string(str(pki.ca_cert))}\n"
                f"client_names = [{_toml_string(DEMO_CLIENT_CN)}]\n"
            )
    key_ids = ", ".join(_toml_string(key.label) for key in DEMO_KEYS)
    environment = "\n".join(
        f"{name} = {_toml_string(value)}" for name, value in token.environment.items()
    )
    write_private(
        config_path,
        f"""# Written by `xks-proxy demo`; edit freely, the demo rewrites it on each run.
[server]
host = {_toml_string(host)}
port = {port}
workers = {workers}
{server_section}
{tls_section}
[hsm]
module = {_toml_string(token.module_path)}
token_label = {_toml_string(token.token_label)}
pin_file = {_toml_string(str(pin_path))}
health_check_key = {_toml_string(HEALTH_CHECK_KEY_LABEL)}

[hsm.environment]
{environment}

[[key_stores]]
name = "demo"
uri_prefix = {_toml_string(uri_prefix)}
external_key_ids = [{key_ids}]

[[key_stores.credentials]]
access_key_id = {_toml_string(credential.access_key_id)}
secret_access_key_file = {_toml_string(str(secret_path))}
""",
    )
    return DemoSetup(config_path, uri_prefix, credential, host, port)
