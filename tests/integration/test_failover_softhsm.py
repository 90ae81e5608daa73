"""FailoverKeyManager over two real SoftHSM tokens holding the same key values."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from xks_proxy.keymanager.base import EkmInfo, GcmCiphertext, KeyDescription
from xks_proxy.keymanager.failover import FailoverKeyManager
from xks_proxy.keymanager.pkcs11 import Pkcs11KeyManager, Pkcs11Settings
from xks_proxy.keymanager.softhsm import (
    HEALTH_CHECK_KEY_LABEL,
    KeySpec,
    SoftHsmToken,
    provision_softhsm_token,
)
from xks_proxy.protocol.errors import InternalException, InvalidCiphertextException

pytestmark = pytest.mark.hsm

TOKENS = ("xks-failover-a", "xks-failover-b")
PIN = "failover-user-pin-1357"
SO_PIN = "failover-so-pin-2468"
AAD = b"\x00\x03abc\x00"


@pytest.fixture(scope="module")
def twin_settings(softhsm_token: SoftHsmToken) -> list[Pkcs11Settings]:
    """Two tokens with the same value for foo (the HSM cluster's replication, faked).

    In the shared SoftHSM directory, so the module's environment is the same as the
    other tests'; both tokens then share one module (and its lock) in this process.
    """
    values = {"foo": os.urandom(32), HEALTH_CHECK_KEY_LABEL: os.urandom(32)}
    settings = []
    for label in TOKENS:
        token = provision_softhsm_token(
            softhsm_token.conf_path.parent,
            token_label=label,
            pin=PIN,
            so_pin=SO_PIN,
            keys=[KeySpec("foo", True, True)],
            health_check_key_label=HEALTH_CHECK_KEY_LABEL,
            key_values=values,
            module_path=softhsm_token.module_path,
        )
        settings.append(
            Pkcs11Settings(
                module_path=token.module_path,
                token_label=label,
                slot=None,
                pin=PIN,
                health_check_key_label=HEALTH_CHECK_KEY_LABEL,
                sessions=2,
                environment=token.environment,
            )
        )
    return settings


@pytest.fixture
def twins(twin_settings: list[Pkcs11Settings]) -> Iterator[list[Pkcs11KeyManager]]:
    managers = [Pkcs11KeyManager.open(settings) for settings in twin_settings]
    try:
        yield managers
    finally:
        for manager in managers:
            manager.close()


class FaultInjector:
    """A KeyManager passing calls through to a real one until it is 'broken'."""

    def __init__(self, inner: Pkcs11KeyManager) -> None:
        self.inner = inner
        self.broken = threading.Event()
        self.served = 0
        self.refused = 0
        self._lock = threading.Lock()

    def _through(self, call: Callable[[], object]) -> object:
        if self.broken.is_set():
            with self._lock:
                self.refused += 1
            raise InternalException("HSM encrypt failed: CKR_DEVICE_REMOVED (injected)")
        result = call()
        with self._lock:
            self.served += 1
        return result

    def describe_key(self, external_key_id: str) -> KeyDescription:
        result = self._through(lambda: self.inner.describe_key(external_key_id))
        assert isinstance(result, KeyDescription)
        return result

    def encrypt(self, external_key_id: str, plaintext: bytes, hsm_aad: bytes) -> GcmCiphertext:
        result = self._through(lambda: self.inner.encrypt(external_key_id, plaintext, hsm_aad))
        assert isinstance(result, GcmCiphertext)
        return result

    def decrypt(
        self, external_key_id: str, ciphertext: bytes, iv: bytes, tag: bytes, hsm_aad: bytes
    ) -> bytes:
        result = self._through(
            lambda: self.inner.decrypt(external_key_id, ciphertext, iv, tag, hsm_aad)
        )
        assert isinstance(result, bytes)
        return result

    def health_check(self) -> None:
        self._through(self.inner.health_check)

    def info(self) -> EkmInfo:
        return self.inner.info()

    def close(self) -> None:
        self.inner.close()


def test_ciphertext_made_on_one_token_decrypts_on_the_other(
    twins: list[Pkcs11KeyManager],
) -> None:
    a, b = twins
    assert a.info().id != b.info().id  # really two tokens
    for source, target in ((a, b), (b, a)):
        plaintext = os.urandom(300)
        sealed = source.encrypt("foo", plaintext, AAD)
        assert target.decrypt("foo", sealed.ciphertext, sealed.iv, sealed.tag, AAD) == plaintext
        with pytest.raises(InvalidCiphertextException):
            target.decrypt("foo", sealed.ciphertext, sealed.iv, sealed.tag, AAD + b"x")


def _status(manager: FailoverKeyManager) -> dict[str, str]:
    return {status.name: status.status for status in manager.fleet_status()}


def _wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_traffic_survives_a_broken_hsm_and_its_repair(twins: list[Pkcs11KeyManager]) -> None:
    a, b = FaultInjector(twins[0]), FaultInjector(twins[1])
    failover = FailoverKeyManager(
        [("hsm-a", a), ("hsm-b", b)],
        degraded_latency_ms=500,  # four threads share one SoftHSM module lock
        health_timeout=1.0,
        recovery_seconds=0.3,
    )
    failover.health_check()
    assert _status(failover) == {"hsm-a": "ACTIVE", "hsm-b": "ACTIVE"}
    failover.start_probing(0.1)

    stop = threading.Event()
    failures: list[str] = []
    done = [0] * 4

    def traffic(index: int) -> None:
        rng = random.Random(index)
        while not stop.is_set():
            plaintext = os.urandom(rng.choice((0, 1, 32, 4300)))
            aad = os.urandom(rng.choice((0, 20)))
            try:
                sealed = failover.encrypt("foo", plaintext, aad)
                opened = failover.decrypt("foo", sealed.ciphertext, sealed.iv, sealed.tag, aad)
            except Exception as exc:
                failures.append(repr(exc))
                continue
            if opened != plaintext:
                failures.append("wrong plaintext")
            done[index] += 1

    threads = [threading.Thread(target=traffic, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.4)
        assert a.served > 0 and b.served > 0  # round robin over both

        a.broken.set()  # mid-traffic: hsm-a starts failing every call
        assert _wait_for(lambda: _status(failover)["hsm-a"] == "UNAVAILABLE", 2.0)
        status = failover.fleet_status()[0]
        assert status.last_error is not None and "injected" in status.last_error
        served_by_b = b.served
        time.sleep(0.5)
        assert _status(failover)["hsm-a"] == "UNAVAILABLE"  # the prober confirms it down
        assert b.served > served_by_b  # hsm-b carries the load meanwhile

        a.broken.clear()  # repaired: the prober brings it back without a restart
        assert _wait_for(lambda: _status(failover)["hsm-a"] == "ACTIVE", 3.0)
        served_by_a = a.served
        time.sleep(0.4)
        assert a.served > served_by_a  # back in the rotation
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        failover.close()  # stops the prober; the twins fixture closing again is harmless
    assert failures == []
    assert a.refused > 0  # the fault really hit requests
    assert min(done) > 0
    assert _status(failover) == {"hsm-a": "ACTIVE", "hsm-b": "ACTIVE"}
