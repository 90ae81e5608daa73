"""Several HSMs and the key tooling, as an operator runs them: the real server with two
SoftHSMv2 tokens holding the same keys, and `xks-proxy keys ...`."""

from __future__ import annotations

import base64
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from e2e.conftest import CREDENTIAL, PREFIX, write_config
from e2e.proxy import free_port, start_proxy
from xks_proxy.keymanager.softhsm import DEMO_KEYS, HEALTH_CHECK_KEY_LABEL, provision_softhsm_token

pytestmark = [pytest.mark.e2e, pytest.mark.hsm]

META = {
    "awsPrincipalArn": "arn:aws:iam::1:user/a",
    "kmsKeyArn": "arn:aws:kms:us-east-1:1:key/k",
    "kmsOperation": "Encrypt",
    "kmsRequestId": "fleet",
}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xks_proxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_two_hsms_serve_one_fleet(tmp_path: Path) -> None:
    """Two tokens with the same key values: health lists both, ciphertexts made on either
    decrypt on the other, and when one token breaks under traffic requests keep being
    served by the other and health shows the broken one UNAVAILABLE."""
    values = {key.label: secrets.token_bytes(32) for key in DEMO_KEYS}
    values[HEALTH_CHECK_KEY_LABEL] = secrets.token_bytes(32)
    store = tmp_path / "softhsm"
    tokens = [
        provision_softhsm_token(
            store,
            token_label=label,
            pin="1234",
            so_pin="5678",
            keys=DEMO_KEYS,
            health_check_key_label=HEALTH_CHECK_KEY_LABEL,
            key_values=values,
        )
        for label in ("fleet-a", "fleet-b")
    ]
    port = free_port()
    config = write_config(tmp_path, tokens[0], port)
    text = config.read_text()
    hsm_start = text.index("[hsm]")
    hsm_end = text.index("[proxy]")
    hsm_block = text[hsm_start:hsm_end]
    second = hsm_block.replace('token_label = "fleet-a"', 'token_label = "fleet-b"')
    blocks = hsm_block.replace("[hsm]", '[[hsm]]\nname = "hsm-a"').replace(
        "[hsm.environment]", "[hsm.environment]"
    ) + second.replace("[hsm]", '[[hsm]]\nname = "hsm-b"')
    config.write_text(
        text[:hsm_start] + blocks + "[health]\ninterval_seconds = 2\n\n" + text[hsm_end:]
    )
    proxy = start_proxy(config, tmp_path / "proxy.log", port)
    try:
        health = proxy.request(
            "POST",
            f"/{PREFIX}/kms/xks/v1/health",
            {"requestMetadata": {"kmsRequestId": "h", "kmsOperation": "KmsHealthCheck"}},
            credential=CREDENTIAL,
        )
        assert health.status == 200, health.body

        def health_now() -> list[dict[str, str]]:
            reply = proxy.request(
                "POST",
                f"/{PREFIX}/kms/xks/v1/health",
                {"requestMetadata": {"kmsRequestId": "h", "kmsOperation": "KmsHealthCheck"}},
                credential=CREDENTIAL,
            )
            members: list[dict[str, str]] = reply.json["ekmFleetDetails"]
            return members

        fleet = health.json["ekmFleetDetails"]
        assert [(m["id"], m["healthStatus"]) for m in fleet] == [
            ("hsm-a", "ACTIVE"),
            ("hsm-b", "ACTIVE"),
        ]

        def round_trip(index: int) -> bool:
            plaintext = index.to_bytes(4, "big") * 8
            encrypted = proxy.request(
                "POST",
                f"/{PREFIX}/kms/xks/v1/keys/foo/encrypt",
                {
                    "requestMetadata": META,
                    "plaintext": base64.b64encode(plaintext).decode(),
                    "encryptionAlgorithm": "AES_GCM",
                },
                credential=CREDENTIAL,
            )
            if encrypted.status != 200:
                return False
            body = {
                "requestMetadata": META,
                "encryptionAlgorithm": "AES_GCM",
                **{
                    k: encrypted.json[k]
                    for k in ("ciphertext", "initializationVector", "authenticationTag")
                },
            }
            decrypted = proxy.request(
                "POST", f"/{PREFIX}/kms/xks/v1/keys/foo/decrypt", body, credential=CREDENTIAL
            )
            return (
                decrypted.status == 200
                and base64.b64decode(decrypted.json["plaintext"]) == plaintext
            )

        # Round robin: consecutive calls land on both tokens, and every one decrypts.
        assert all(round_trip(i) for i in range(20))
        log = proxy.log_text()
        assert "hsm-a" in log and "hsm-b" in log

        # Break token b under traffic (its files vanish). Repair after a token vanished
        # from SoftHSM is covered in-process (tests/integration/test_failover_softhsm.py);
        # at the process level its timing depends on the re-initialisation back-off.
        token_b = next(
            d
            for d in (store / "tokens").iterdir()
            if b"fleet-b" in (d / "token.object").read_bytes()
        )
        results: list[bool] = []
        stop = threading.Event()

        def traffic() -> None:
            index = 1000
            while not stop.is_set():
                index += 1
                results.append(round_trip(index))

        threads = [threading.Thread(target=traffic) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.5)
            removed = store / "removed-fleet-b"  # outside the token directory: gone
            token_b.rename(removed)
            deadline = time.monotonic() + 15
            states: dict[str, str] = {}
            while time.monotonic() < deadline:
                states = {m["id"]: m["healthStatus"] for m in health_now()}
                if states.get("hsm-b") == "UNAVAILABLE":
                    break
                time.sleep(0.2)
            assert states["hsm-b"] == "UNAVAILABLE", states
            assert states["hsm-a"] in ("ACTIVE", "DEGRADED"), states  # serving meanwhile
            time.sleep(1.0)  # traffic keeps flowing on hsm-a alone
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        assert len(results) > 20
        # While hsm-b is being found broken, a few requests can fail: both test tokens
        # share one PKCS#11 module, whose re-initialisation briefly interrupts hsm-a too
        # (see docs/operations.md). Once hsm-b is marked UNAVAILABLE, hsm-a alone must
        # serve every request.
        assert all(round_trip(5000 + index) for index in range(30))
    finally:
        proxy.stop()


