"""The kill switch, end to end: a real proxy, the real CLI, effective within a second,
persisted across restarts, logged (spec: Error codes — InvalidStateException)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from e2e.conftest import CREDENTIAL, PREFIX, write_config
from e2e.proxy import ProxyProcess, free_port, start_proxy

pytestmark = [pytest.mark.e2e, pytest.mark.hsm]

META = {
    "awsPrincipalArn": "arn:aws:iam::1:user/a",
    "kmsKeyArn": "arn:aws:kms:us-east-1:1:key/k",
    "kmsOperation": "Encrypt",
    "kmsRequestId": "ks",
}


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xks_proxy", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def call(proxy: ProxyProcess, tail: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    response = proxy.request("POST", f"/{PREFIX}/kms/xks/v1/{tail}", body, credential=CREDENTIAL)
    return response.status, response.json


def encrypt(proxy: ProxyProcess, key: str = "foo") -> tuple[int, dict[str, Any]]:
    return call(
        proxy,
        f"keys/{key}/encrypt",
        {"requestMetadata": META, "plaintext": "AAAA", "encryptionAlgorithm": "AES_GCM"},
    )


def metadata(proxy: ProxyProcess, key: str = "foo") -> tuple[int, dict[str, Any]]:
    return call(proxy, f"keys/{key}/metadata", {"requestMetadata": META})


def health(proxy: ProxyProcess) -> tuple[int, dict[str, Any]]:
    return call(
        proxy,
        "health",
        {"requestMetadata": {"kmsRequestId": "h", "kmsOperation": "KmsHealthCheck"}},
    )


def within_a_second(check: Callable[[], bool]) -> float:
    """check() must hold on every worker within a second of the change: poll until it
    holds, then, once the second is over, it must still hold (each request may land
    on any worker, and each worker polls the kill switch on its own)."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < 1.0, "not in force within a second"
        time.sleep(0.02)
    took = time.monotonic() - started
    time.sleep(max(0.0, started + 1.0 - time.monotonic()))
    assert all(check() for _ in range(3)), "not in force on every worker after a second"
    return took


def test_kill_switch(softhsm_token: Any, tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, softhsm_token, port)
    config.write_text(config.read_text().replace("[server]\n", "[server]\nworkers = 2\n"))
    proxy = start_proxy(config, tmp_path / "proxy.log", port)
    try:
        assert encrypt(proxy)[0] == 200

        # One key: metadata says DISABLED, crypto is InvalidStateException, others unaffected.
        result = cli(
            config, "disable", "--key-store", "main", "--key", "foo", "--reason", "incident 42"
        )
        assert result.returncode == 0, result.stderr
        within_a_second(lambda: all(encrypt(proxy)[0] == 400 for _ in range(6)))
        status, body = encrypt(proxy)
        assert body["errorName"] == "InvalidStateException"
        assert metadata(proxy) == (
            200,
            {"keySpec": "AES_256", "keyUsage": ["ENCRYPT", "DECRYPT"], "keyStatus": "DISABLED"},
        )
        assert encrypt(proxy, "encrypt_only_key")[0] == 200
        assert health(proxy)[0] == 200

        # Persisted: a restart keeps the key disabled.
        proxy.stop()
        proxy = start_proxy(config, tmp_path / "proxy2.log", port)
        assert encrypt(proxy)[1]["errorName"] == "InvalidStateException"
        assert cli(config, "enable", "--key-store", "main", "--key", "foo").returncode == 0
        within_a_second(lambda: all(encrypt(proxy)[0] == 200 for _ in range(6)))

        # A key store: everything on it, health included.
        assert cli(config, "disable", "--key-store", "main").returncode == 0
        within_a_second(lambda: all(health(proxy)[0] == 400 for _ in range(6)))
        assert health(proxy)[1]["errorName"] == "InvalidStateException"
        assert cli(config, "enable", "--key-store", "main").returncode == 0
        within_a_second(lambda: all(health(proxy)[0] == 200 for _ in range(6)))

        # The whole proxy.
        assert cli(config, "disable", "--reason", "pull the plug").returncode == 0
        within_a_second(lambda: all(metadata(proxy)[0] == 400 for _ in range(6)))
        assert cli(config, "enable").returncode == 0
        within_a_second(lambda: all(metadata(proxy)[0] == 200 for _ in range(6)))

        assert cli(config, "disable", "--key-store", "nope").returncode == 2
    finally:
        proxy.stop()

    events = [
        json.loads(line)
        for line in (tmp_path / "state" / "killswitch-events.jsonl").read_text().splitlines()
    ]
    assert [e["action"] for e in events] == [
        "disable",
        "enable",
        "disable",
        "enable",
        "disable",
        "enable",
    ]
    assert (
        events[0]["target"] == "key foo of key store main" and events[0]["reason"] == "incident 42"
    )
    assert "kill switch now" in proxy.log_text()
    status = json.loads(cli(config, "status").stdout)
    assert status["killSwitch"] == {
        "proxy_disabled": False,
        "disabled_key_stores": [],
        "disabled_keys": [],
    }
