"""Migration from the AWS sample proxy, end to end: `xks-proxy import-config`, and a
compatibility-mode key store decrypting what the sample made (spec: Encrypt NOTE on
ciphertextMetadata — mark which construction made a ciphertext)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from e2e.conftest import CREDENTIAL, OTHER_CREDENTIAL, OTHER_PREFIX, PREFIX, write_config
from e2e.proxy import free_port, start_proxy
from xks_proxy.keymanager.softhsm import DEMO_KEYS, HEALTH_CHECK_KEY_LABEL, provision_softhsm_token

pytestmark = [pytest.mark.e2e, pytest.mark.hsm]

META = {
    "awsPrincipalArn": "arn:aws:iam::1:user/a",
    "kmsKeyArn": "arn:aws:kms:us-east-1:1:key/k",
    "kmsOperation": "Decrypt",
    "kmsRequestId": "migrate",
}


def sample_ciphertext(key: bytes, plaintext: bytes, aad: bytes) -> dict[str, str]:
    """What the AWS sample returned for Encrypt: the HSM saw u16be(len AAD) ||
    SHA-256(AAD) || u8(0) (no metadata), written here independently of our code."""
    hsm_aad = len(aad).to_bytes(2, "big") + hashlib.sha256(aad).digest() + b"\x00"
    iv = os.urandom(12)
    sealed = AESGCM(key).encrypt(iv, plaintext, hsm_aad)
    return {
        "ciphertext": base64.b64encode(sealed[:-16]).decode(),
        "initializationVector": base64.b64encode(iv).decode(),
        "authenticationTag": base64.b64encode(sealed[-16:]).decode(),
    }


def test_compatibility_mode_decrypts_sample_ciphertexts(tmp_path: Path) -> None:
    values = {key.label: secrets.token_bytes(32) for key in DEMO_KEYS}
    values[HEALTH_CHECK_KEY_LABEL] = secrets.token_bytes(32)
    token = provision_softhsm_token(
        tmp_path / "softhsm",
        token_label="migrate",
        pin="1234",
        so_pin="5678",
        keys=DEMO_KEYS,
        health_check_key_label=HEALTH_CHECK_KEY_LABEL,
        key_values=values,
    )
    port = free_port()
    config = write_config(tmp_path, token, port)
    # The "other" key store runs in compatibility mode; "main" follows the spec only.
    config.write_text(
        config.read_text().replace('ciphertext_metadata = "xks:v1"', 'compatibility = "aws-sample"')
    )
    proxy = start_proxy(config, tmp_path / "proxy.log", port)
    aad = b"project=nile"
    old = sample_ciphertext(values["foo"], b"k" * 32, aad)
    body = {
        "requestMetadata": META,
        "encryptionAlgorithm": "AES_GCM",
        "additionalAuthenticatedData": base64.b64encode(aad).decode(),
        **old,
    }
    try:
        compat = proxy.request(
            "POST",
            f"/{OTHER_PREFIX}/kms/xks/v1/keys/foo/decrypt",
            body,
            credential=OTHER_CREDENTIAL,
        )
        assert compat.status == 200, compat.body
        assert base64.b64decode(compat.json["plaintext"]) == b"k" * 32
        spec_only = proxy.request(
            "POST", f"/{PREFIX}/kms/xks/v1/keys/foo/decrypt", body, credential=CREDENTIAL
        )
        assert (
            spec_only.status == 400 and spec_only.json["errorName"] == "InvalidCiphertextException"
        )

        # New encryptions in compat mode follow the spec and carry the marker.
        encrypted = proxy.request(
            "POST",
            f"/{OTHER_PREFIX}/kms/xks/v1/keys/foo/encrypt",
            {
                "requestMetadata": {**META, "kmsOperation": "Encrypt"},
                "plaintext": base64.b64encode(b"n" * 32).decode(),
                "encryptionAlgorithm": "AES_GCM",
                "additionalAuthenticatedData": base64.b64encode(aad).decode(),
            },
            credential=OTHER_CREDENTIAL,
        )
        assert encrypted.status == 200
        assert base64.b64decode(encrypted.json["ciphertextMetadata"]).startswith(b"~XK1")
        new_body = {
            **body,
            **{
                k: encrypted.json[k]
                for k in (
                    "ciphertext",
                    "initializationVector",
                    "authenticationTag",
                    "ciphertextMetadata",
                )
            },
        }
        again = proxy.request(
            "POST",
            f"/{OTHER_PREFIX}/kms/xks/v1/keys/foo/decrypt",
            new_body,
            credential=OTHER_CREDENTIAL,
        )
        assert again.status == 200 and base64.b64decode(again.json["plaintext"]) == b"n" * 32
    finally:
        proxy.stop()
    constructions = [
        json.loads(line).get("aadConstruction")
        for line in proxy.log_text().splitlines()
        if line.startswith("{")
    ]
    assert "aws-sample" in constructions and "spec" in constructions


def test_import_config_cli(tmp_path: Path) -> None:
    settings = tmp_path / "settings.toml"
    settings.write_text(
        """
[server]
ip = "0.0.0.0"
port = 80
region = "us-east-1"
service = "kms-xks-proxy"

[server.tcp_keepalive]
tcp_keepalive_secs = 60

[[external_key_stores]]
uri_path_prefix = "/example/uri/path/prefix"
sigv4_access_key_id = "BETWEEN2TENAND3TENCHARACTERS"
sigv4_secret_access_key = "PleaseReplaceThisWithSomeSecretOfLength43To64"
xks_key_id_set = ["foo", "bar"]

[pkcs11]
session_pool_max_size = 30
session_pool_timeout_milli = 0
session_eager_close = false
user_pin = "1234"
PKCS11_HSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
context_read_timeout_milli = 100

[limits]
max_plaintext_in_base64 = 8192
max_aad_in_base64 = 16384

[logging]
is_stdout_writer_enabled = true
is_file_writer_enabled = false
level = "INFO"
"""
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "xks_proxy",
            "import-config",
            str(settings),
            "--token-label",
            "my-token",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert 'compatibility = "aws-sample"' in result.stdout
    assert "BETWEEN2TENAND3TENCHARACTERS" in result.stdout
    assert result.stderr.strip()  # the report of what changed or has no equivalent
