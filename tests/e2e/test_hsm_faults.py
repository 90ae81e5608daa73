"""A slow or hung HSM, overload and quotas, against the real server process on SoftHSMv2.

Issue 4 items 1, 3 and 4, end to end. The HSM is made to hang for real, with no code
injected into the proxy: SoftHSMv2 takes a POSIX record lock on a token's
``generation`` file around every operation on the token's objects, so while this test
process holds that lock, every C_Encrypt/C_Decrypt in the proxy blocks inside the
library, as a network HSM that stopped answering would.

Spec sections: Error codes (DependencyTimeoutException 503, ThrottlingException 429),
GetHealthStatus (ekmFleetDetails healthStatus).
"""

from __future__ import annotations

import base64
import fcntl
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from e2e.conftest import CREDENTIAL, OTHER_CREDENTIAL, OTHER_PREFIX, PREFIX, write_config
from e2e.proxy import ProxyProcess, free_port, start_proxy
from xks_proxy.keymanager.softhsm import (
    DEMO_KEYS,
    HEALTH_CHECK_KEY_LABEL,
    SoftHsmToken,
    provision_softhsm_token,
)

pytestmark = [pytest.mark.e2e, pytest.mark.hsm]

TIMEOUT_MS = 150
META = {
    "awsPrincipalArn": "arn:aws:iam::1:user/a",
    "kmsKeyArn": "arn:aws:kms:us-east-1:1:key/k",
    "kmsOperation": "Encrypt",
    "kmsRequestId": "faults",
}
ENCRYPT = {
    "requestMetadata": META,
    "plaintext": base64.b64encode(b"k" * 32).decode(),
    "encryptionAlgorithm": "AES_GCM",
}
HEALTH = {"requestMetadata": {"kmsRequestId": "h", "kmsOperation": "KmsHealthCheck"}}


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> SoftHsmToken:
    """A token of this module's own: its files are locked, so no other test shares it."""
    return provision_softhsm_token(
        tmp_path_factory.mktemp("faults-softhsm"),
        token_label="faults",
        pin="1234",
        so_pin="5678",
        keys=DEMO_KEYS,
        health_check_key_label=HEALTH_CHECK_KEY_LABEL,
    )


@contextmanager
def hsm_hung(token: SoftHsmToken) -> Iterator[None]:
    """While inside, every operation on the token blocks inside SoftHSM."""
    directory = token.files()
    with (directory / "generation").open("r+b") as handle:
        fcntl.lockf(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)


def start(
    tmp_path: Path, token: SoftHsmToken, limits: str = "", store: str = "", health: str = ""
) -> ProxyProcess:
    port = free_port()
    config = write_config(tmp_path, token, port)
    text = config.read_text()
    text = text.replace("[limits]\n", f"[limits]\nrequest_timeout_ms = {TIMEOUT_MS}\n{limits}")
    text = text.replace('name = "main"\n', f'name = "main"\n{store}')
    config.write_text(text + health)
    return start_proxy(config, tmp_path / "proxy.log", port)


def encrypt(
    proxy: ProxyProcess, credential: tuple[str, str] = CREDENTIAL, prefix: str = PREFIX
) -> tuple[int, dict[str, Any], float]:
    started = time.monotonic()
    response = proxy.request(
        "POST", f"/{prefix}/kms/xks/v1/keys/foo/encrypt", ENCRYPT, credential=credential
    )
    return response.status, response.json, time.monotonic() - started


def in_parallel(proxy: ProxyProcess, count: int) -> list[tuple[int, dict[str, Any], float]]:
    results: list[tuple[int, dict[str, Any], float]] = []
    lock = threading.Lock()
    gate = threading.Barrier(count)

    def one() -> None:
        gate.wait()
        result = encrypt(proxy)
        with lock:
            results.append(result)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def request_lines(proxy: ProxyProcess) -> list[dict[str, Any]]:
    lines = []
    for line in proxy.log_text().splitlines():
        if '"logger":"xks_proxy.request"' in line:
            lines.append(json.loads(line))
    return lines


