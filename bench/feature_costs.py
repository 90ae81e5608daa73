"""Per-request cost of authorization, audit and metrics (issue 5, item 4).

Runs the real XksService in-process on requests signed with botocore, with a stand-in
key manager that answers at once (so the HSM is not what is measured), and reports
microseconds of CPU per request for each feature switched on in turn:

    .venv/bin/python bench/feature_costs.py [--requests 20000]

The audit log is written in a temporary directory on the same filesystem as /tmp.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from e2e.proxy import sign
from xks_proxy.config import parse_config
from xks_proxy.keymanager.base import EkmInfo, GcmCiphertext, KeyDescription
from xks_proxy.service import XksService

AKID, SECRET = "BETWEEN2TENAND3TENCHARACTERS", "PleaseReplaceThisWithSomeSecretOfLength43To64"
PATH = "/p/kms/xks/v1/keys/foo/encrypt"
POLICY = """
@id("crypto-only-from-key-account")
permit (principal, action in [XKS::Action::"Encrypt", XKS::Action::"Decrypt"], resource)
when { context has kmsKeyAccount && context.kmsKeyAccount == "111122223333" };
"""


class InstantHsm:
    def describe_key(self, external_key_id: str) -> KeyDescription:
        return KeyDescription("AES_256", ("ENCRYPT", "DECRYPT"))

    def encrypt(self, external_key_id: str, plaintext: bytes, hsm_aad: bytes) -> GcmCiphertext:
        return GcmCiphertext(b"\0" * 12, plaintext, b"\1" * 16)

    def decrypt(self, *args: Any) -> bytes:
        return b""

    def health_check(self) -> None:
        return None

    def info(self) -> EkmInfo:
        return EkmInfo("bench", "hsm-1", "instant")

    def close(self) -> None:
        return None


def requests(count: int) -> list[tuple[list[tuple[bytes, bytes]], bytes]]:
    signed = []
    for index in range(count):
        body = json.dumps(
            {
                "requestMetadata": {
                    "awsPrincipalArn": "arn:aws:iam::111122223333:role/app",
                    "kmsKeyArn": "arn:aws:kms:us-east-1:111122223333:key/k",
                    "kmsOperation": "GenerateDataKey",
                    "kmsRequestId": f"bench-{index}",
                },
                "plaintext": "A" * 44,
                "additionalAuthenticatedData": "Y29udGV4dD1iZW5jaG1hcmstYWFkLXZhbHVlLTQwYg==",
                "encryptionAlgorithm": "AES_GCM",
            }
        ).encode()
        headers = sign(
            "POST",
            f"http://proxy.test{PATH}",
            body,
            (AKID, SECRET),
            {"Content-Type": "application/json"},
        )
        raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        raw.append((b"host", b"proxy.test"))
        signed.append((raw, body))
    return signed


def config(directory: Path, *, authz: bool, audit: str) -> Any:
    store: dict[str, Any] = {
        "name": "s",
        "uri_prefix": "p",
        "credentials": [{"access_key_id": AKID, "secret_access_key": SECRET}],
    }
    if authz:
        (directory / "p.cedar").write_text(POLICY)
        store["policy_files"] = ["p.cedar"]
    document: dict[str, Any] = {
        "server": {"allow_plain_http": True, "state_dir": str(directory / "state")},
        "hsm": {"module": "/x.so", "token_label": "t", "pin": "1"},
        "limits": {"request_timeout_ms": 5000},
        "key_stores": [store],
        "audit": {"enabled": audit != "off", "fsync": audit == "fsync"},
    }
    return parse_config(document, base_dir=directory)


async def run(
    service: XksService,
    signed: list[tuple[list[tuple[bytes, bytes]], bytes]],
    metrics: Any,
    concurrency: int,
) -> float:
    from xks_proxy.observability.logging import log_request

    async def one(raw: list[tuple[bytes, bytes]], body: bytes) -> None:
        started = time.perf_counter()
        outcome = await service.handle("POST", PATH.encode(), b"", raw, body)
        assert outcome.status == 200, outcome.body
        if metrics is not None:
            metrics.observe(outcome.log, time.perf_counter() - started)
        log_request(outcome.log)

    cpu = time.process_time()
    for start in range(0, len(signed), concurrency):
        await asyncio.gather(*(one(raw, body) for raw, body in signed[start : start + concurrency]))
    return (time.process_time() - cpu) / len(signed) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("XKS_BENCH", "1")
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - request log lines go nowhere
    signed = requests(args.requests)
    results: dict[str, float] = {}
    scenarios = [
        ("baseline (no authz, no audit, no metrics)", False, "off", False),
        ("+ Cedar authorization (cache hits)", True, "off", False),
        ("+ metrics", False, "off", True),
        ("+ audit, no fsync (default)", False, "nofsync", False),
        ("+ audit, fsync", False, "fsync", False),
        ("everything (authz + metrics + audit fsync)", True, "fsync", True),
    ]
    for name, authz, audit, with_metrics in scenarios:
        with tempfile.TemporaryDirectory() as tmp:
            metrics = None
            if with_metrics:
                os.environ["PROMETHEUS_MULTIPROC_DIR"] = tmp
                from xks_proxy.observability.metrics import RequestMetrics

                metrics = RequestMetrics() if not hasattr(main, "metrics") else main.metrics  # type: ignore[attr-defined]
                main.metrics = metrics  # type: ignore[attr-defined]
            service = XksService(config(Path(tmp), authz=authz, audit=audit), InstantHsm())
            asyncio.run(run(service, signed[:2000], metrics, args.concurrency))  # warm-up
            results[name] = asyncio.run(run(service, signed, metrics, args.concurrency))
            service.close()
    base = results["baseline (no authz, no audit, no metrics)"]
    print(f"{'scenario':48} {'us CPU/request':>15} {'added':>8}", file=sys.__stdout__)
    for name, value in results.items():
        print(f"{name:48} {value:15.1f} {value - base:8.1f}", file=sys.__stdout__)


if __name__ == "__main__":
    main()
