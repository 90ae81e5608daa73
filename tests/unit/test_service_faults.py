"""Deadlines, load shedding and HSM faults, with a stand-in key manager (fault injection).

The real service object answers real botocore-signed requests; only the HSM is
replaced, by one that can hang, fail or be slow on demand.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

from e2e.proxy import sign
from xks_proxy.config import ProxyConfig, parse_config
from xks_proxy.keymanager.base import EkmInfo, GcmCiphertext, KeyDescription
from xks_proxy.protocol.errors import InternalException
from xks_proxy.service import Outcome, XksService

AKID, SECRET = "BETWEEN2TENAND3TENCHARACTERS", "PleaseReplaceThisWithSomeSecretOfLength43To64"
PATH = "/p/kms/xks/v1/keys/foo/encrypt"
BODY = json.dumps(
    {
        "requestMetadata": {
            "awsPrincipalArn": "arn:aws:iam::1:user/a",
            "kmsKeyArn": "arn:aws:kms:us-east-1:1:key/k",
            "kmsOperation": "Encrypt",
            "kmsRequestId": "r",
        },
        "plaintext": "AAAA",
        "encryptionAlgorithm": "AES_GCM",
    }
).encode()
HEALTH_BODY = b'{"requestMetadata":{"kmsRequestId":"h","kmsOperation":"KmsHealthCheck"}}'


class StandInHsm:
    """A KeyManager whose calls can be made to hang, fail or slow down."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.release.set()
        self.fail: Exception | None = None
        self.delay = 0.0
        self.calls = 0

    def _work(self) -> None:
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        self.release.wait(30)
        if self.fail is not None:
            raise self.fail

    def describe_key(self, external_key_id: str) -> KeyDescription:
        self._work()
        return KeyDescription("AES_256", ("ENCRYPT", "DECRYPT"))

    def encrypt(self, external_key_id: str, plaintext: bytes, hsm_aad: bytes) -> GcmCiphertext:
        self._work()
        return GcmCiphertext(b"\0" * 12, plaintext, b"\1" * 16)

    def decrypt(
        self, external_key_id: str, ciphertext: bytes, iv: bytes, tag: bytes, hsm_aad: bytes
    ) -> bytes:
        self._work()
        return ciphertext

    def health_check(self) -> None:
        self._work()

    def info(self) -> EkmInfo:
        return EkmInfo("Stand-in", "hsm-1", "stand-in 1.0")

    def close(self) -> None:
        self.release.set()


def config(tmp_path: Path, *, audit: dict[str, Any] | None = None, **limits: int) -> ProxyConfig:
    return parse_config(
        {
            "server": {"allow_plain_http": True, "state_dir": str(tmp_path / "state")},
            "audit": audit or {},
            "hsm": {"module": "/x.so", "token_label": "t", "pin": "1", "sessions": 2},
            "limits": {"request_timeout_ms": 100, **limits},
            "key_stores": [
                {
                    "name": "s",
                    "uri_prefix": "p",
                    "credentials": [{"access_key_id": AKID, "secret_access_key": SECRET}],
                }
            ],
        },
        base_dir=tmp_path,
    )


async def call(service: XksService, path: str = PATH, body: bytes = BODY) -> Outcome:
    headers = sign(
        "POST",
        f"http://proxy.test{path}",
        body,
        (AKID, SECRET),
        {"Content-Type": "application/json"},
    )
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    raw.append((b"host", b"proxy.test"))
    return await service.handle("POST", path.encode(), b"", raw, body)


def error_name(outcome: Outcome) -> str:
    return str(json.loads(outcome.body)["errorName"])


def test_hung_hsm_gives_503_within_the_deadline_and_never_a_late_200(tmp_path: Path) -> None:
    """A hung HSM: DependencyTimeoutException in ~request_timeout_ms, and later
    requests (queued behind the hung threads) also answer 503 instead of hanging."""
    hsm = StandInHsm()
    service = XksService(config(tmp_path), hsm)

    async def scenario() -> None:
        hsm.release.clear()
        started = time.monotonic()
        outcomes = await asyncio.gather(*(call(service) for _ in range(10)))
        elapsed = time.monotonic() - started
        assert [o.status for o in outcomes] == [503] * 10
        assert {error_name(o) for o in outcomes} == {"DependencyTimeoutException"}
        assert elapsed < 1.0  # 100 ms budget, not the 30 s hang
        calls_while_hung = hsm.calls
        hsm.release.set()
        await asyncio.sleep(0.2)
        # Queued calls whose deadline passed were dropped, not run late against the HSM.
        assert hsm.calls == calls_while_hung
        assert calls_while_hung <= 2  # only the two pool threads ever started
        assert (await call(service)).status == 200  # and the proxy recovered

    asyncio.run(scenario())
    service.close()


