"""PKCS#11 faults recover without a restart, each path proven by fault injection.

On a real SoftHSMv2 token. Faults come from three places:

* :class:`Faults` wraps python-pkcs11's key operations (``EncryptMixin.encrypt`` and
  ``DecryptMixin.decrypt``), the key search (``adapter._search``) and C_OpenSession
  (``adapter._open_session_on``), so they raise a chosen python-pkcs11 exception
  (``DeviceError``, ``SessionHandleInvalid``...) or sleep, like a failing or slow HSM.
  The key-operation faults run where the real C call would, under the module lock.
* :class:`LibShim` stands in for the module's ``pkcs11.lib`` object: it counts
  C_Finalize/C_Initialize and can make C_Initialize fail (a dead HSM).
* Real faults behind the adapter's back: sessions closed, the login logged out,
  C_Finalize called on the module.

Each test shows the failing call's error class (InternalException, never
KeyNotFound), that the next calls work without restarting anything (asserted via
:meth:`Pkcs11KeyManager.recovery_stats` and the log), and, where threads are
involved, that every call either works or answers a clean XKS error in bounded time.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pkcs11
import pkcs11.types
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pkcs11 import exceptions as p11_errors

from xks_proxy.keymanager import pkcs11 as adapter
from xks_proxy.keymanager.pkcs11 import (
    ESCALATE_AFTER_FAILURES,
    Pkcs11KeyManager,
    Pkcs11Settings,
    RecoveryStats,
)
from xks_proxy.keymanager.softhsm import (
    HEALTH_CHECK_KEY_LABEL,
    KeySpec,
    SoftHsmToken,
    provision_softhsm_token,
)
from xks_proxy.protocol.errors import (
    DependencyTimeoutException,
    InternalException,
    InvalidCiphertextException,
    KeyNotFoundException,
    XksError,
)

pytestmark = pytest.mark.hsm

AAD = b"\x00\x07recover\x00"
KNOWN_LABEL = "recovery-known-key"
KNOWN_VALUE = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566778899aabbccddeeff0")
SECOND_TOKEN = "xks-recovery-b"
SECOND_PIN = "recovery-user-pin-2468"
SECOND_SO_PIN = "recovery-so-pin-1357"
INTERVAL = 0.05  # recovery_interval in these tests
MAX_INTERVAL = 0.4  # recovery_max_interval
CLEAN_ERRORS = (InternalException, DependencyTimeoutException)

DEVICE_ERRORS: list[type[p11_errors.PKCS11Error]] = [
    p11_errors.DeviceError,
    p11_errors.DeviceRemoved,
    p11_errors.DeviceMemory,
    p11_errors.TokenNotPresent,
    p11_errors.TokenNotRecognised,
]
SESSION_ERRORS: list[type[p11_errors.PKCS11Error]] = [
    p11_errors.SessionHandleInvalid,
    p11_errors.SessionClosed,
    p11_errors.OperationActive,
]


# ------------------------------------------------------------------ fault injection


Hook = Callable[[Any], None]


class Faults:
    """Failing or slow stand-ins for the HSM calls the adapter makes.

    ``fail(point, error, times)`` makes the next ``times`` calls at ``point`` raise
    ``error`` (``times=None``: every call until cleared); ``slow(point, seconds)`` makes
    the next call sleep first; ``keys_hidden`` makes every search find nothing. Points:
    "encrypt", "decrypt" (the key's C_EncryptInit + C_Encrypt...), "search"
    (C_FindObjects*), "open" (C_OpenSession). Thread-safe.
    """

    POINTS = ("encrypt", "decrypt", "search", "open")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._lock = threading.Lock()
        self._hooks: dict[str, list[Hook]] = {point: [] for point in self.POINTS}
        self.raised = dict.fromkeys(self.POINTS, 0)
        self.calls = dict.fromkeys(self.POINTS, 0)
        self.keys_hidden = False  # every search finds nothing
        real_encrypt = pkcs11.types.EncryptMixin.encrypt
        real_decrypt = pkcs11.types.DecryptMixin.decrypt
        real_search = adapter._search
        real_open = adapter._open_session_on

        def encrypt(key: Any, *args: Any, **kwargs: Any) -> Any:
            self._run("encrypt", key)
            return real_encrypt(key, *args, **kwargs)

        def decrypt(key: Any, *args: Any, **kwargs: Any) -> Any:
            self._run("decrypt", key)
            return real_decrypt(key, *args, **kwargs)

        def search(session: Any, label: str) -> list[Any]:
            self._run("search", session)
            if self.keys_hidden:
                return []  # what a token shows a session that lost its login
            return real_search(session, label)

        def open_session(token: Any) -> Any:
            self._run("open", token)
            return real_open(token)

        monkeypatch.setattr(pkcs11.types.EncryptMixin, "encrypt", encrypt)
        monkeypatch.setattr(pkcs11.types.DecryptMixin, "decrypt", decrypt)
        monkeypatch.setattr(adapter, "_search", search)
        monkeypatch.setattr(adapter, "_open_session_on", open_session)

    def _run(self, point: str, target: Any) -> None:
        with self._lock:
            self.calls[point] += 1
            hooks = list(self._hooks[point])
        for hook in hooks:
            hook(target)

    def add(self, point: str, hook: Hook) -> None:
        with self._lock:
            self._hooks[point].append(hook)

    def clear(self, point: str | None = None) -> None:
        with self._lock:
            for name in self.POINTS if point is None else (point,):
                self._hooks[name].clear()
            self.keys_hidden = False

    def fail(
        self,
        point: str,
        error: type[Exception],
        times: int | None = 1,
        when: Callable[[Any], bool] | None = None,
    ) -> None:
        left = [times]

        def hook(target: Any) -> None:
            if when is not None and not when(target):
                return
            with self._lock:
                if left[0] is not None:
                    if left[0] <= 0:
                        return
                    left[0] -= 1
                self.raised[point] += 1
            raise error()

        self.add(point, hook)

    def slow(self, point: str, seconds: float, started: threading.Event) -> None:
        once = [True]

        def hook(target: Any) -> None:
            with self._lock:
                if not once[0]:
                    return
                once[0] = False
            started.set()
            time.sleep(seconds)  # inside the C call's place: the module lock is held

        self.add(point, hook)


class LibShim:
    """The module's ``pkcs11.lib`` with C_Finalize/C_Initialize counted, and a switch
    that makes C_Initialize fail (an HSM that stays dead)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.initialize_calls = 0
        self.finalize_calls = 0
        self.initialize_times: list[float] = []
        self.initialize_error: type[Exception] | None = None

    def initialize(self) -> None:
        self.initialize_calls += 1
        self.initialize_times.append(time.monotonic())
        if self.initialize_error is not None:
            raise self.initialize_error()
        self.real.initialize()

    def finalize(self) -> None:
        self.finalize_calls += 1
        self.real.finalize()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


# ------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def known_key(add_softhsm_keys: Callable[..., None]) -> bytes:
    """A key whose value the test knows, to prove the right key is used after recovery."""
    add_softhsm_keys([KeySpec(KNOWN_LABEL, True, True)], {KNOWN_LABEL: KNOWN_VALUE})
    return KNOWN_VALUE


@pytest.fixture
def settings(pkcs11_settings: Pkcs11Settings) -> Pkcs11Settings:
    return dataclasses.replace(
        pkcs11_settings, recovery_interval=INTERVAL, recovery_max_interval=MAX_INTERVAL
    )


@pytest.fixture
def manager(settings: Pkcs11Settings, known_key: bytes) -> Iterator[Pkcs11KeyManager]:
    opened = Pkcs11KeyManager.open(settings)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Faults:
    return Faults(monkeypatch)


@pytest.fixture
def lib_shim(manager: Pkcs11KeyManager, monkeypatch: pytest.MonkeyPatch) -> LibShim:
    module = manager._module
    shim = LibShim(module.lib)
    monkeypatch.setattr(module, "lib", shim)
    return shim


def extra_token(
    softhsm_token: SoftHsmToken, label: str, module_path: str | None = None
) -> tuple[SoftHsmToken, Pkcs11Settings]:
    """Another token in the shared SoftHSM directory (PIN SECOND_PIN, key foo), and
    settings opening it through ``module_path`` (default: the shared module)."""
    token = provision_softhsm_token(
        softhsm_token.conf_path.parent,
        token_label=label,
        pin=SECOND_PIN,
        so_pin=SECOND_SO_PIN,
        keys=[KeySpec("foo", True, True)],
        health_check_key_label=HEALTH_CHECK_KEY_LABEL,
        module_path=softhsm_token.module_path,
    )
    settings = Pkcs11Settings(
        module_path=module_path or token.module_path,
        token_label=label,
        slot=None,
        pin=SECOND_PIN,
        health_check_key_label=HEALTH_CHECK_KEY_LABEL,
        sessions=2,
        environment=token.environment,
        recovery_interval=INTERVAL,
        recovery_max_interval=MAX_INTERVAL,
    )
    return token, settings


@pytest.fixture(scope="module")
def second_token_settings(softhsm_token: SoftHsmToken) -> Pkcs11Settings:
    """A second token in the same SoftHSM directory: the same module (and module lock,
    and re-initialisations) as the first, like two partitions of one HSM."""
    return extra_token(softhsm_token, SECOND_TOKEN)[1]


# ------------------------------------------------------------------------- helpers


def round_trip(manager: Pkcs11KeyManager, label: str = "foo", size: int = 64) -> None:
    plaintext = os.urandom(size)
    sealed = manager.encrypt(label, plaintext, AAD)
    assert manager.decrypt(label, sealed.ciphertext, sealed.iv, sealed.tag, AAD) == plaintext


def assert_known_key_is_used(manager: Pkcs11KeyManager) -> None:
    """Encrypt in the HSM, decrypt in software with the key value: the right key was used."""
    plaintext = os.urandom(100)
    sealed = manager.encrypt(KNOWN_LABEL, plaintext, AAD)
    opened = AESGCM(KNOWN_VALUE).decrypt(sealed.iv, sealed.ciphertext + sealed.tag, AAD)
    assert opened == plaintext


def warm(manager: Pkcs11KeyManager, labels: tuple[str, ...] = ("foo", KNOWN_LABEL)) -> None:
    """Use every pooled session, so each holds key handles found in this generation."""
    for _ in range(2 * manager._pool.size):
        for label in labels:
            round_trip(manager, label)


def stats(manager: Pkcs11KeyManager) -> RecoveryStats:
    return manager.recovery_stats()


def messages(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(record.getMessage() for record in caplog.records)


def session_handles(manager: Pkcs11KeyManager) -> set[int]:
    # White-box: the pool's idle places (every place, when no call is running).
    places = [p.session for p in manager._pool.places if p.session is not None]
    return {session.handle for session in places}  # type: ignore[attr-defined]


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


def recover_within(manager: Pkcs11KeyManager, timeout: float) -> int:
    """Call until a round trip works (rate-limited recovery may need a pause); returns
    how many calls failed first. Every failure must be a clean XKS error."""
    failed = 0
    end = time.monotonic() + timeout
    while True:
        try:
            round_trip(manager)
            return failed
        except CLEAN_ERRORS:
            failed += 1
            if time.monotonic() > end:
                raise
            time.sleep(0.01)


# ------------------------------------------------------------- sessions: evict + reopen


@pytest.mark.parametrize("error", SESSION_ERRORS, ids=lambda e: e.__name__)
def test_broken_session_is_replaced_and_the_call_retried(
    manager: Pkcs11KeyManager,
    faults: Faults,
    caplog: pytest.LogCaptureFixture,
    error: type[p11_errors.PKCS11Error],
) -> None:
    warm(manager)
    before = stats(manager)
    faults.fail("encrypt", error, times=1)
    with caplog.at_level(logging.WARNING, logger="xks_proxy.hsm"):
        round_trip(manager)  # retried once on a fresh session: the caller sees nothing
    after = stats(manager)
    assert faults.raised["encrypt"] == 1
    assert after.sessions_replaced == before.sessions_replaced + 1
    assert after.generation == before.generation  # no module re-initialisation needed
    assert "replacing it" in messages(caplog)


@pytest.mark.parametrize("error", SESSION_ERRORS, ids=lambda e: e.__name__)
def test_session_that_breaks_again_answers_internal_then_heals(
    manager: Pkcs11KeyManager, faults: Faults, error: type[p11_errors.PKCS11Error]
) -> None:
    warm(manager)
    before = stats(manager)
    faults.fail("encrypt", error, times=2)  # the retry on the fresh session fails too
    with pytest.raises(InternalException) as caught:
        manager.encrypt("foo", b"x", AAD)
    assert not isinstance(caught.value, KeyNotFoundException)
    assert "HSM encrypt failed: CKR_" in caught.value.error_message
    round_trip(manager)  # the next call works: no restart
    assert stats(manager).sessions_replaced == before.sessions_replaced + 2


# python-pkcs11 reports the failed C_FindObjectsFinal of its abandoned search context
# as an "unraisable" exception; the adapter makes it happen under the module lock.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_sessions_closed_behind_the_adapters_back(manager: Pkcs11KeyManager) -> None:
    warm(manager)
    old = session_handles(manager)
    module = manager._module
    attempts = stats(manager).module_reinit_attempts
    with module.lock:  # as the adapter would: never two threads in the module
        for place in manager._pool.places:
            assert place.session is not None
            place.session.close()
    for _ in range(3 * manager._pool.size):
        round_trip(manager)
    assert not session_handles(manager) & old
    assert stats(manager).sessions_replaced >= manager._pool.size
    assert stats(manager).module_reinit_attempts == attempts  # no re-init was needed


# --------------------------------------------------------------------- login: re-login


def test_user_not_logged_in_logs_in_again(manager: Pkcs11KeyManager, faults: Faults) -> None:
    warm(manager)
    before = stats(manager)
    faults.fail("encrypt", p11_errors.UserNotLoggedIn, times=1)
    round_trip(manager)
    after = stats(manager)
    assert after.relogins == before.relogins + 1
    assert after.sessions_replaced == before.sessions_replaced + 1


def test_login_lost_behind_the_adapters_back(
    manager: Pkcs11KeyManager, caplog: pytest.LogCaptureFixture
) -> None:
    warm(manager)
    module = manager._module
    with module.lock:
        for login in module.logins.values():
            login.session.close()  # C_Logout: every session of the application loses it
    # SoftHSM now hides the private keys from searches; the cached handles still work
    # for some calls, searches find nothing: never KeyNotFound, log in again.
    with caplog.at_level(logging.WARNING, logger="xks_proxy.hsm"):
        for _ in range(2 * manager._pool.size):
            round_trip(manager)
            assert manager.describe_key("encrypt_only_key").key_usage == ("ENCRYPT",)
    with pytest.raises(KeyNotFoundException):
        manager.describe_key("no-such-key-after-relogin")
    assert stats(manager).relogins >= 1
    assert "logged in again" in messages(caplog)


def test_keys_invisible_is_internal_never_key_not_found(
    manager: Pkcs11KeyManager, faults: Faults
) -> None:
    # A login that cannot be restored: every search comes back empty (not even the
    # health-check key is visible), as on a token whose login was lost for good.
    before = stats(manager)
    faults.keys_hidden = True
    with pytest.raises(InternalException, match="not visible") as caught:
        manager.describe_key("foo")
    assert not isinstance(caught.value, KeyNotFoundException)
    assert stats(manager).relogins == before.relogins + 2  # logged in again, retried
    faults.clear()
    round_trip(manager)
    assert manager.describe_key("foo").key_usage == ("ENCRYPT", "DECRYPT")


# ----------------------------------------------------- device errors: full re-init


@pytest.mark.parametrize("error", DEVICE_ERRORS, ids=lambda e: e.__name__)
def test_device_failure_reinitialises_the_module(
    manager: Pkcs11KeyManager,
    faults: Faults,
    lib_shim: LibShim,
    caplog: pytest.LogCaptureFixture,
    error: type[p11_errors.PKCS11Error],
) -> None:
    warm(manager)
    sealed_before = manager.encrypt("foo", b"made before the outage", AAD)
    before = stats(manager)
    faults.fail("encrypt", error, times=1)
    with caplog.at_level(logging.INFO, logger="xks_proxy.hsm"):
        with pytest.raises(InternalException) as caught:
            manager.encrypt("foo", b"x", AAD)
        assert not isinstance(caught.value, KeyNotFoundException)
        assert stats(manager).recovering
        # The next calls work: C_Finalize, C_Initialize, token found, logged in again.
        warm(manager)
        assert_known_key_is_used(manager)
        manager.health_check()
    after = stats(manager)
    assert lib_shim.finalize_calls == 1 and lib_shim.initialize_calls == 1
    assert after.generation == before.generation + 1
    assert after.module_reinit_attempts == before.module_reinit_attempts + 1
    assert after.resyncs == before.resyncs + 1
    assert not after.recovering
    # Every pooled session was reopened in the new generation.
    assert {place.generation for place in manager._pool.places} == {after.generation}
    text = messages(caplog)
    assert "will be re-initialised" in text
    assert "re-initialising it (C_Finalize, C_Initialize)" in text
    assert "found again" in text
    # Ciphertext made before the re-initialisation still opens: same key, new handle.
    opened = manager.decrypt(
        "foo", sealed_before.ciphertext, sealed_before.iv, sealed_before.tag, AAD
    )
    assert opened == b"made before the outage"


def test_device_failure_during_search_reinitialises(
    manager: Pkcs11KeyManager, faults: Faults, lib_shim: LibShim
) -> None:
    faults.fail("search", p11_errors.DeviceError, times=1)
    with pytest.raises(InternalException):
        manager.describe_key("decrypt_only_key")  # not cached: the search fails
    assert manager.describe_key("decrypt_only_key").key_usage == ("DECRYPT",)
    assert lib_shim.initialize_calls == 1


def test_finalize_behind_the_adapters_back(manager: Pkcs11KeyManager) -> None:
    warm(manager)
    module = manager._module
    before = stats(manager)
    with module.lock:
        module.lib.finalize()  # every session, handle and login is gone
    with pytest.raises(InternalException, match="CRYPTOKI_NOT_INITIALIZED"):
        manager.encrypt("foo", b"x", AAD)
    warm(manager)
    assert_known_key_is_used(manager)
    after = stats(manager)
    assert after.generation == before.generation + 1
    assert after.resyncs == before.resyncs + 1


def test_key_handles_of_an_old_generation_are_never_used(
    manager: Pkcs11KeyManager, faults: Faults
) -> None:
    # Object handles restart after C_Initialize: a handle cached before could name a
    # different key afterwards. Cache handles for several keys on every session, then
    # re-initialise and check the known key is really the one used.
    for _ in range(manager._pool.size):
        for label in ("foo", KNOWN_LABEL, HEALTH_CHECK_KEY_LABEL):
            round_trip(manager, label)
    faults.fail("encrypt", p11_errors.DeviceError, times=1)
    with pytest.raises(InternalException):
        manager.encrypt(KNOWN_LABEL, b"x", AAD)
    for _ in range(2 * manager._pool.size):
        assert_known_key_is_used(manager)
    for place in manager._pool.places:
        assert place.generation == manager._module.generation


def test_sessions_that_cannot_be_reopened_escalate_to_reinit(
    manager: Pkcs11KeyManager, faults: Faults, lib_shim: LibShim
) -> None:
    warm(manager)
    first_generation = manager._module.generation

    # Every session dies, and C_OpenSession keeps failing until the module is
    # re-initialised (a wedged module that session replacement cannot cure).
    def wedged(target: Any) -> bool:
        return manager._module.generation == first_generation

    faults.fail("encrypt", p11_errors.SessionHandleInvalid, times=None, when=wedged)
    faults.fail("open", p11_errors.GeneralError, times=None, when=wedged)
    errors: list[XksError] = []
    for _ in range(ESCALATE_AFTER_FAILURES):
        with pytest.raises(InternalException) as caught:
            round_trip(manager)
        errors.append(caught.value)
        if stats(manager).recovering:
            break
    assert stats(manager).recovering  # escalated after ESCALATE_AFTER_FAILURES strikes
    assert lib_shim.initialize_calls == 0
    round_trip(manager)
    assert lib_shim.initialize_calls == 1
    assert manager._module.generation == first_generation + 1
    assert all(not isinstance(e, KeyNotFoundException) for e in errors)


def test_general_error_outside_decrypt_escalates_but_bad_tags_never_do(
    manager: Pkcs11KeyManager, faults: Faults, lib_shim: LibShim
) -> None:
    warm(manager)
    sealed = manager.encrypt("foo", b"tamper with me", AAD)
    bad_tag = bytes([sealed.tag[0] ^ 1]) + sealed.tag[1:]
    for _ in range(3 * ESCALATE_AFTER_FAILURES):  # SoftHSM: CKR_GENERAL_ERROR on decrypt
        with pytest.raises(InvalidCiphertextException):
            manager.decrypt("foo", sealed.ciphertext, sealed.iv, bad_tag, AAD)
    assert not stats(manager).recovering and lib_shim.initialize_calls == 0
    faults.fail("encrypt", p11_errors.GeneralError, times=ESCALATE_AFTER_FAILURES)
    for _ in range(ESCALATE_AFTER_FAILURES):
        with pytest.raises(InternalException, match="CKR_GENERAL_ERROR"):
            manager.encrypt("foo", b"x", AAD)
    assert stats(manager).recovering
    round_trip(manager)
    assert lib_shim.initialize_calls == 1


def test_a_success_between_failures_resets_the_count(
    manager: Pkcs11KeyManager, faults: Faults, lib_shim: LibShim
) -> None:
    for _ in range(3):
        faults.fail("encrypt", p11_errors.GeneralError, times=ESCALATE_AFTER_FAILURES - 1)
        for _ in range(ESCALATE_AFTER_FAILURES - 1):
            with pytest.raises(InternalException):
                manager.encrypt("foo", b"x", AAD)
        round_trip(manager)
    assert lib_shim.initialize_calls == 0 and not stats(manager).recovering


# --------------------------------------------------------- rate limit: a dead module


def _hammer(
    manager: Pkcs11KeyManager, seconds: float, threads: int, pause: float = 0.0005
) -> tuple[int, list[BaseException], float]:
    """Call encrypt in a loop from several threads, ``pause`` seconds apart (requests
    arriving, not threads spinning: a spinning thread starves the others of the GIL,
    which every PKCS#11 call releases and must win back); returns (calls, unexpected
    errors, slowest call in seconds)."""
    stop = time.monotonic() + seconds
    lock = threading.Lock()
    unexpected: list[BaseException] = []
    counts = [0]
    slowest = [0.0]

    def loop() -> None:
        while time.monotonic() < stop:
            started = time.monotonic()
            try:
                manager.encrypt("foo", b"data", AAD)
            except CLEAN_ERRORS:
                pass
            except BaseException as exc:
                with lock:
                    unexpected.append(exc)
            elapsed = time.monotonic() - started
            with lock:
                counts[0] += 1
                slowest[0] = max(slowest[0], elapsed)
            time.sleep(pause)

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(seconds + 10)
        assert not worker.is_alive(), "a call hung"
    return counts[0], unexpected, slowest[0]


def test_dead_module_is_retried_at_the_rate_limit(
    manager: Pkcs11KeyManager,
    faults: Faults,
    lib_shim: LibShim,
    caplog: pytest.LogCaptureFixture,
) -> None:
    warm(manager)
    lib_shim.initialize_error = p11_errors.DeviceError  # C_Initialize fails: stays dead
    faults.fail("encrypt", p11_errors.DeviceError, times=1)
    seconds = 1.5
    with caplog.at_level(logging.INFO, logger="xks_proxy.hsm"):
        calls, unexpected, slowest = _hammer(manager, seconds, threads=4)
    assert unexpected == []
    assert slowest < 0.5  # every call answered fast: no waiting on a dead HSM
    attempts = lib_shim.initialize_calls
    # Back-off 0.05, 0.1, 0.2, 0.4, 0.4...: about 6 attempts in 1.5 s, not thousands.
    assert 3 <= attempts <= 9, attempts
    assert calls > 20 * attempts
    gaps = [
        b - a
        for a, b in zip(lib_shim.initialize_times[:-1], lib_shim.initialize_times[1:], strict=True)
    ]
    # (timestamps taken after C_Finalize, the back-off clock just before it: slack)
    assert all(gap >= INTERVAL * 0.7 for gap in gaps), gaps
    assert gaps[-1] >= MAX_INTERVAL * 0.9  # doubled up to the ceiling
    assert stats(manager).module_reinit_failures == attempts
    assert "C_Initialize failed" in messages(caplog)
    # The HSM comes back: the next attempt (within the back-off) brings everything back.
    lib_shim.initialize_error = None
    failed = recover_within(manager, timeout=MAX_INTERVAL + 2.0)
    assert failed >= 0
    warm(manager)
    manager.health_check()


def test_module_that_initialises_but_keeps_failing_backs_off_too(
    manager: Pkcs11KeyManager, faults: Faults, lib_shim: LibShim
) -> None:
    # C_Initialize works, yet every operation fails right after: re-initialising once
    # per call would spin, so the back-off grows until a call works.
    faults.fail("encrypt", p11_errors.DeviceError, times=None)
    calls, unexpected, slowest = _hammer(manager, 1.2, threads=3)
    assert unexpected == []
    assert slowest < 0.5
    assert 2 <= lib_shim.initialize_calls <= 8, lib_shim.initialize_calls
    assert calls > 20 * lib_shim.initialize_calls
    faults.clear()
    recover_within(manager, timeout=MAX_INTERVAL + 2.0)
    round_trip(manager)


# ------------------------------------------------------- concurrency during a re-init


def _traffic(
    manager: Pkcs11KeyManager,
    stop: threading.Event,
    index: int,
    results: dict[str, int],
    lock: threading.Lock,
) -> list[str]:
    """Round trips until stopped; returns what went wrong beyond clean XKS errors."""
    problems: list[str] = []
    while not stop.is_set():
        plaintext = os.urandom(1 + index)
        try:
            sealed = manager.encrypt("foo", plaintext, AAD)
            opened = manager.decrypt("foo", sealed.ciphertext, sealed.iv, sealed.tag, AAD)
        except CLEAN_ERRORS as exc:
            with lock:
                results[type(exc).__name__] = results.get(type(exc).__name__, 0) + 1
            continue
        except BaseException as exc:
            problems.append(repr(exc))
            continue
        if opened != plaintext:
            problems.append("wrong plaintext")
        with lock:
            results["ok"] = results.get("ok", 0) + 1
    return problems


def _run_traffic(
    managers: list[Pkcs11KeyManager], threads_each: int, disturb: Callable[[], None]
) -> tuple[dict[str, int], list[str]]:
    stop = threading.Event()
    results: dict[str, int] = {}
    problems: list[str] = []
    lock = threading.Lock()

    def worker(manager: Pkcs11KeyManager, index: int) -> None:
        found = _traffic(manager, stop, index, results, lock)
        with lock:
            problems.extend(found)

    threads = [
        threading.Thread(target=worker, args=(manager, index))
        for manager in managers
        for index in range(threads_each)
    ]
    for thread in threads:
        thread.start()
    try:
        disturb()
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
            assert not thread.is_alive(), "a call hung"
    return results, problems


def test_concurrent_callers_during_reinit_get_success_or_a_clean_error(
    manager: Pkcs11KeyManager, faults: Faults, lib_shim: LibShim
) -> None:
    warm(manager)

    def disturb() -> None:
        time.sleep(0.2)
        for _ in range(4):
            faults.fail("encrypt", p11_errors.DeviceError, times=1)
            time.sleep(0.25)
        # And once for real: C_Finalize behind the adapter's back, mid-traffic.
        with manager._module.lock:
            manager._module.lib.finalize()
        time.sleep(0.4)

    results, problems = _run_traffic([manager], 8, disturb)
    assert problems == []
    assert results.get("ok", 0) > 50
    assert results.get("InternalException", 0) >= 1
    assert lib_shim.initialize_calls >= 3  # several re-initialisations under traffic
    # Afterwards: everything works, without a restart.
    recover_within(manager, timeout=2.0)
    warm(manager)
    assert_known_key_is_used(manager)
    manager.health_check()


# ------------------------------------- several key managers sharing one module


def test_reinit_by_one_key_manager_does_not_break_another_on_the_same_module(
    manager: Pkcs11KeyManager,
    settings: Pkcs11Settings,
    second_token_settings: Pkcs11Settings,
    faults: Faults,
    caplog: pytest.LogCaptureFixture,
) -> None:
    other = Pkcs11KeyManager.open(second_token_settings)  # another token, same module
    twin = Pkcs11KeyManager.open(settings)  # same token: shares the login
    try:
        assert other._module is manager._module is twin._module
        for each in (manager, other, twin):
            warm(each, ("foo",))
        generation = manager._module.generation
        faults.fail(
            "encrypt",
            p11_errors.DeviceError,
            times=1,
            when=lambda key: key.session.token.label == settings.token_label,
        )
        with pytest.raises(InternalException):
            manager.encrypt("foo", b"x", AAD)
        with caplog.at_level(logging.INFO, logger="xks_proxy.hsm"):
            round_trip(manager)  # re-initialises the shared module
            assert manager._module.generation == generation + 1
            # The others notice the new generation and catch up: no error at all.
            for each in (other, twin):
                assert stats(each).recovering
                warm(each, ("foo",))
                each.health_check()
                assert not stats(each).recovering
                assert stats(each).resyncs == 1
        assert messages(caplog).count("found again") == 3
        # Closing one must not log out or finalize under the others.
        twin.close()
        round_trip(manager)
        round_trip(other)
    finally:
        twin.close()
        other.close()


def test_traffic_on_two_key_managers_while_one_reinitialises(
    manager: Pkcs11KeyManager, second_token_settings: Pkcs11Settings, faults: Faults
) -> None:
    other = Pkcs11KeyManager.open(second_token_settings)
    try:

        def disturb() -> None:
            time.sleep(0.2)
            for _ in range(3):
                faults.fail(
                    "encrypt",
                    p11_errors.DeviceRemoved,
                    times=1,
                    when=lambda key: key.session.token.label != SECOND_TOKEN,
                )
                time.sleep(0.3)

        results, problems = _run_traffic([manager, other], 4, disturb)
        assert problems == []
        assert results.get("ok", 0) > 50
        assert stats(other).resyncs >= 1
        recover_within(manager, timeout=2.0)
        recover_within(other, timeout=2.0)
    finally:
        other.close()


def test_a_token_that_keeps_failing_does_not_reinit_its_neighbour_every_second(
    manager: Pkcs11KeyManager,
    second_token_settings: Pkcs11Settings,
    faults: Faults,
    lib_shim: LibShim,
) -> None:
    # Every call on the first token fails with a device error; the second token, on the
    # same module, works. Its successes must not reset the back-off the first token's
    # failures build up: re-initialisations (which also hit the neighbour) slow down.
    other = Pkcs11KeyManager.open(second_token_settings)
    try:
        faults.fail(
            "encrypt",
            p11_errors.DeviceError,
            times=None,
            when=lambda key: key.session.token.label != SECOND_TOKEN,
        )

        def disturb() -> None:
            _hammer(manager, 1.2, threads=2)

        results, problems = _run_traffic([other], 2, disturb)
        assert problems == []
        assert 2 <= lib_shim.initialize_calls <= 8, lib_shim.initialize_calls
        assert results.get("ok", 0) > 10 * lib_shim.initialize_calls
        faults.clear()
        recover_within(manager, timeout=MAX_INTERVAL + 2.0)
        round_trip(other)
    finally:
        other.close()


def test_token_found_again_by_label_when_the_slot_list_changes(
    manager: Pkcs11KeyManager,
    softhsm_token: SoftHsmToken,
    faults: Faults,
    lib_shim: LibShim,
) -> None:
    # A token added while the module runs appears only after C_Initialize, and the
    # slot list changes: the key manager finds its token again by label.
    module = manager._module
    with module.lock:
        slots_before = {s.slot_id for s in module.lib.get_slots(token_present=True)}
    provision_softhsm_token(
        softhsm_token.conf_path.parent,
        token_label=f"xks-late-{os.getpid()}",
        pin=SECOND_PIN,
        so_pin=SECOND_SO_PIN,
        keys=[],
        health_check_key_label=HEALTH_CHECK_KEY_LABEL,
        module_path=softhsm_token.module_path,
    )
    faults.fail("encrypt", p11_errors.TokenNotPresent, times=1)
    with pytest.raises(InternalException):
        manager.encrypt("foo", b"x", AAD)
    round_trip(manager)
    with module.lock:
        slots_after = {s.slot_id for s in module.lib.get_slots(token_present=True)}
    assert slots_after != slots_before
    assert manager._slot_id in slots_after
    assert_known_key_is_used(manager)


def test_token_missing_after_reinit_is_retried_at_the_rate_limit(
    manager: Pkcs11KeyManager,
    faults: Faults,
    lib_shim: LibShim,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    lookups = [0]
    gone = threading.Event()
    gone.set()
    real_find = adapter._find_token_again

    def find_again(module: Any, key: Any) -> Any:
        lookups[0] += 1
        if gone.is_set():
            raise adapter._TokenMissing("token 'xks-test' is not present (injected)")
        return real_find(module, key)

    monkeypatch.setattr(adapter, "_find_token_again", find_again)
    faults.fail("encrypt", p11_errors.DeviceRemoved, times=1)
    with caplog.at_level(logging.INFO, logger="xks_proxy.hsm"):
        calls, unexpected, slowest = _hammer(manager, 1.0, threads=3)
    assert unexpected == [] and slowest < 0.5
    assert 2 <= lookups[0] <= 8, lookups[0]
    assert calls > 20 * lookups[0]
    assert "recovery failed" in messages(caplog)
    gone.clear()  # the token is back
    recover_within(manager, timeout=MAX_INTERVAL + 2.0)
    round_trip(manager)


# ------------------------------------------------------- a PIN the token refuses


@pytest.fixture
def login_attempts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts C_Login calls made by the adapter (recording the outcome)."""
    attempts: list[str] = []
    real = adapter._open_logged_in

    def open_logged_in(token: Any, pin: str) -> Any:
        try:
            session = real(token, pin)
        except p11_errors.PKCS11Error as exc:
            attempts.append(type(exc).__name__)
            raise
        attempts.append("ok")
        return session

    monkeypatch.setattr(adapter, "_open_logged_in", open_logged_in)
    return attempts


def _set_pin(manager: Pkcs11KeyManager, pin: str) -> None:
    # White-box: as if the PIN had been changed on the HSM after the proxy logged in.
    login = manager._module.logins[manager._login_key]
    login.pin = pin
    login.refused = None


def test_refused_pin_after_reinit_is_not_retried(
    manager: Pkcs11KeyManager,
    settings: Pkcs11Settings,
    faults: Faults,
    login_attempts: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    _set_pin(manager, "not-the-pin-0000")
    faults.fail("encrypt", p11_errors.DeviceError, times=1)
    with pytest.raises(InternalException):
        manager.encrypt("foo", b"x", AAD)
    with caplog.at_level(logging.INFO, logger="xks_proxy.hsm"):
        with pytest.raises(InternalException, match="refused the PIN"):
            manager.encrypt("foo", b"x", AAD)  # re-initialised; C_Login refused
        _, unexpected, slowest = _hammer(manager, 2 * MAX_INTERVAL + 0.3, threads=2)
    assert unexpected == [] and slowest < 0.5
    assert login_attempts == ["PinIncorrect"]  # once, never again: no PIN lockout
    assert "no more login attempts" in messages(caplog)
    # With the right PIN (a restart, in real life) it works again.
    _set_pin(manager, settings.pin)
    recover_within(manager, timeout=MAX_INTERVAL + 2.0)
    assert login_attempts[-1] == "ok"


def test_refused_pin_after_a_lost_login_is_not_retried(
    manager: Pkcs11KeyManager,
    settings: Pkcs11Settings,
    login_attempts: list[str],
) -> None:
    warm(manager)
    _set_pin(manager, "not-the-pin-0000")
    module = manager._module
    with module.lock:
        module.logins[manager._login_key].session.close()  # C_Logout behind our back
    refused = 0
    for _ in range(20):
        try:
            manager.describe_key("decrypt_only_key")  # not cached: needs a search
        except InternalException as exc:
            assert not isinstance(exc, KeyNotFoundException)
            refused += "refused the PIN" in exc.error_message
    assert refused >= 19
    assert login_attempts == ["PinIncorrect"]
    _set_pin(manager, settings.pin)
    assert manager.describe_key("decrypt_only_key").key_usage == ("DECRYPT",)
    assert login_attempts[-1] == "ok"


# --------------------------------------------------------------------- a slow HSM


def test_slow_hsm_makes_other_callers_time_out_in_bounded_time(
    settings: Pkcs11Settings, known_key: bytes, faults: Faults
) -> None:
    slow_settings = dataclasses.replace(settings, sessions=2, acquire_timeout=0.1)
    manager = Pkcs11KeyManager.open(slow_settings)
    try:
        warm(manager)
        started = threading.Event()
        faults.slow("encrypt", 0.5, started)
        slow_result: list[object] = []
        slow_call = threading.Thread(
            target=lambda: slow_result.append(manager.encrypt("foo", b"slow", AAD))
        )
        slow_call.start()
        assert started.wait(5)
        outcomes: list[tuple[str, float]] = []
        lock = threading.Lock()

        def other() -> None:
            began = time.monotonic()
            try:
                manager.encrypt("foo", b"quick", AAD)
                name = "ok"
            except XksError as exc:
                name = exc.error_name
            with lock:
                outcomes.append((name, time.monotonic() - began))

        others = [threading.Thread(target=other) for _ in range(4)]
        for thread in others:
            thread.start()
        for thread in others:
            thread.join(5)
        slow_call.join(5)
        assert len(outcomes) == 4
        assert all(name == "DependencyTimeoutException" for name, _ in outcomes), outcomes
        assert max(elapsed for _, elapsed in outcomes) < 0.4  # a few 0.1 s waits at most
        assert len(slow_result) == 1  # the slow call itself still finishes
        assert not stats(manager).recovering  # slowness is not a device failure
        round_trip(manager)
    finally:
        manager.close()


def test_recovery_settings_are_checked(settings: Pkcs11Settings) -> None:
    from xks_proxy.keymanager.pkcs11 import KeyManagerStartupError

    with pytest.raises(KeyManagerStartupError, match="recovery_interval"):
        Pkcs11KeyManager.open(
            dataclasses.replace(settings, recovery_interval=5.0, recovery_max_interval=1.0)
        )


# ------------------------------------------- a token whose files vanish and come back


def _vanishing_token(
    softhsm_token: SoftHsmToken, tmp_path: Any, label: str
) -> tuple[Pkcs11Settings, Any]:
    """A token of its own in the shared SoftHSM directory, opened through a private copy
    of libsofthsm2 (its own module instance, like a separate HSM); returns its settings
    and its directory of files."""
    module_copy = tmp_path / f"libsofthsm2-{label}.so"
    shutil.copyfile(softhsm_token.module_path, module_copy)
    token, settings = extra_token(softhsm_token, label, str(module_copy))
    return settings, token.files()


def test_vanished_token_comes_back_without_restart(
    softhsm_token: SoftHsmToken, tmp_path: Any
) -> None:
    # Issue 4: a failed HSM is repaired and used again without a restart. SoftHSM lists
    # its tokens at C_Initialize, so finding a returned token needs a re-initialisation
    # on every attempt, not just a new look at the slot list.
    label = f"xks-vanish-{os.getpid()}"
    settings, directory = _vanishing_token(softhsm_token, tmp_path, label)
    manager = Pkcs11KeyManager.open(settings)
    try:
        round_trip(manager)
        hidden = tmp_path / "hidden-token"
        directory.rename(hidden)
        try:
            _, unexpected, slowest = _hammer(manager, 1.0, threads=2)
            assert unexpected == [] and slowest < 0.5
            with pytest.raises(InternalException):
                manager.encrypt("foo", b"x", AAD)
            attempts_while_gone = stats(manager).module_reinit_attempts
            assert attempts_while_gone >= 2  # retried at the recovery pace, not once
            assert attempts_while_gone <= 1 + 1.0 / INTERVAL  # ...and rate limited
        finally:
            hidden.rename(directory)
        recover_within(manager, timeout=MAX_INTERVAL + 2.0)
        round_trip(manager)
        manager.health_check()
    finally:
        manager.close()


def test_vanished_token_does_not_reinitialise_a_shared_module_again(
    softhsm_token: SoftHsmToken, tmp_path: Any
) -> None:
    # Two tokens on one module instance (two partitions of one HSM): when one vanishes,
    # re-initialising the module again and again to look for it would pull the other's
    # sessions away each time. After the first re-initialisation the vanished one is
    # only looked for in the slot list; the healthy one keeps working.
    label = f"xks-vanish-shared-{os.getpid()}"
    settings, directory = _vanishing_token(softhsm_token, tmp_path, label)
    healthy_label = f"xks-stays-{os.getpid()}"
    healthy_token, healthy_settings = extra_token(
        softhsm_token, healthy_label, settings.module_path
    )
    assert healthy_token.token_label == healthy_label
    healthy = Pkcs11KeyManager.open(healthy_settings)  # created first: the copy is loaded
    vanishing = Pkcs11KeyManager.open(settings)
    try:
        assert vanishing._module is healthy._module
        round_trip(vanishing)
        hidden = tmp_path / "hidden-token"
        directory.rename(hidden)
        try:
            _hammer(vanishing, 0.5, threads=2)
            attempts = stats(vanishing).module_reinit_attempts
            assert attempts <= 1
            # From here on the healthy token must never fail.
            for _ in range(3):
                recover_within(healthy, timeout=MAX_INTERVAL + 2.0)
            _, unexpected, _ = _hammer(vanishing, 1.0, threads=1)
            assert unexpected == []
            assert stats(vanishing).module_reinit_attempts == attempts
            for _ in range(50):
                round_trip(healthy)
        finally:
            hidden.rename(directory)
    finally:
        vanishing.close()
        healthy.close()