def test_hung_hsm_answers_503_in_budget_and_recovers(token: SoftHsmToken, tmp_path: Path) -> None:
    """Issue 4.3: a hung HSM gives 503 DependencyTimeoutException within the budget,
    never a late 200; the proxy stays responsive and serves again once the HSM does."""
    proxy = start(tmp_path, token)
    try:
        assert encrypt(proxy)[0] == 200
        with hsm_hung(token):
            results = in_parallel(proxy, 6) + [encrypt(proxy) for _ in range(3)]
            # Still responsive while every HSM call hangs: the answer comes from the
            # cached background health check (or is a clean error), never a hang.
            started = time.monotonic()
            health = proxy.request(
                "POST", f"/{PREFIX}/kms/xks/v1/health", HEALTH, credential=CREDENTIAL
            )
            assert time.monotonic() - started < 2.0
            assert health.status in (200, 503), health.body
        for status, body, _ in results:
            assert (status, body.get("errorName")) == (503, "DependencyTimeoutException"), body
        # The server's own clock: every answer went out close to the 150 ms budget.
        timed_out = [
            r for r in request_lines(proxy) if r.get("errorName") == "DependencyTimeoutException"
        ]
        assert len(timed_out) >= len(results)
        assert all(r["latencyMs"] < TIMEOUT_MS + 250 for r in timed_out), timed_out
        # The HSM answers again: so does the proxy, with no restart.
        deadline = time.monotonic() + 10
        while encrypt(proxy)[0] != 200:
            assert time.monotonic() < deadline, "not serving again after the HSM recovered"
            time.sleep(0.1)
        assert all(encrypt(proxy)[0] == 200 for _ in range(5))
        # No late 200: every 200 answered within its budget.
        assert all(
            r["latencyMs"] <= TIMEOUT_MS + 50
            for r in request_lines(proxy)
            if r.get("status") == 200
        )
    finally:
        proxy.stop()


def test_in_flight_cap_sheds_overload_fast_with_429(token: SoftHsmToken, tmp_path: Path) -> None:
    """Issue 4.4: with the HSM hung and max_in_flight = 2, the excess is refused at once
    with 429 ThrottlingException instead of waiting for the 503."""
    proxy = start(tmp_path, token, limits="max_in_flight = 2\n")
    try:
        with hsm_hung(token):
            results = in_parallel(proxy, 10)
        statuses = sorted(status for status, _, _ in results)
        assert 200 not in statuses
        assert statuses.count(429) >= 5, statuses
        assert set(statuses) <= {429, 503}, statuses
        shed = [r for r in request_lines(proxy) if r.get("status") == 429]
        assert all(r["errorName"] == "ThrottlingException" for r in shed)
        # Shed in well under the 150 ms budget: the proxy did not wait on the HSM.
        assert all(r["latencyMs"] < TIMEOUT_MS / 3 for r in shed), shed
        deadline = time.monotonic() + 10
        while encrypt(proxy)[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        proxy.stop()


def test_key_store_quota_is_429_and_per_store(token: SoftHsmToken, tmp_path: Path) -> None:
    """Issue 4.4: a key store's requests/s + burst quota; other key stores unaffected."""
    proxy = start(tmp_path, token, store="requests_per_second = 2\nburst = 3\n")
    try:
        results = [encrypt(proxy) for _ in range(8)]
        statuses = [status for status, _, _ in results]
        assert statuses[:3] == [200, 200, 200], statuses
        assert statuses.count(429) >= 4, statuses
        assert all(
            body["errorName"] == "ThrottlingException"
            for status, body, _ in results
            if status == 429
        )
        # The other key store has no quota.
        assert all(encrypt(proxy, OTHER_CREDENTIAL, OTHER_PREFIX)[0] == 200 for _ in range(8))
        time.sleep(1.1)  # 2 tokens/s refill
        assert encrypt(proxy)[0] == 200
    finally:
        proxy.stop()


def test_slow_hsm_reports_degraded_then_active(token: SoftHsmToken, tmp_path: Path) -> None:
    """Issue 4.1: the background deep health check times the round trip on the
    health-check key; a slow HSM reports DEGRADED, and ACTIVE again once it is fast."""
    proxy = start(
        tmp_path, token, health="\n[health]\ninterval_seconds = 1\ndegraded_latency_ms = 50\n"
    )

    def status() -> str | None:
        reply = proxy.request("POST", f"/{PREFIX}/kms/xks/v1/health", HEALTH, credential=CREDENTIAL)
        if reply.status != 200:
            return None
        members: list[dict[str, str]] = reply.json["ekmFleetDetails"]
        return members[0]["healthStatus"]

    def wait_for(wanted: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while status() != wanted:
            assert time.monotonic() < deadline, f"never {wanted}"
            time.sleep(0.1)

    try:
        wait_for("ACTIVE", 5)
        with hsm_hung(token):
            time.sleep(1.5)  # a background round trip is stuck behind the lock
        wait_for("DEGRADED", 5)
        wait_for("ACTIVE", 5)
    finally:
        proxy.stop()
