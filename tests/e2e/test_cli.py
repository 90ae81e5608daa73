"""The command line as a user runs it: start-up failures, the demo, credential tools."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from e2e.conftest import PREFIX, write_config
from e2e.proxy import free_port, run_cli, start_proxy

pytestmark = [pytest.mark.e2e]


xks_proxy = run_cli


# ---------------------------------------------------------------- start-up failures


@pytest.mark.hsm
def test_wrong_pin_stops_start_up_clearly(softhsm_token: Any, tmp_path: Path) -> None:
    wrong_pin = "777777-not-the-pin"
    config = write_config(tmp_path, softhsm_token, free_port(), pin=wrong_pin)
    result = xks_proxy("serve", "--config", str(config))
    assert result.returncode == 1
    assert "cannot start" in result.stderr and "PIN" in result.stderr
    assert wrong_pin not in result.stdout + result.stderr
    assert softhsm_token.pin not in result.stdout + result.stderr


@pytest.mark.hsm
def test_wrong_module_path_stops_start_up_clearly(softhsm_token: Any, tmp_path: Path) -> None:
    config = write_config(tmp_path, softhsm_token, free_port())
    text = config.read_text().replace(softhsm_token.module_path, "/nonexistent/libpkcs11.so")
    config.write_text(text)
    result = xks_proxy("serve", "--config", str(config))
    assert result.returncode == 1
    assert "/nonexistent/libpkcs11.so" in result.stderr


@pytest.mark.hsm
def test_unknown_token_label_lists_the_tokens(softhsm_token: Any, tmp_path: Path) -> None:
    config = write_config(tmp_path, softhsm_token, free_port())
    config.write_text(
        config.read_text().replace(f'"{softhsm_token.token_label}"', '"no-such-token"')
    )
    result = xks_proxy("serve", "--config", str(config))
    assert result.returncode == 1
    assert "no-such-token" in result.stderr and softhsm_token.token_label in result.stderr


def test_invalid_config_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[server]\nport = "eighty"\n[hsm]\nmodule="x"\ntoken_label="t"\npin="1"\n')
    result = xks_proxy("serve", "--config", str(config))
    assert result.returncode == 2
    assert "server.port: must be an integer" in result.stderr


def test_plain_http_needs_explicit_opt_in(softhsm_token: Any, tmp_path: Path) -> None:
    config = write_config(tmp_path, softhsm_token, free_port())
    config.write_text(config.read_text().replace("allow_plain_http = true", ""))
    result = xks_proxy("serve", "--config", str(config))
    assert result.returncode != 0
    assert "allow_plain_http" in result.stderr or "tls" in result.stderr.lower()


# ---------------------------------------------------------------- several workers


@pytest.mark.hsm
def test_two_workers_serve(softhsm_token: Any, tmp_path: Path) -> None:
    """Each worker opens its own PKCS#11 sessions after it is spawned."""
    from e2e.conftest import CREDENTIAL

    port = free_port()
    config = write_config(tmp_path, softhsm_token, port)
    config.write_text(config.read_text().replace("[server]\n", "[server]\nworkers = 2\n"))
    proxy = start_proxy(config, tmp_path / "proxy.log", port)
    try:
        body = {"requestMetadata": {"kmsRequestId": "w", "kmsOperation": "KmsHealthCheck"}}
        statuses = set()
        for _ in range(40):
            response = proxy.request(
                "POST", f"/{PREFIX}/kms/xks/v1/health", body, credential=CREDENTIAL
            )
            statuses.add(response.status)
        assert statuses == {200}
    finally:
        assert proxy.stop() in (0, -15)
    pids = {
        line.get("pid")
        for line in _json_lines(proxy.log_text())
        if line.get("logger") == "xks_proxy.request"
    }
    assert pids  # request lines carry the worker pid


def _json_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


# ---------------------------------------------------------------- the demo


