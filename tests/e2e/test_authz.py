"""Secondary authorization end to end (spec: Authorization, Logging): Cedar policies on a
key store, denies answered 403 and logged with the deciding policy, health exempt,
invalid policies refused at start and on reload."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from e2e.conftest import CREDENTIAL, PREFIX, write_config
from e2e.proxy import ProxyProcess, free_port, run_cli, start_proxy

pytestmark = [pytest.mark.e2e, pytest.mark.hsm]

POLICIES = """
@id("crypto-only-from-key-account")
permit (
  principal,
  action in [XKS::Action::"Encrypt", XKS::Action::"Decrypt"],
  resource
)
when { context has kmsKeyAccount && context.kmsKeyAccount == "111122223333" };

@id("metadata-for-anyone")
permit (principal, action == XKS::Action::"GetKeyMetadata", resource);

@id("block-mallory")
forbid (principal == XKS::Principal::"arn:aws:iam::111122223333:user/Mallory", action, resource);
"""


def body(principal: str, key_account: str, request_id: str) -> dict[str, Any]:
    return {
        "requestMetadata": {
            "awsPrincipalArn": principal,
            "kmsKeyArn": f"arn:aws:kms:us-east-1:{key_account}:key/k",
            "kmsOperation": "Encrypt",
            "kmsRequestId": request_id,
        },
        "plaintext": "AAAA",
        "encryptionAlgorithm": "AES_GCM",
    }


def encrypt(proxy: ProxyProcess, principal: str, account: str, request_id: str) -> Any:
    return proxy.request(
        "POST",
        f"/{PREFIX}/kms/xks/v1/keys/foo/encrypt",
        body(principal, account, request_id),
        credential=CREDENTIAL,
    )


def log_line(proxy: ProxyProcess, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for line in proxy.log_text().splitlines():
            if request_id in line and line.startswith("{"):
                record: dict[str, Any] = json.loads(line)
                if record.get("kmsRequestId") == request_id:
                    return record
        time.sleep(0.05)
    raise AssertionError(f"no log line for {request_id}")


def reload(config: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("reload", "--config", str(config))


def test_policies_allow_deny_and_log(softhsm_token: Any, tmp_path: Path) -> None:
    policy = tmp_path / "main.cedar"
    policy.write_text(POLICIES)
    port = free_port()
    config = write_config(tmp_path, softhsm_token, port)
    config.write_text(
        config.read_text().replace(
            'name = "main"\n', 'name = "main"\npolicy_files = ["main.cedar"]\n'
        )
    )
    proxy = start_proxy(config, tmp_path / "proxy.log", port)
    try:
        alice = "arn:aws:iam::111122223333:user/Alice"
        mallory = "arn:aws:iam::111122223333:user/Mallory"
        assert encrypt(proxy, alice, "111122223333", "allow-1").status == 200
        allowed = log_line(proxy, "allow-1")
        assert allowed["authzDecision"] == "allow"
        assert allowed["authzPolicyIds"] == ["crypto-only-from-key-account"]

        denied = encrypt(proxy, alice, "444455556666", "deny-1")
        assert denied.status == 403 and denied.json["errorName"] == "AccessDeniedException"
        assert log_line(proxy, "deny-1")["authzReason"] == "deny: no permit matched"

        blocked = encrypt(proxy, mallory, "111122223333", "deny-2")
        assert blocked.status == 403
        record = log_line(proxy, "deny-2")
        assert record["authzPolicyIds"] == ["block-mallory"]
        assert "block-mallory" not in blocked.body.decode()  # KMS passes messages to callers

        # GetHealthStatus is never subject to secondary authorization.
        health = {"requestMetadata": {"kmsRequestId": "h", "kmsOperation": "KmsHealthCheck"}}
        assert (
            proxy.request(
                "POST", f"/{PREFIX}/kms/xks/v1/health", health, credential=CREDENTIAL
            ).status
            == 200
        )

        # An invalid policy on reload is refused and the running set is kept.
        policy.write_text(
            POLICIES + "\npermit (principal, action, resource) when { context.nope };\n"
        )
        result = reload(config)
        assert result.returncode == 1 and "main.cedar" in result.stderr
        assert encrypt(proxy, mallory, "111122223333", "deny-3").status == 403
        assert encrypt(proxy, alice, "111122223333", "allow-2").status == 200

        # A valid change applies without restart: now Mallory is let through.
        policy.write_text(POLICIES.split('@id("block-mallory")')[0])
        assert reload(config).returncode == 0
        assert encrypt(proxy, mallory, "111122223333", "allow-3").status == 200
    finally:
        proxy.stop()


def test_invalid_policy_stops_start_up(softhsm_token: Any, tmp_path: Path) -> None:
    (tmp_path / "bad.cedar").write_text("permit (principal, action, resource) when { 1 + };")
    config = write_config(tmp_path, softhsm_token, free_port())
    config.write_text(
        config.read_text().replace(
            'name = "main"\n', 'name = "main"\npolicy_files = ["bad.cedar"]\n'
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "xks_proxy", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "key_stores[0].policy_files" in result.stderr and "bad.cedar" in result.stderr


def test_authz_check_cli(softhsm_token: Any, tmp_path: Path) -> None:
    (tmp_path / "main.cedar").write_text(POLICIES)
    config = write_config(tmp_path, softhsm_token, free_port())
    config.write_text(
        config.read_text().replace(
            'name = "main"\n', 'name = "main"\npolicy_files = ["main.cedar"]\n'
        )
    )
    request = tmp_path / "request.json"
    request.write_text(
        json.dumps(body("arn:aws:iam::111122223333:user/Mallory", "111122223333", "r"))
    )
    args = [
        sys.executable,
        "-m",
        "xks_proxy",
        "authz",
        "check",
        "--config",
        str(config),
        "--key-store",
        "main",
        "--key",
        "foo",
        "--operation",
        "Encrypt",
        "--request",
        str(request),
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert result.stdout.strip() == 'deny: forbidden by "block-mallory"'
    request.write_text(
        json.dumps(body("arn:aws:iam::111122223333:user/Alice", "111122223333", "r"))
    )
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and "crypto-only-from-key-account" in result.stdout
