"""The audit log end to end (issue: tamper-evident audit): every decision of every
worker lands in that worker's hash chain before its answer, and `xks-proxy audit
verify` checks every chain and catches an edited, deleted or reordered record and
says where."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from e2e.conftest import CREDENTIAL, PREFIX, write_config
from e2e.proxy import free_port, run_cli, start_proxy

pytestmark = [pytest.mark.e2e, pytest.mark.hsm]

MARKER = "UExBSU5URVhULU1BUktFUi05OQ=="  # base64 of a marker plaintext


def verify(*files: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("audit", "verify", *map(str, files))


def test_audit_log_chains_across_workers(softhsm_token: Any, tmp_path: Path) -> None:
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
    directory = tmp_path / "state" / "audit"

    def encrypt(index: int) -> int:
        signed = {**body, "requestMetadata": {**meta, "kmsRequestId": f"audit-{index}"}}
        return proxy.request("POST", path, signed, credential=CREDENTIAL).status

    sent = 0
    try:
        # The proxy answers once one worker is up; wait for the other one too.
        deadline = time.monotonic() + 30
        while len(re.findall(r"worker \d ready", proxy.log_text())) < 2:
            assert time.monotonic() < deadline, proxy.log_text()
            time.sleep(0.05)
        with ThreadPoolExecutor(max_workers=8) as pool:
            # Concurrent connections until both workers have served (and written).
            while sent < 40 or len(list(directory.glob("*.jsonl"))) < 2:
                assert time.monotonic() < deadline + 30, f"one worker served all {sent}"
                assert set(pool.map(encrypt, range(sent, sent + 40))) == {200}
                sent += 40
        bad = proxy.request(
            "POST", path, body, credential=("Invalid" + CREDENTIAL[0], CREDENTIAL[1])
        )
        assert bad.status == 401
        # Refused by the HTTP edge before it is read: audited all the same.
        too_large = proxy.request("POST", path, b"x" * 70_000, credential=CREDENTIAL)
        assert too_large.status == 501
    finally:
        proxy.stop()
    chains = sorted(directory.glob("*.jsonl"))
    assert [p.name for p in chains] == ["audit.worker0.jsonl", "audit.worker1.jsonl"]
    chain_records = {
        path: [json.loads(line) for line in path.read_text().splitlines()] for path in chains
    }
    records = [record for chain in chain_records.values() for record in chain]
    for chain in chain_records.values():
        assert [r["seq"] for r in chain] == list(range(len(chain)))
    ours = [r for r in records if str(r.get("kmsRequestId", "")).startswith("audit-")]
    assert len(ours) == sent
    assert {r["status"] for r in ours} == {200}
    first = ours[0]
    assert (
        first["operation"] == "Encrypt"
        and first["keyStore"] == "main"
        and first["externalKeyId"] == "foo"
    )
    assert first["awsPrincipalArn"] == meta["awsPrincipalArn"] and first["hsm"]
    assert {r["client"] for r in records} == {"127.0.0.1"}
    assert [
        r["status"] for r in records if r.get("errorName") == "UnsupportedOperationException"
    ] == [501]
    assert any(r.get("errorName") == "AuthenticationFailedException" for r in records)
    for chain_file in chains:
        text = chain_file.read_text()
        assert MARKER not in text and CREDENTIAL[1] not in text

    ok = verify(directory)  # a directory: every chain in it
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for chain_file, chain in chain_records.items():
        assert f"{chain_file.stem}: OK: {len(chain)} records across 1 files" in ok.stdout
    assert "OK: all 2 chains" in ok.stdout

    audit = max(chains, key=lambda path: len(chain_records[path]))  # at least 20 lines
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

    # Verifying the directory finds an edit in any one chain and names its file.
    audit.write_text(edited.read_text())
    result = verify(directory)
    assert result.returncode == 1 and f"{audit.name}:6: edited" in result.stdout
    assert "FAILED: 1 of 2 chains" in result.stdout


def test_a_restarted_worker_keeps_its_chain_after_an_audit_change(
    softhsm_token: Any, tmp_path: Path
) -> None:
    """[audit] needs a restart of the proxy; a worker that crashes after such a reload
    comes back on the chain it had, not on the reloaded settings."""
    port = free_port()
    config = write_config(tmp_path, softhsm_token, port)
    proxy = start_proxy(config, tmp_path / "proxy.log", port)
    path = f"/{PREFIX}/kms/xks/v1/keys/foo/encrypt"
    body = {
        "requestMetadata": {
            "awsPrincipalArn": "arn:aws:iam::1:user/a",
            "kmsKeyArn": "arn:aws:kms:us-east-1:1:key/k",
            "kmsOperation": "Encrypt",
            "kmsRequestId": "before-crash",
        },
        "plaintext": MARKER,
        "encryptionAlgorithm": "AES_GCM",
    }
    chain = tmp_path / "state" / "audit" / "audit.worker0.jsonl"
    moved = tmp_path / "moved"
    try:
        assert proxy.request("POST", path, body, credential=CREDENTIAL).status == 200
        config.write_text(config.read_text() + f'\n[audit]\npath = "{moved}/audit.jsonl"\n')
        reloaded = run_cli("reload", "--config", str(config))
        assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr
        worker = int(re.findall(r"started worker 0 \(pid (\d+)\)", proxy.log_text())[-1])
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while proxy.log_text().count("worker 0 ready") < 2:
            assert time.monotonic() < deadline, proxy.log_text()
            time.sleep(0.05)
        body["requestMetadata"]["kmsRequestId"] = "after-crash"  # type: ignore[index]
        assert proxy.request("POST", path, body, credential=CREDENTIAL).status == 200
    finally:
        proxy.stop()
    records = [json.loads(line) for line in chain.read_text().splitlines()]
    assert [r["seq"] for r in records] == list(range(len(records)))  # one unbroken chain
    assert [r["kmsRequestId"] for r in records if "kmsRequestId" in r] == [
        "before-crash",
        "after-crash",
    ]
    assert not moved.exists()
