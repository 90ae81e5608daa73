"""Running the proxy: reload without restart, credential rotation under traffic,
the load-balancer health listener and graceful shutdown."""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from e2e.conftest import CREDENTIAL, PREFIX, SECOND_CREDENTIAL, write_config
from e2e.proxy import ProxyProcess, free_port, run_cli, sign, start_proxy

pytestmark = [pytest.mark.e2e, pytest.mark.hsm]

ENCRYPT_PATH = f"/{PREFIX}/kms/xks/v1/keys/foo/encrypt"
BODY = json.dumps(
    {
        "requestMetadata": {
            "awsPrincipalArn": "arn:aws:iam::123456789012:user/Alice",
            "kmsKeyArn": "arn:aws:kms:us-east-1:123456789012:key/k",
            "kmsOperation": "Encrypt",
            "kmsRequestId": "rotation",
        },
        "plaintext": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "encryptionAlgorithm": "AES_GCM",
    }
).encode()


def reload(config: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("reload", "--config", str(config))


def status_with(
    port: int, credential: tuple[str, str], conn: http.client.HTTPConnection | None = None
) -> int:
    headers = sign(
        "POST",
        f"http://127.0.0.1:{port}{ENCRYPT_PATH}",
        BODY,
        credential,
        {"Content-Type": "application/json"},
    )
    own = conn is None
    connection = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("POST", ENCRYPT_PATH, body=BODY, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        if own:
            connection.close()


@dataclass
class Traffic:
    """Continuous signed traffic on long-lived keep-alive connections."""

    port: int
    credential: tuple[str, str]
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self.stop.is_set():
            credential = self.credential
            try:
                status = status_with(self.port, credential, connection)
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                continue
            if status == 200:
                self.ok += 1
            else:
                self.failures.append(f"status {status} with {credential[0]}")
        connection.close()


@pytest.fixture
def two_worker_proxy(
    softhsm_token: Any, tmp_path: Path
) -> Iterator[tuple[ProxyProcess, Path, int]]:
    port, health_port = free_port(), free_port()
    config = write_config(tmp_path, softhsm_token, port)
    text = config.read_text().replace(
        "[server]\n", f"[server]\nworkers = 2\nhealth_port = {health_port}\n"
    )
    config.write_text(text)
    proxy = start_proxy(config, tmp_path / "proxy.log", port)
    try:
        yield proxy, config, health_port
    finally:
        proxy.stop()


def without_credential(config: Path, access_key_id: str) -> None:
    """Remove one [[key_stores.credentials]] table from the config text."""
    paragraphs = config.read_text().split("\n\n")
    kept = [
        p
        for p in paragraphs
        if not (p.strip().startswith("[[key_stores.credentials]]") and access_key_id in p)
    ]
    assert len(kept) == len(paragraphs) - 1
    config.write_text("\n\n".join(kept))


def test_credential_rotation_under_traffic(
    two_worker_proxy: tuple[ProxyProcess, Path, int],
) -> None:
    """Spec: SigV4 credentials rotation — add new, switch KMS, remove old; no request with
    a valid credential fails and keep-alive connections survive every reload."""
    proxy, config, _ = two_worker_proxy
    # Start with only the old credential.
    without_credential(config, SECOND_CREDENTIAL[0])
    assert reload(config).returncode == 0
    assert status_with(proxy.port, SECOND_CREDENTIAL) == 401

    traffic = Traffic(proxy.port, CREDENTIAL)
    threads = [threading.Thread(target=traffic.run) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        # 1. Add the new credential: both verify, on every worker.
        config.write_text(
            config.read_text().replace(
                '[[key_stores]]\nname = "other"',
                f"""[[key_stores.credentials]]
access_key_id = "{SECOND_CREDENTIAL[0]}"
secret_access_key = "{SECOND_CREDENTIAL[1]}"

[[key_stores]]
name = "other\"""",
            )
        )
        result = reload(config)
        assert result.returncode == 0, result.stderr
        assert all(status_with(proxy.port, SECOND_CREDENTIAL) == 200 for _ in range(10))
        assert all(status_with(proxy.port, CREDENTIAL) == 200 for _ in range(10))
        # 2. KMS switches to the new credential (UpdateCustomKeyStore).
        traffic.credential = SECOND_CREDENTIAL
        time.sleep(0.5)
        # 3. Remove the old credential: only the new one verifies.
        without_credential(config, CREDENTIAL[0])
        result = reload(config)
        assert result.returncode == 0, result.stderr
        time.sleep(0.5)
    finally:
        traffic.stop.set()
        for thread in threads:
            thread.join()
    assert traffic.failures == []
    assert traffic.ok > 50
    assert all(status_with(proxy.port, CREDENTIAL) == 401 for _ in range(10))
    assert all(status_with(proxy.port, SECOND_CREDENTIAL) == 200 for _ in range(10))


def test_invalid_config_on_reload_keeps_the_old_one(
    two_worker_proxy: tuple[ProxyProcess, Path, int],
) -> None:
    """A bad config change never takes a running proxy down."""
    proxy, config, _ = two_worker_proxy
    good = config.read_text()
    config.write_text(
        good.replace(f'access_key_id = "{CREDENTIAL[0]}"', 'access_key_id = "lowercase-bad"')
    )
    result = reload(config)
    assert result.returncode == 1
    assert "access_key_id" in result.stderr and "previous configuration" in result.stderr
    assert all(status_with(proxy.port, CREDENTIAL) == 200 for _ in range(10))
    config.write_text("[server\nbroken toml")
    assert reload(config).returncode == 1
    assert status_with(proxy.port, CREDENTIAL) == 200
    assert "reload" in proxy.log_text() and "keeping the running configuration" in proxy.log_text()
    config.write_text(good)
    assert reload(config).returncode == 0


def test_health_listener(two_worker_proxy: tuple[ProxyProcess, Path, int]) -> None:
    """Spec: Load balancer health checks — plain GET on a port of its own."""
    _, _, health_port = two_worker_proxy
    for path, expected in (("/ping", "alive"), ("/ready", "ready")):
        with urllib.request.urlopen(f"http://127.0.0.1:{health_port}{path}", timeout=5) as reply:
            assert reply.status == 200
            assert json.loads(reply.read())["status"] == expected
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"http://127.0.0.1:{health_port}/other", timeout=5)
    assert caught.value.code == 404


def test_graceful_shutdown(two_worker_proxy: tuple[ProxyProcess, Path, int]) -> None:
    """SIGTERM: in-flight requests finish, then every process exits cleanly."""
    proxy, _, _ = two_worker_proxy
    traffic = Traffic(proxy.port, CREDENTIAL)
    thread = threading.Thread(target=traffic.run)
    thread.start()
    while traffic.ok < 20:
        time.sleep(0.01)
    started = time.monotonic()
    code = proxy.stop()
    traffic.stop.set()
    thread.join()
    assert code == 0
    assert time.monotonic() - started < 15
    assert traffic.ok > 0
    # Failures after the listener closed are connection errors, never a wrong answer.
    assert all("status" not in failure for failure in traffic.failures)


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of one metric whose labels include the given ones."""
    total = 0.0
    found = False
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
            found = True
    assert found, f"{name} {labels} not in metrics"
    return total


def at_least(text: str, minimum: float, name: str, **labels: str) -> bool:
    try:
        return metric_value(text, name, **labels) >= minimum
    except AssertionError:  # not there yet
        return False


def test_metrics_across_workers(two_worker_proxy: tuple[ProxyProcess, Path, int]) -> None:
    """Prometheus metrics on the admin listener count every request of every worker."""
    proxy, _, health_port = two_worker_proxy
    for _ in range(30):
        assert status_with(proxy.port, CREDENTIAL) == 200
    for _ in range(7):
        assert status_with(proxy.port, ("Invalid" + CREDENTIAL[0], CREDENTIAL[1])) == 401
    # Workers flush their counts every 0.5 s (FLUSH_SECONDS): wait for them.
    deadline = time.monotonic() + 5
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        flushed = at_least(
            text, 7, "xks_proxy_errors_total", error_name="AuthenticationFailedException"
        ) and at_least(text, 30, "xks_proxy_requests_total", operation="Encrypt", status="200")
        if flushed or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert metric_value(text, "xks_proxy_requests_total", operation="Encrypt", status="200") >= 30
    assert (
        metric_value(
            text,
            "xks_proxy_errors_total",
            operation="Encrypt",
            error_name="AuthenticationFailedException",
        )
        == 7
    )
    assert (
        metric_value(text, "xks_proxy_latency_seconds_count", operation="Encrypt", status="200")
        >= 30
    )
    assert metric_value(text, "xks_external_key_manager_state", state="ACTIVE") == 1
    assert metric_value(text, "xks_proxy_event_loop_lag_seconds_count") > 0  # ticks every 0.1 s
    assert metric_value(text, "xks_proxy_credential_age_seconds", access_key_id=CREDENTIAL[0]) >= 0
    assert (
        metric_value(text, "xks_proxy_credential_age_seconds", access_key_id=SECOND_CREDENTIAL[0])
        >= 0
    )
    pids = {line.split('pid="')[1].split('"')[0] for line in text.splitlines() if 'pid="' in line}
    assert len(pids) <= 2  # live gauges only; counters are merged across workers
    # Never on the API port.
    response = proxy.request("GET", "/metrics")
    assert response.status == 404
