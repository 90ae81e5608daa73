"""Several HSMs and the key tooling, as an operator runs them: the real server with two
SoftHSMv2 tokens holding the same keys, and `xks-proxy keys ...`."""

from __future__ import annotations

import base64
import secrets
import shutil
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
    """Issue 4 / spec GetHealthStatus (ekmFleetDetails): two tokens with the same key
    values behind one proxy. Health lists both; ciphertexts made on either decrypt on
    the other; one token is broken under traffic and later repaired with **zero failed
    requests**, health showing it UNAVAILABLE and then ACTIVE again.

    Each HSM gets its own instance of the PKCS#11 module (hsm-b loads a copy of
    libsofthsm2), as two separate HSM appliances would: re-initialising hsm-b's module
    to rediscover its token must not touch hsm-a's sessions."""
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
    module_b = tmp_path / "libsofthsm2-hsm-b.so"
    shutil.copyfile(tokens[0].module_path, module_b)
    port = free_port()
    config = write_config(tmp_path, tokens[0], port)
    text = config.read_text()
    hsm_start = text.index("[hsm]")
    hsm_end = text.index("[proxy]")
    hsm_block = text[hsm_start:hsm_end]
    pace = "recovery_interval_seconds = 0.5\nrecovery_max_interval_seconds = 1.0\n"
    first = hsm_block.replace("[hsm]\n", f'[[hsm]]\nname = "hsm-a"\n{pace}')
    second = (
        hsm_block.replace('token_label = "fleet-a"', 'token_label = "fleet-b"')
        .replace(f'module = "{tokens[0].module_path}"', f'module = "{module_b}"')
        .replace("[hsm]\n", f'[[hsm]]\nname = "hsm-b"\n{pace}')
    )
    assert str(module_b) in second
    health = "[health]\ninterval_seconds = 1\nprobation_seconds = 3\n\n"
    config.write_text(text[:hsm_start] + first + second + health + text[hsm_end:])
    proxy = start_proxy(config, tmp_path / "proxy.log", port)
    try:

        def health_now() -> dict[str, str]:
            reply = proxy.request(
                "POST",
                f"/{PREFIX}/kms/xks/v1/health",
                {"requestMetadata": {"kmsRequestId": "h", "kmsOperation": "KmsHealthCheck"}},
                credential=CREDENTIAL,
            )
            assert reply.status == 200, reply.body
            return {m["id"]: m["healthStatus"] for m in reply.json["ekmFleetDetails"]}

        def wait_for(member: str, wanted: str, seconds: float) -> dict[str, str]:
            deadline = time.monotonic() + seconds
            states = health_now()
            while states.get(member) != wanted and time.monotonic() < deadline:
                time.sleep(0.2)
                states = health_now()
            return states

        assert health_now() == {"hsm-a": "ACTIVE", "hsm-b": "ACTIVE"}

        def round_trip(index: int) -> tuple[bool, str]:
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
                return False, f"encrypt {encrypted.status} {encrypted.body!r}"
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
            if decrypted.status != 200:
                return False, f"decrypt {decrypted.status} {decrypted.body!r}"
            return base64.b64decode(decrypted.json["plaintext"]) == plaintext, "wrong plaintext"

        # Round robin: consecutive calls land on both tokens, and every one decrypts.
        assert all(round_trip(i)[0] for i in range(20))
        log = proxy.log_text()
        assert '"hsm":"hsm-a"' in log and '"hsm":"hsm-b"' in log

        token_b = tokens[1].files()
        failures: list[str] = []
        done = [0]
        stop = threading.Event()

        def traffic(worker: int) -> None:
            index = 1000 * (worker + 1)
            while not stop.is_set():
                index += 1
                ok, why = round_trip(index)
                done[0] += 1
                if not ok:
                    failures.append(why)

        threads = [threading.Thread(target=traffic, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.5)
            # Break: hsm-b's token vanishes (its files leave the token directory).
            removed = store / "removed-fleet-b"
            token_b.rename(removed)
            broken = wait_for("hsm-b", "UNAVAILABLE", 20)
            assert broken == {"hsm-a": "ACTIVE", "hsm-b": "UNAVAILABLE"}, broken
            served_before_repair = done[0]
            time.sleep(1.0)  # hsm-a alone serves
            assert done[0] > served_before_repair
            # Repair: the token comes back; the prober re-initialises hsm-b's module,
            # finds the token again and brings it back in: DEGRADED on probation
            # ([health] probation_seconds = 3), then ACTIVE.
            removed.rename(token_b)
            repaired = wait_for("hsm-b", "DEGRADED", 15)
            assert repaired == {"hsm-a": "ACTIVE", "hsm-b": "DEGRADED"}, repaired
            repaired = wait_for("hsm-b", "ACTIVE", 10)
            assert repaired == {"hsm-a": "ACTIVE", "hsm-b": "ACTIVE"}, repaired
            log_before = proxy.log_text().count('"hsm":"hsm-b"')
            time.sleep(1.0)  # traffic reaches hsm-b again
            assert proxy.log_text().count('"hsm":"hsm-b"') > log_before
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        assert done[0] > 100
        assert failures == [], f"{len(failures)} of {done[0]} round trips failed: {failures[:5]}"
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
