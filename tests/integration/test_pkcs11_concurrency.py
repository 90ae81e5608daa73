"""Many threads through one Pkcs11KeyManager: every result must be right, nothing may crash.

python-pkcs11 releases the GIL in C calls and initialises SoftHSM without its
mutexes; without the adapter's module lock this very test segfaults or returns
spurious CKR_GENERAL_ERROR (see docs/decisions/pkcs11-library.md).
"""

from __future__ import annotations

import dataclasses
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from xks_proxy.keymanager.base import GcmCiphertext
from xks_proxy.keymanager.pkcs11 import Pkcs11KeyManager, Pkcs11Settings
from xks_proxy.protocol.errors import InvalidCiphertextException

pytestmark = pytest.mark.hsm

THREADS = 16
CALLS_PER_THREAD = 500


def _worker(manager: Pkcs11KeyManager, seed: int, start: threading.Barrier) -> int:
    """Mixed encrypt/decrypt calls; returns how many were checked. Raises on any error."""
    rng = random.Random(seed)
    mine: list[tuple[bytes, bytes, GcmCiphertext]] = []
    checked = 0
    start.wait()
    for call in range(CALLS_PER_THREAD):
        choice = rng.random()
        if not mine or choice < 0.45:
            plaintext = os.urandom(rng.choice((0, 1, 32, 100, 4300)))
            aad = os.urandom(rng.choice((0, 16, 300)))
            mine.append((plaintext, aad, manager.encrypt("foo", plaintext, aad)))
        elif choice < 0.9:
            plaintext, aad, sealed = mine[rng.randrange(len(mine))]
            opened = manager.decrypt("foo", sealed.ciphertext, sealed.iv, sealed.tag, aad)
            assert opened == plaintext, f"thread {seed} call {call}: wrong plaintext"
        elif choice < 0.95:
            _, aad, sealed = mine[rng.randrange(len(mine))]
            bad_tag = bytes([sealed.tag[0] ^ 1]) + sealed.tag[1:]
            with pytest.raises(InvalidCiphertextException):
                manager.decrypt("foo", sealed.ciphertext, sealed.iv, bad_tag, aad)
        else:
            assert manager.describe_key("encrypt_only_key").key_usage == ("ENCRYPT",)
        checked += 1
    for plaintext, aad, sealed in mine:  # everything made here still opens at the end
        assert manager.decrypt("foo", sealed.ciphertext, sealed.iv, sealed.tag, aad) == plaintext
    return checked


def _stress(manager: Pkcs11KeyManager, threads: int) -> None:
    start = threading.Barrier(threads)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(_worker, manager, seed, start) for seed in range(threads)]
        results = [future.result(timeout=300) for future in futures]  # re-raises any failure
    assert results == [CALLS_PER_THREAD] * threads


def test_16_threads_through_a_pool_of_4(key_manager: Pkcs11KeyManager) -> None:
    assert key_manager._pool.size == 4
    _stress(key_manager, THREADS)
    key_manager.health_check()


def test_8_threads_through_a_single_session(pkcs11_settings: Pkcs11Settings) -> None:
    manager = Pkcs11KeyManager.open(
        dataclasses.replace(pkcs11_settings, sessions=1, acquire_timeout=10.0)
    )
    try:
        _stress(manager, 8)
    finally:
        manager.close()