def test_slow_hsm_past_the_budget_is_503(tmp_path: Path) -> None:
    hsm = StandInHsm()
    hsm.delay = 0.3
    service = XksService(config(tmp_path), hsm)
    outcome = asyncio.run(call(service))
    assert outcome.status == 503 and error_name(outcome) == "DependencyTimeoutException"
    service.close()


def test_hsm_failure_is_500_not_key_not_found(tmp_path: Path) -> None:
    hsm = StandInHsm()
    service = XksService(config(tmp_path), hsm)
    hsm.fail = InternalException("CKR_DEVICE_ERROR")
    outcome = asyncio.run(call(service))
    assert outcome.status == 500 and error_name(outcome) == "InternalException"
    hsm.fail = RuntimeError("something unexpected inside the adapter")
    outcome = asyncio.run(call(service))
    assert outcome.status == 500 and error_name(outcome) == "InternalException"
    service.close()


def test_in_flight_cap_sheds_load_with_429(tmp_path: Path) -> None:
    """Over max_in_flight, requests are refused at once with ThrottlingException."""
    hsm = StandInHsm()
    service = XksService(config(tmp_path, max_in_flight=3, request_timeout_ms=2000), hsm)

    async def scenario() -> None:
        hsm.release.clear()
        busy = [asyncio.ensure_future(call(service)) for _ in range(3)]
        await asyncio.sleep(0.05)
        started = time.monotonic()
        shed = await call(service)
        assert shed.status == 429 and error_name(shed) == "ThrottlingException"
        assert time.monotonic() - started < 0.1
        hsm.release.set()
        assert [o.status for o in await asyncio.gather(*busy)] == [200] * 3
        assert (await call(service)).status == 200

    asyncio.run(scenario())
    service.close()


def test_health_answers_from_cache_and_reports_failure(tmp_path: Path) -> None:
    """Spec: GetHealthStatus MAY answer from a cache no older than a minute."""
    hsm = StandInHsm()
    service = XksService(config(tmp_path), hsm)

    async def scenario() -> None:
        first = await call(service, "/p/kms/xks/v1/health", HEALTH_BODY)
        assert first.status == 200, first.body
        calls = hsm.calls
        for _ in range(5):
            assert (await call(service, "/p/kms/xks/v1/health", HEALTH_BODY)).status == 200
        assert hsm.calls == calls  # served from the fresh result
        hsm.fail = InternalException("token removed")
        service.health.report = None  # force a new check
        failed = await call(service, "/p/kms/xks/v1/health", HEALTH_BODY)
        assert failed.status == 500 and error_name(failed) == "InternalException"

    asyncio.run(scenario())
    service.close()


def test_slow_health_round_trip_is_degraded(tmp_path: Path) -> None:
    hsm = StandInHsm()
    hsm.delay = 0.06  # over the 50 ms default threshold, under the 100 ms budget
    service = XksService(config(tmp_path), hsm)
    outcome = asyncio.run(call(service, "/p/kms/xks/v1/health", HEALTH_BODY))
    assert outcome.status == 200
    assert json.loads(outcome.body)["ekmFleetDetails"][0]["healthStatus"] == "DEGRADED"
    service.close()


def test_key_store_quota(tmp_path: Path) -> None:
    document: dict[str, Any] = {
        "server": {"allow_plain_http": True, "state_dir": str(tmp_path / "state")},
        "hsm": {"module": "/x.so", "token_label": "t", "pin": "1"},
        "key_stores": [
            {
                "name": "s",
                "uri_prefix": "p",
                "requests_per_second": 1,
                "burst": 5,
                "credentials": [{"access_key_id": AKID, "secret_access_key": SECRET}],
            }
        ],
    }
    service = XksService(parse_config(document, base_dir=tmp_path), StandInHsm())

    async def scenario() -> list[Outcome]:
        return [await call(service) for _ in range(8)]

    outcomes = asyncio.run(scenario())
    assert [o.status for o in outcomes[:5]] == [200] * 5
    assert {o.status for o in outcomes[5:]} == {429}
    assert error_name(outcomes[-1]) == "ThrottlingException"
    service.close()
