"""FailoverKeyManager with fake backends: classification, retry, round robin, states."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from xks_proxy.keymanager.base import EkmInfo, GcmCiphertext, KeyDescription
from xks_proxy.keymanager.failover import (
    NO_BACKEND_MESSAGE,
    BackendState,
    FailoverKeyManager,
    current_deadline,
    deadline,
    is_backend_failure,
)
from xks_proxy.protocol.errors import (
    DependencyTimeoutException,
    InternalException,
    InvalidCiphertextException,
    InvalidKeyUsageException,
    InvalidStateException,
    KeyNotFoundException,
    ThrottlingException,
    UnsupportedOperationException,
    ValidationException,
    XksError,
)

ACTIVE, DEGRADED, UNAVAILABLE = "ACTIVE", "DEGRADED", "UNAVAILABLE"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeBackend:
    """A KeyManager whose failures and latency the test sets."""

    def __init__(self, name: str, clock: FakeClock | None = None) -> None:
        self.name = name
        self.clock = clock
        self.error: Exception | None = None  # raised by every call
        self.health_error: Exception | None = None  # raised by health_check (else error)
        self.latency = 0.0  # fake-clock seconds per call
        self.health_latency = 0.0  # fake-clock seconds per health check
        self.health_sleep = 0.0  # real seconds per health check
        self.calls: list[str] = []
        self.health_checks = 0
        self.closed = False
        self.lock = threading.Lock()
        self.on_health: Callable[[], None] | None = None

    def _call(self, operation: str) -> None:
        with self.lock:
            self.calls.append(operation)
        if self.clock is not None:
            self.clock.advance(self.latency)
        if self.error is not None:
            raise self.error

    def describe_key(self, external_key_id: str) -> KeyDescription:
        self._call("describe")
        return KeyDescription("AES_256", ("ENCRYPT", "DECRYPT"))

    def encrypt(self, external_key_id: str, plaintext: bytes, hsm_aad: bytes) -> GcmCiphertext:
        self._call("encrypt")
        return GcmCiphertext(iv=self.name.encode(), ciphertext=plaintext, tag=b"t" * 16)

    def decrypt(
        self, external_key_id: str, ciphertext: bytes, iv: bytes, tag: bytes, hsm_aad: bytes
    ) -> bytes:
        self._call("decrypt")
        return ciphertext

    def health_check(self) -> None:
        with self.lock:
            self.health_checks += 1
        if self.on_health is not None:
            self.on_health()
        if self.health_sleep:
            time.sleep(self.health_sleep)
        if self.clock is not None:
            self.clock.advance(self.health_latency)
        error = self.health_error or self.error
        if error is not None:
            raise error

    def info(self) -> EkmInfo:
        return EkmInfo(vendor="Fake HSM Co", id=f"serial-{self.name}", model="Fake 1.0")

    def close(self) -> None:
        self.closed = True


Fleet = tuple[FailoverKeyManager, list[FakeBackend], FakeClock]


def make_fleet(count: int = 2, **options: float) -> Fleet:
    clock = FakeClock()
    backends = [FakeBackend(name, clock) for name in "abcdefghij"[:count]]
    options.setdefault("recovery_seconds", 0.0)
    manager = FailoverKeyManager(
        [(b.name, b) for b in backends], clock=clock, wall_clock=lambda: 1.7e9, **options
    )
    return manager, backends, clock


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    manager, backends, clock = make_fleet()
    try:
        yield manager, backends, clock
    finally:
        manager.close()


def states(manager: FailoverKeyManager) -> list[str]:
    return [status.status for status in manager.fleet_status()]


def served_by(manager: FailoverKeyManager) -> str:
    return manager.encrypt("foo", b"x", b"").iv.decode()


# ------------------------------------------------------------------- classification

REQUEST_ERRORS = [
    KeyNotFoundException(),
    InvalidCiphertextException(),
    InvalidKeyUsageException(),
    UnsupportedOperationException(),
    ValidationException(),
    InvalidStateException(),
    ThrottlingException(),
]
BACKEND_ERRORS = [
    InternalException("HSM encrypt failed: CKR_DEVICE_ERROR"),
    DependencyTimeoutException("HSM busy"),
    RuntimeError("binding crashed"),
]


@pytest.mark.parametrize("error", REQUEST_ERRORS, ids=lambda e: type(e).__name__)
def test_request_errors_are_answers_not_failures(fleet: Fleet, error: XksError) -> None:
    manager, (a, b), _ = fleet
    a.error = error
    b.error = error
    assert not is_backend_failure(error)
    with pytest.raises(type(error)):
        manager.encrypt("foo", b"x", b"")
    assert len(a.calls) + len(b.calls) == 1  # no retry: another HSM would say the same
    assert states(manager) == [ACTIVE, ACTIVE]


@pytest.mark.parametrize("error", BACKEND_ERRORS, ids=lambda e: type(e).__name__)
def test_backend_failure_is_retried_once_elsewhere(fleet: Fleet, error: Exception) -> None:
    manager, (a, _b), _ = fleet
    a.error = error
    assert is_backend_failure(error)
    results = {served_by(manager) for _ in range(4)}
    assert results == {"b"}
    assert a.calls == ["encrypt"]  # tried once, then skipped while UNAVAILABLE
    assert states(manager) == [UNAVAILABLE, ACTIVE]
    status = manager.fleet_status()[0]
    assert status.last_error is not None


def test_an_unexpected_exception_surfaces_as_internal(caplog: pytest.LogCaptureFixture) -> None:
    manager, backends, _ = make_fleet(1)
    backends[0].error = RuntimeError("binding crashed")
    with (
        caplog.at_level(logging.ERROR, "xks_proxy.failover"),
        pytest.raises(InternalException, match="RuntimeError"),
    ):
        manager.encrypt("foo", b"x", b"")
    assert "failed unexpectedly" in caplog.text
    manager.close()


def test_retry_happens_at_most_once() -> None:
    manager, backends, _ = make_fleet(3)
    for backend in backends:
        backend.error = InternalException("broken")
    with pytest.raises(InternalException, match="broken"):
        manager.decrypt("foo", b"c", b"i" * 12, b"t" * 16, b"")
    assert sum(len(b.calls) for b in backends) == 2
    manager.close()


def test_the_retry_answer_is_returned_even_if_it_is_an_error(fleet: Fleet) -> None:
    manager, (a, b), _ = fleet
    a.error = InternalException("broken")
    b.error = KeyNotFoundException()
    with pytest.raises(KeyNotFoundException):
        manager.describe_key("foo")
    assert states(manager) == [UNAVAILABLE, ACTIVE]


# ---------------------------------------------------------------------- round robin


def test_round_robin_over_active_backends() -> None:
    manager, _backends, _ = make_fleet(3)
    order = [served_by(manager) for _ in range(9)]
    assert sorted(order) == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    assert order[:3] == ["a", "b", "c"]
    manager.close()


def test_active_preferred_then_degraded() -> None:
    manager, (a, b), _ = make_fleet(2, degraded_latency_ms=50)
    a.latency = 0.2  # 200 ms per call
    served_by(manager)  # round robin starts at a: slow
    assert states(manager) == [DEGRADED, ACTIVE]
    assert {served_by(manager) for _ in range(5)} == {"b"}
    b.error = InternalException("broken")
    assert served_by(manager) == "a"  # b failed; the retry goes to the DEGRADED one
    assert served_by(manager) == "a"
    manager.close()


# -------------------------------------------------------------------------- states


def test_no_usable_backend(fleet: Fleet) -> None:
    manager, (a, b), _ = fleet
    a.error = b.error = InternalException("down")
    with pytest.raises(InternalException, match=NO_BACKEND_MESSAGE):
        manager.health_check()
    calls_before = len(a.calls) + len(b.calls)
    with pytest.raises(InternalException) as caught:
        manager.encrypt("foo", b"x", b"")
    assert caught.value.error_message == NO_BACKEND_MESSAGE
    assert len(a.calls) + len(b.calls) == calls_before  # refused without trying
    assert states(manager) == [UNAVAILABLE, UNAVAILABLE]


def test_health_check_updates_states_and_fails_only_when_none_is_usable(fleet: Fleet) -> None:
    manager, (a, _b), _ = fleet
    a.health_error = InternalException("HSM health check failed")
    manager.health_check()  # b is fine: no exception
    assert states(manager) == [UNAVAILABLE, ACTIVE]
    status = manager.fleet_status()[0]
    assert status.last_error == "HSM health check failed"
    assert status.last_checked == 1.7e9
    a.health_error = None
    manager.health_check()
    assert states(manager) == [ACTIVE, ACTIVE]
    assert manager.fleet_status()[0].last_error is None


def test_a_call_failure_is_tried_as_last_resort_until_a_health_check_confirms_it() -> None:
    # One HSM: a single transient error must not refuse every request until a probe.
    manager, (a,), _ = make_fleet(1, recovery_seconds=30)
    a.error = InternalException("CKR_GENERAL_ERROR")
    with pytest.raises(InternalException, match="CKR_GENERAL_ERROR"):
        manager.encrypt("foo", b"x", b"")
    assert states(manager) == [UNAVAILABLE]
    a.error = None
    assert served_by(manager) == "a"  # last resort worked: usable again, on probation
    assert states(manager) == [DEGRADED]
    a.error = InternalException("dead")
    with pytest.raises(InternalException):
        manager.encrypt("foo", b"x", b"")
    with pytest.raises(InternalException, match=NO_BACKEND_MESSAGE):
        manager.health_check()  # confirmed: now calls are refused at once
    calls = len(a.calls)
    with pytest.raises(InternalException, match=NO_BACKEND_MESSAGE):
        manager.encrypt("foo", b"x", b"")
    assert len(a.calls) == calls
    manager.close()


def test_recovered_backend_is_degraded_during_probation() -> None:
    manager, (a, _b), clock = make_fleet(2, recovery_seconds=30)
    a.error = InternalException("broken")
    served_by(manager)
    assert states(manager) == [UNAVAILABLE, ACTIVE]
    a.error = None
    clock.advance(5)
    manager.health_check()
    assert states(manager) == [DEGRADED, ACTIVE]
    assert manager.fleet_status()[0].last_error == "broken"
    assert {served_by(manager) for _ in range(4)} == {"b"}  # ACTIVE preferred
    clock.advance(26)
    assert states(manager) == [ACTIVE, ACTIVE]
    assert manager.fleet_status()[0].last_error is None
    manager.close()


def test_call_failure_during_a_health_check_is_not_erased_by_its_success() -> None:
    manager, (a,), clock = make_fleet(1)

    def fail_a_call_meanwhile() -> None:
        clock.advance(0.001)
        a.error = InternalException("failed during the check")
        with pytest.raises(InternalException):
            manager.encrypt("foo", b"x", b"")
        a.error = None

    a.on_health = fail_a_call_meanwhile
    with pytest.raises(InternalException, match=NO_BACKEND_MESSAGE):
        manager.health_check()  # the check itself passed, but the failure is newer evidence
    assert states(manager) == [UNAVAILABLE]
    assert manager.fleet_status()[0].last_error == "failed during the check"
    a.on_health = None
    manager.health_check()
    assert states(manager) == [ACTIVE]
    manager.close()


# ---------------------------------------------------------------------- slowness


def test_degraded_when_the_moving_average_of_calls_is_slow() -> None:
    manager, (a,), _ = make_fleet(1, degraded_latency_ms=50)
    a.latency = 0.010
    for _ in range(5):
        served_by(manager)
    assert states(manager) == [ACTIVE]
    assert manager.fleet_status()[0].latency_ms == pytest.approx(10.0)
    a.latency = 0.300
    served_by(manager)  # one slow call moves the average: 10 + 0.2 * 290 = 68 ms
    assert states(manager) == [DEGRADED]
    assert manager.fleet_status()[0].latency_ms == pytest.approx(68.0)
    a.latency = 0.001
    for _ in range(10):
        served_by(manager)
    assert states(manager) == [ACTIVE]
    manager.close()


def test_degraded_when_the_health_round_trip_is_slow() -> None:
    manager, (a,), _ = make_fleet(1, degraded_latency_ms=50)
    a.health_latency = 0.080
    manager.health_check()  # slow but working: no exception
    status = manager.fleet_status()[0]
    assert status.status == DEGRADED
    assert status.latency_ms == pytest.approx(80.0)
    a.health_latency = 0.005
    manager.health_check()  # no traffic since: the average restarts from the probe
    assert states(manager) == [ACTIVE]
    manager.close()


# ----------------------------------------------------------------------- deadlines


def test_deadline_context_nests() -> None:
    assert current_deadline() is None
    with deadline(10.0):
        assert current_deadline() == 10.0
        with deadline(None):
            assert current_deadline() is None
        assert current_deadline() == 10.0
    assert current_deadline() is None


def test_deadline_is_per_thread() -> None:
    seen: list[float | None] = []
    with deadline(5.0):
        thread = threading.Thread(target=lambda: seen.append(current_deadline()))
        thread.start()
        thread.join()
    assert seen == [None]


def test_no_retry_when_no_time_is_left(fleet: Fleet) -> None:
    manager, (a, b), clock = fleet
    a.error = InternalException("broken")
    with deadline(clock.now + 0.002), pytest.raises(InternalException, match="broken"):
        manager.encrypt("foo", b"x", b"")  # 2 ms left < min_retry_ms (5 ms)
    assert (a.calls, b.calls) == (["encrypt"], [])
    assert states(manager) == [UNAVAILABLE, ACTIVE]  # still marked
    assert served_by(manager) == "b"


def test_no_retry_when_the_failure_used_up_the_time(fleet: Fleet) -> None:
    manager, (a, b), clock = fleet
    a.error = DependencyTimeoutException("HSM busy")
    a.latency = 0.200  # the failed call took 200 ms of a 210 ms budget
    with deadline(clock.now + 0.205), pytest.raises(DependencyTimeoutException):
        manager.encrypt("foo", b"x", b"")
    assert b.calls == []


def test_retry_when_time_is_left(fleet: Fleet) -> None:
    manager, (a, _b), clock = fleet
    a.error = InternalException("broken")
    with deadline(clock.now + 0.100):
        assert served_by(manager) == "b"


def test_retry_needs_the_expected_latency_of_the_other_backend(fleet: Fleet) -> None:
    manager, (a, b), clock = fleet
    b.latency = 0.050
    assert served_by(manager) == "a"
    assert served_by(manager) == "b"  # b's average is now 50 ms
    a.error = InternalException("broken")
    with deadline(clock.now + 0.030), pytest.raises(InternalException):
        manager.encrypt("foo", b"x", b"")  # 30 ms left, b takes ~50: not worth it
    assert b.calls == ["encrypt"]


# ---------------------------------------------------------------- parallel health


def test_health_checks_run_in_parallel_and_are_bounded() -> None:
    backends = [FakeBackend(name) for name in ("a", "b", "c")]
    for backend in backends:
        backend.health_sleep = 0.2
    backends[2].health_sleep = 2.0  # hangs past the timeout
    manager = FailoverKeyManager([(b.name, b) for b in backends], health_timeout=0.5)
    started = time.monotonic()
    manager.health_check()
    elapsed = time.monotonic() - started
    assert elapsed < 0.9  # 0.5 s bound, not 0.2 + 0.2 + 2.0
    statuses = manager.fleet_status()
    assert [s.status for s in statuses[:2]] == [DEGRADED, DEGRADED]  # 200 ms > 50 ms
    assert statuses[2].status == UNAVAILABLE
    assert statuses[2].last_error == "health check did not finish within 0.5 s"
    manager.health_check()  # c is still hanging: not checked twice at once
    assert backends[2].health_checks == 1
    assert manager.fleet_status()[2].last_error == "the previous health check is still running"
    manager.close()


def test_concurrent_health_checks_share_one_round() -> None:
    backend = FakeBackend("a")
    backend.health_sleep = 0.2
    manager = FailoverKeyManager([("a", backend)], degraded_latency_ms=1000)
    threads = [threading.Thread(target=manager.health_check) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert backend.health_checks == 1
    assert states(manager) == [ACTIVE]
    manager.close()


# ------------------------------------------------------------------------- prober


def _wait_for(condition: Callable[[], bool], timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_prober_brings_a_repaired_backend_back() -> None:
    a, b = FakeBackend("a"), FakeBackend("b")
    manager = FailoverKeyManager([("a", a), ("b", b)], recovery_seconds=0)
    a.error = InternalException("down")
    manager.start_probing(0.05)
    manager.start_probing(0.05)  # idempotent
    try:
        assert _wait_for(lambda: states(manager) == [UNAVAILABLE, ACTIVE])
        a.error = None
        assert _wait_for(lambda: states(manager) == [ACTIVE, ACTIVE])
    finally:
        manager.stop()
    checks = a.health_checks
    time.sleep(0.15)
    assert a.health_checks == checks  # stopped
    manager.close()


def test_a_failure_wakes_the_prober() -> None:
    a, b = FakeBackend("a"), FakeBackend("b")
    manager = FailoverKeyManager([("a", a), ("b", b)], recheck_delay=0.01)
    manager.start_probing(60.0)  # first round now, next one in a minute...
    try:
        assert _wait_for(lambda: a.health_checks == 1)
        a.error = InternalException("down")
        served_by(manager)  # ...unless a call fails
        assert _wait_for(lambda: a.health_checks == 2, timeout=1.0)
        assert states(manager) == [UNAVAILABLE, ACTIVE]
        assert manager._backends[0].confirmed
    finally:
        manager.close()


# --------------------------------------------------------------- info, close, misc


def test_info_close_and_status_fields(fleet: Fleet) -> None:
    manager, (a, b), _ = fleet
    assert manager.info() == a.info()
    status = manager.fleet_status()[1]
    assert (status.name, status.info, status.status) == ("b", b.info(), ACTIVE)
    assert (status.last_error, status.last_checked, status.latency_ms) == (None, 0.0, None)
    assert BackendState.ACTIVE == ACTIVE  # plain strings for GetHealthStatus
    manager.close()
    manager.close()
    assert a.closed and b.closed
    with pytest.raises(InternalException, match="closed"):
        manager.encrypt("foo", b"x", b"")


@pytest.mark.parametrize(
    "backends",
    [[], [(f"n{i}", None) for i in range(11)], [("a", None), ("a", None)], [("", None)]],
    ids=["none", "eleven", "duplicate-names", "empty-name"],
)
def test_fleet_validation(backends: list[tuple[str, None]]) -> None:
    fakes = [(name, FakeBackend(name or "x")) for name, _ in backends]
    with pytest.raises(ValueError):
        FailoverKeyManager(fakes)


def test_many_threads_with_random_failures_lose_no_request() -> None:
    backends = [FakeBackend(name) for name in "abc"]
    manager = FailoverKeyManager([(b.name, b) for b in backends], recovery_seconds=0)
    manager.start_probing(0.01)
    stop = threading.Event()
    errors: list[BaseException] = []
    served = [0]
    count_lock = threading.Lock()

    def chaos() -> None:
        rng = random.Random(7)
        while not stop.is_set():
            victim = rng.choice(backends)  # at most one broken at a time
            victim.error = InternalException("chaos")
            time.sleep(0.005)
            victim.error = None
            time.sleep(0.03)  # the prober (every 10 ms) restores it before the next victim

    def worker() -> None:
        try:
            for _ in range(300):
                assert manager.decrypt("foo", b"data", b"i" * 12, b"t" * 16, b"") == b"data"
                with count_lock:
                    served[0] += 1
        except BaseException as exc:
            errors.append(exc)

    chaos_thread = threading.Thread(target=chaos)
    chaos_thread.start()
    workers = [threading.Thread(target=worker) for _ in range(8)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    stop.set()
    chaos_thread.join()
    manager.close()
    assert errors == []
    assert served[0] == 8 * 300