def test_key_tooling_cli(softhsm_token: Any, tmp_path: Path) -> None:
    config = write_config(tmp_path, softhsm_token, free_port())
    label = f"cli-key-{secrets.token_hex(3)}"
    created = cli("keys", "create", "--config", str(config), "--label", label, "--usage", "encrypt")
    assert created.returncode == 0, created.stderr
    assert label in created.stdout
    again = cli("keys", "create", "--config", str(config), "--label", label)
    assert again.returncode == 1 and "exists" in again.stderr
    bad = cli("keys", "create", "--config", str(config), "--label", "bad label")
    assert bad.returncode == 1
    listed = cli("keys", "list", "--config", str(config))
    assert listed.returncode == 0
    assert (
        label in listed.stdout
        and "foo" in listed.stdout
        and HEALTH_CHECK_KEY_LABEL in listed.stdout
    )
    shown = cli("keys", "show", "--config", str(config), "--label", label)
    assert shown.returncode == 0 and label in shown.stdout
    missing = cli("keys", "show", "--config", str(config), "--label", "nope-not-here")
    assert missing.returncode == 1
    # The proxy sees the new key with the usage it was created with.
    port = free_port()
    config = write_config(tmp_path, softhsm_token, port)
    config.write_text(
        config.read_text().replace('"not_on_the_hsm"', f'"not_on_the_hsm", "{label}"')
    )
    proxy = start_proxy(config, tmp_path / "proxy.log", port)
    try:
        response = proxy.request(
            "POST",
            f"/{PREFIX}/kms/xks/v1/keys/{label}/metadata",
            {"requestMetadata": META},
            credential=CREDENTIAL,
        )
        assert response.json == {
            "keySpec": "AES_256",
            "keyUsage": ["ENCRYPT"],
            "keyStatus": "ENABLED",
        }
    finally:
        proxy.stop()
