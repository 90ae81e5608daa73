"""The audit log end to end (issue: tamper-evident audit): every decision of every
worker lands in one hash chain before its answer, and `xks-proxy audit verify`
catches an edited, deleted or reordered record and says where."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from e2e.conftest import CREDENTIAL, PREFIX, write_config
from e2e.proxy import free_port, start_proxy

pytestmark = [pytest.mark.e2e, pytest.mark.hsm]

MARKER = "UExBSU5URVhULU1BUktFUi05OQ=="  # base64 of a marker plaintext


def verify(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xks_proxy", "audit", "verify", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_audit_log_chain_across_workers(softhsm_token: Any, tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, softhsm_token, port)
    config.write_text(config.read_text().replace("[server]\n", "[server]\nworkers = 2\n"))
    proxy = start_proxy(config, tmp_path / "proxy.log", port)
    meta = {
        "awsPrincipalArn": "arn:aws:iam::1:user/a",
        "kmsKeyArn": "arn:aws:kms:us-east-1:1:key/k",
        "kmsOperation": "Encrypt",
        "kmsRequestId": "audit-ok",
    }
    body = {
        "requestMetadata": meta,
        "plaintext": MARKER,
        "encryptionAlgorithm": "AES_GCM",
        "additionalAuthenticatedData": MARKER,
    }
    path = f"/{PREFIX}/kms/xks/v1/keys/foo/encrypt"
    try:
        for index in range(40):
            body["requestMetadata"] = {**meta, "kmsRequestId": f"audit-{index}"}
            assert proxy.request("POST", path, body, credential=CREDENTIAL).status == 200
        bad = proxy.request(
            "POST", path, body, credential=("Invalid" + CREDENTIAL[0], CREDENTIAL[1])
        )
        assert bad.status == 401
    finally:
        proxy.stop()
    audit = tmp_path / "state" / "audit" / "audit.jsonl"
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [r["seq"] for r in records] == list(range(len(records)))
    ours = [r for r in records if str(r.get("kmsRequestId", "")).startswith("audit-")]
    assert len(ours) == 40
    assert {r["status"] for r in ours} == {200}
    first = ours[0]
    assert (
        first["operation"] == "Encrypt"
        and first["keyStore"] == "main"
        and first["externalKeyId"] == "foo"
    )
    assert first["awsPrincipalArn"] == meta["awsPrincipalArn"] and first["hsm"]
    assert any(r.get("errorName") == "AuthenticationFailedException" for r in records)
    assert MARKER not in audit.read_text() and CREDENTIAL[1] not in audit.read_text()
    pids = {
        line["pid"]
        for line in map(json.loads, proxy.log_text().splitlines())
        if line.get("logger") == "xks_proxy.request"
    }
    assert len(pids) >= 1  # several workers may have written; the chain is one

    ok = verify(audit)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"{len(records)} records" in ok.stdout

    lines = audit.read_text().splitlines(keepends=True)
    edited = tmp_path / "edited.jsonl"
    edited.write_text(
        "".join([*lines[:5], lines[5].replace('"status":200', '"status":201'), *lines[6:]])
    )
    result = verify(edited)
    assert result.returncode == 1 and "edited.jsonl:6" in result.stdout
    deleted = tmp_path / "deleted.jsonl"
    deleted.write_text("".join(lines[:10] + lines[11:]))
    result = verify(deleted)
    assert result.returncode == 1 and "deleted.jsonl:11" in result.stdout
    swapped = tmp_path / "swapped.jsonl"
    swapped.write_text("".join([*lines[:3], lines[4], lines[3], *lines[5:]]))
    result = verify(swapped)
    assert result.returncode == 1 and "swapped.jsonl:4" in result.stdout