@pytest.mark.hsm
def test_demo_is_idempotent_and_serves_curl(tmp_path: Path) -> None:
    """`xks-proxy demo` provisions once, keeps keys and credentials, and a real
    `curl --aws-sigv4` round trip works against it."""
    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
    demo_dir = tmp_path / "demo"
    port = free_port()
    first = xks_proxy("demo", "--dir", str(demo_dir), "--port", str(port), "--prepare-only")
    assert first.returncode == 0, first.stderr
    second = xks_proxy("demo", "--dir", str(demo_dir), "--port", str(port), "--prepare-only")
    assert second.returncode == 0, second.stderr
    akid = re.search(r"access key id:\s+(\S+)", first.stdout)
    assert akid is not None
    assert f"access key id:     {akid.group(1)}" in second.stdout  # same credentials kept
    assert (demo_dir / "hsm-pin").stat().st_mode & 0o077 == 0
    assert (demo_dir / "sigv4-secret-access-key").stat().st_mode & 0o077 == 0

    config = demo_dir / "config.toml"
    proxy = start_proxy(config, tmp_path / "demo.log", port)
    try:
        curl_line = next(
            line for line in second.stdout.splitlines() if line.strip().startswith("curl ")
        )
        encrypted = subprocess.run(
            [*shlex.split(curl_line), "-s"], capture_output=True, text=True, check=True
        )
        body = json.loads(encrypted.stdout)
        assert set(body) >= {"ciphertext", "initializationVector", "authenticationTag"}
    finally:
        proxy.stop()

    # A third run still decrypts what the first token encrypted: keys were not regenerated.
    third = xks_proxy("demo", "--dir", str(demo_dir), "--port", str(port), "--prepare-only")
    assert third.returncode == 0
    proxy = start_proxy(config, tmp_path / "demo2.log", port)
    try:
        secret = (demo_dir / "sigv4-secret-access-key").read_text().strip()
        decrypt = {
            "requestMetadata": {
                "awsPrincipalArn": "arn:aws:iam::123456789012:user/Alice",
                "kmsKeyArn": "arn:aws:kms:us-east-1:123456789012:key/demo",
                "kmsOperation": "Decrypt",
                "kmsRequestId": "r",
            },
            "ciphertext": body["ciphertext"],
            "initializationVector": body["initializationVector"],
            "authenticationTag": body["authenticationTag"],
            "encryptionAlgorithm": "AES_GCM",
        }
        response = proxy.request(
            "POST", "/demo/kms/xks/v1/keys/foo/decrypt", decrypt, credential=(akid.group(1), secret)
        )
        assert response.status == 200, response.body
        assert response.json == {"plaintext": "SGVsbG8gV29ybGQh"}
    finally:
        proxy.stop()


# ---------------------------------------------------------------- credentials


def test_credentials_new_meets_the_spec_rules() -> None:
    """Spec Appendix A: access key id 20-30 of A-Z2-7; secret 43-64 of A-Za-z0-9/+=."""
    seen = set()
    for _ in range(3):
        result = xks_proxy("credentials", "new", "--json")
        assert result.returncode == 0
        credential = json.loads(result.stdout)
        assert re.fullmatch(r"[A-Z2-7]{20,30}", credential["AccessKeyId"])
        assert re.fullmatch(r"[A-Za-z0-9/+=]{43,64}", credential["RawSecretAccessKey"])
        seen.add(credential["RawSecretAccessKey"])
    assert len(seen) == 3


@pytest.mark.hsm
def test_kms_config_writes_the_console_file(softhsm_token: Any, tmp_path: Path) -> None:
    """Spec: XKS proxy configuration in AWS KMS console."""
    from e2e.conftest import CREDENTIAL, SECOND_CREDENTIAL

    config = write_config(tmp_path, softhsm_token, free_port())
    output = tmp_path / "kms.json"
    result = xks_proxy(
        "kms-config", "--config", str(config), "--key-store", "main", "--output", str(output)
    )
    assert result.returncode == 0, result.stderr
    assert output.stat().st_mode & 0o077 == 0
    assert json.loads(output.read_text()) == {
        "XksProxyUriPath": f"/{PREFIX}/kms/xks/v1",
        "XksProxyAuthenticationCredential": {
            "AccessKeyId": CREDENTIAL[0],
            "RawSecretAccessKey": CREDENTIAL[1],
        },
    }
    second = xks_proxy(
        "kms-config",
        "--config",
        str(config),
        "--key-store",
        "main",
        "--access-key-id",
        SECOND_CREDENTIAL[0],
    )
    assert (
        json.loads(second.stdout)["XksProxyAuthenticationCredential"]["RawSecretAccessKey"]
        == SECOND_CREDENTIAL[1]
    )
    missing = xks_proxy("kms-config", "--config", str(config), "--key-store", "nope")
    assert missing.returncode == 2 and "main" in missing.stderr
