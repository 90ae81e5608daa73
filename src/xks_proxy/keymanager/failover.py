"""Failover over several external key managers holding the same keys.

:class:`FailoverKeyManager` is a :class:`~xks_proxy.keymanager.base.KeyManager` in
front of 1-10 named backends, typically one :class:`Pkcs11KeyManager` per HSM of a
cluster whose members replicate the keys (replication is the HSMs' job, not ours).

Each backend is ACTIVE, DEGRADED or UNAVAILABLE, as GetHealthStatus reports them
(spec: GetHealthStatus, ekmFleetDetails):

* UNAVAILABLE: its last health check failed, or a call failed with an error that
  means "this HSM is broken" (:data:`BACKEND_FAILURES`) after that check.
* DEGRADED: usable, but its last health round trip or the moving average of its
  call latency exceeded ``degraded_latency_ms``, or it failed less than
  ``recovery_seconds`` ago (it is on probation after a failure).
* ACTIVE: otherwise.

Calls go round-robin to ACTIVE backends, else to DEGRADED ones. A call that fails
with a backend failure marks its backend UNAVAILABLE and is retried once on another
backend if the request's deadline (:func:`deadline`) leaves time for it. Errors that
answer the request (KeyNotFound, InvalidCiphertext, InvalidKeyUsage,
UnsupportedOperation, Validation...) are returned as they are: another HSM holding
the same keys would answer the same.

A backend marked UNAVAILABLE by a failed *call* (not yet confirmed by a health check)
is still tried as a last resort when no other backend is usable, so one transient
error on a single-HSM deployment does not refuse every request until the next probe.
A failed health check confirms the failure; then calls are refused at once with
InternalException("no external key manager is available"). The failure also wakes
the background prober (:meth:`FailoverKeyManager.start_probing`) for a prompt
re-check.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from contextvars import ContextVar
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from xks_proxy.keymanager.base import EkmInfo, GcmCiphertext, KeyDescription, KeyManager
from xks_proxy.protocol.errors import DependencyTimeoutException, InternalException, XksError

log = logging.getLogger("xks_proxy.failover")

T = TypeVar("T")

MAX_BACKENDS = 10  # spec: ekmFleetDetails holds 1-10 members
NO_BACKEND_MESSAGE = "no external key manager is available"

# Errors that say "this HSM is broken", not "this request is wrong". Any exception that
# is not an XksError (an adapter bug, a crashed binding) counts as one too.
BACKEND_FAILURES: tuple[type[XksError], ...] = (InternalException, DependencyTimeoutException)

_AVERAGE_WEIGHT = 0.2  # weight of the newest sample in the moving average of call latency


class BackendState(StrEnum):
    """A backend's health, named as GetHealthStatus reports it."""

    ACTIVE = "ACTIVE"
    DEGRADED = "DEGRADED"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True, slots=True)
class BackendStatus:
    """One backend as :meth:`FailoverKeyManager.fleet_status` reports it."""

    name: str
    info: EkmInfo
    status: str  # a BackendState value: ACTIVE, DEGRADED or UNAVAILABLE
    last_error: str | None  # the latest failure; cleared once the backend is ACTIVE again
    last_checked: float  # time.time() of the latest health check; 0.0 = never checked
    latency_ms: float | None  # moving average of round trips (calls and checks); None = none yet


def is_backend_failure(error: BaseException) -> bool:
    """True when ``error`` means the backend is broken rather than answering the request."""
    return isinstance(error, BACKEND_FAILURES) or not isinstance(error, XksError)


# ----------------------------------------------------------------------- request deadline

_DEADLINE: ContextVar[float | None] = ContextVar("xks_key_manager_deadline", default=None)


@contextlib.contextmanager
def deadline(at: float | None) -> Iterator[None]:
    """Key-manager calls made inside this block must finish by ``at`` (time.monotonic()).

    Set it in the thread that makes the calls (the service's HSM worker), around one
    request. ``asyncio.to_thread`` carries it into the worker; ``run_in_executor`` does
    not. None means no deadline. Blocks nest; the outer deadline comes back after.
    """
    token = _DEADLINE.set(at)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


_SERVED = threading.local()


def served_by() -> str | None:
    """Name of the backend that answered this thread's last call (and forget it)."""
    name: str | None = getattr(_SERVED, "name", None)
    _SERVED.name = None
    return name


def current_deadline() -> float | None:
    """The deadline set by the innermost :func:`deadline` block of this context, or None."""
    return _DEADLINE.get()


# ------------------------------------------------------------------------------- backends


class _BackendFailed(Exception):
    """A backend failed a call; ``error`` is what the caller gets if no retry saves it."""

    def __init__(self, error: XksError) -> None:
        super().__init__(error.error_message)
        self.error = error


class _Backend:
    """One backend's record. Every field is guarded by the FailoverKeyManager's lock."""

    def __init__(self, name: str, manager: KeyManager, info: EkmInfo) -> None:
        self.name = name
        self.manager = manager
        self.info = info
        self.state = BackendState.ACTIVE  # as last derived, to log transitions
        self.failed = False  # UNAVAILABLE
        self.confirmed = False  # the failure was confirmed by a health check
        self.last_error: str | None = None
        self.last_failure_at: float | None = None  # clock()
        self.last_checked = 0.0  # wall clock
        self.health_ms: float | None = None  # latest successful health round trip
        self.average_ms: float | None = None  # moving average of round trips
        self.calls_since_check = 0
        self.checking = False  # a health check is running for this backend


class FailoverKeyManager:
    """A KeyManager spreading calls over several backends holding the same keys.

    Thread-safe. Backends are never called with the internal lock held.
    """

    def __init__(
        self,
        backends: Sequence[tuple[str, KeyManager]],
        *,
        degraded_latency_ms: float = 50.0,
        health_timeout: float = 2.0,
        recovery_seconds: float = 30.0,
        min_retry_ms: float = 5.0,
        recheck_delay: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``backends``: (name, key manager) pairs; the name is the HSM's id in
        GetHealthStatus. ``health_timeout``: longest wait for one health-check round.
        ``recovery_seconds``: how long a backend stays DEGRADED after a failure.
        ``min_retry_ms``: the least time left before the deadline for a retry.
        ``recheck_delay``: least gap between probes when failures wake the prober.
        ``clock`` must be the clock deadlines use (time.monotonic)."""
        if not 1 <= len(backends) <= MAX_BACKENDS:
            raise ValueError(f"between 1 and {MAX_BACKENDS} backends are needed")
        names = [name for name, _ in backends]
        if any(not name for name in names):
            raise ValueError("every backend needs a name")
        if len(set(names)) != len(names):
            raise ValueError("backend names must be unique")
        if degraded_latency_ms <= 0 or health_timeout <= 0:
            raise ValueError("degraded_latency_ms and health_timeout must be positive")
        self._backends = [_Backend(name, manager, manager.info()) for name, manager in backends]
        self._degraded_ms = float(degraded_latency_ms)
        self._health_timeout = float(health_timeout)
        self._recovery = max(0.0, float(recovery_seconds))
        self._min_retry = max(0.0, float(min_retry_ms)) / 1000
        self._recheck_delay = max(0.0, float(recheck_delay))
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._round_lock = threading.Lock()  # one health-check round at a time
        self._next = 0  # round-robin position
        self._closed = False
        self._executor = ThreadPoolExecutor(
            max_workers=len(self._backends), thread_name_prefix="xks-failover-health"
        )
        self._prober: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()

    def __repr__(self) -> str:
        return f"FailoverKeyManager({[b.name for b in self._backends]!r})"

    # ------------------------------------------------------------------ KeyManager

    def describe_key(self, external_key_id: str) -> KeyDescription:
        """Key spec, usages and status from a healthy backend."""
        return self._call(lambda manager: manager.describe_key(external_key_id))

    def encrypt(self, external_key_id: str, plaintext: bytes, hsm_aad: bytes) -> GcmCiphertext:
        """AES-256-GCM encrypt on a healthy backend."""
        return self._call(lambda manager: manager.encrypt(external_key_id, plaintext, hsm_aad))

    def decrypt(
        self, external_key_id: str, ciphertext: bytes, iv: bytes, tag: bytes, hsm_aad: bytes
    ) -> bytes:
        """AES-256-GCM decrypt on a healthy backend (any backend: they hold the same keys)."""
        return self._call(
            lambda manager: manager.decrypt(external_key_id, ciphertext, iv, tag, hsm_aad)
        )

    def health_check(self) -> None:
        """Check every backend in parallel (bounded by ``health_timeout``) and update
        their states; InternalException only if none is usable afterwards."""
        self._check_round()
        with self._lock:
            now = self._clock()
            if any(self._state(b, now) is not BackendState.UNAVAILABLE for b in self._backends):
                return
            details = "; ".join(f"{b.name}: {b.last_error or 'failed'}" for b in self._backends)
        raise InternalException(f"{NO_BACKEND_MESSAGE} ({details})")

    def info(self) -> EkmInfo:
        """The first backend's identity (its vendor is the fleet's ekmVendor)."""
        return self._backends[0].info

    def close(self) -> None:
        """Stop the prober and close every backend (best effort, each one once)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)
        for backend in self._backends:
            try:
                backend.manager.close()
            except Exception:
                log.exception("closing key manager %s failed", backend.name)

    # ---------------------------------------------------------------------- fleet

    def fleet_status(self) -> list[BackendStatus]:
        """Every backend's state, in configuration order."""
        transitions: list[tuple[_Backend, BackendState, BackendState]] = []
        with self._lock:
            now = self._clock()
            statuses = []
            for backend in self._backends:
                state = self._refresh(backend, now, transitions)
                statuses.append(
                    BackendStatus(
                        name=backend.name,
                        info=backend.info,
                        status=state.value,
                        last_error=backend.last_error,
                        last_checked=backend.last_checked,
                        latency_ms=backend.average_ms,
                    )
                )
        _log_transitions(transitions)
        return statuses

    # --------------------------------------------------------------------- prober

    def start_probing(self, interval: float) -> None:
        """Health-check every backend every ``interval`` seconds in a background thread,
        and soon after any backend fails, so a repaired HSM comes back without restart.
        Calling it again while it runs changes nothing."""
        if interval <= 0:
            raise ValueError("the probe interval must be positive")
        with self._lock:
            if self._closed:
                raise RuntimeError("the failover key manager is closed")
            if self._prober is not None and self._prober.is_alive():
                return
            self._stop.clear()
            self._wake.clear()
            self._prober = threading.Thread(
                target=self._probe_loop, args=(float(interval),), name="xks-failover-prober"
            )
            self._prober.daemon = True
            self._prober.start()

    def stop(self) -> None:
        """Stop the prober (waits for a round in progress, at most ``health_timeout``)."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            prober, self._prober = self._prober, None
        if prober is not None and prober is not threading.current_thread():
            prober.join(self._health_timeout + 1.0)

    def _probe_loop(self, interval: float) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._check_round()
            except Exception:
                log.exception("background health check of the key managers failed")
            woken = self._wake.wait(interval)
            self._wake.clear()
            if woken and not self._stop.is_set():
                # A failure woke us: re-check promptly, but not in a tight loop.
                gap = min(interval, self._recheck_delay)
                self._stop.wait(max(0.0, started + gap - time.monotonic()))

    # ---------------------------------------------------------------- calls

    def _call(self, operation: Callable[[KeyManager], T]) -> T:
        first = self._pick(())
        if first is None:
            raise InternalException(NO_BACKEND_MESSAGE)
        try:
            return self._attempt(first, operation)
        except _BackendFailed as failure:
            second = self._pick((first,))
            if second is None or not self._time_for_retry(second):
                raise failure.error from None
            log.warning("retrying a call failed on key manager %s on %s", first.name, second.name)
        try:
            return self._attempt(second, operation)
        except _BackendFailed as failure:
            raise failure.error from None

    def _pick(self, exclude: Sequence[_Backend]) -> _Backend | None:
        """Round robin over ACTIVE backends, else DEGRADED ones, else (last resort) ones
        failed by a call but not yet by a health check."""
        transitions: list[tuple[_Backend, BackendState, BackendState]] = []
        with self._lock:
            if self._closed:
                raise InternalException("the key manager is closed")
            now = self._clock()
            states = [
                (b, self._refresh(b, now, transitions)) for b in self._backends if b not in exclude
            ]
            tiers: tuple[Callable[[_Backend, BackendState], bool], ...] = (
                lambda b, state: state is BackendState.ACTIVE,
                lambda b, state: state is BackendState.DEGRADED,
                lambda b, state: b.failed and not b.confirmed,  # last resort
            )
            chosen: _Backend | None = None
            for in_tier in tiers:
                members = [b for b, state in states if in_tier(b, state)]
                if members:
                    chosen = members[self._next % len(members)]
                    self._next += 1
                    break
        _log_transitions(transitions)
        return chosen

    def _time_for_retry(self, backend: _Backend) -> bool:
        at = _DEADLINE.get()
        if at is None:
            return True
        with self._lock:
            expected = (backend.average_ms or 0.0) / 1000
        return at - self._clock() > max(self._min_retry, expected)

    def _attempt(self, backend: _Backend, operation: Callable[[KeyManager], T]) -> T:
        started = self._clock()
        try:
            result = operation(backend.manager)
        except Exception as exc:
            if not is_backend_failure(exc):
                self._record_answer(backend, started)
                raise
            if isinstance(exc, XksError):
                error: XksError = exc
            else:
                log.error("key manager %s failed unexpectedly", backend.name, exc_info=exc)
                error = InternalException(f"key manager failed unexpectedly: {type(exc).__name__}")
            self._record_failure(backend, error.error_message, confirmed=False)
            raise _BackendFailed(error) from None
        self._record_answer(backend, started)
        _SERVED.name = backend.name  # for the request log and the audit record
        return result

    # ------------------------------------------------------------------ health rounds

    def _check_round(self) -> None:
        """Health-check every backend in parallel; wait at most ``health_timeout``.

        A caller arriving during a round waits for that round instead of starting another.
        """
        if not self._round_lock.acquire(blocking=False):
            with self._round_lock:
                return  # the round that just ended is fresh
        try:
            futures: dict[Future[None], _Backend] = {}
            for backend in self._backends:
                with self._lock:
                    hung = backend.checking
                    backend.checking = True
                if hung:
                    self._record_failure(
                        backend, "the previous health check is still running", confirmed=True
                    )
                    continue
                try:
                    futures[self._executor.submit(self._check_one, backend)] = backend
                except RuntimeError:  # the executor was shut down by close()
                    with self._lock:
                        backend.checking = False
                    return
            if not futures:
                return
            _, pending = wait_for_futures(futures, timeout=self._health_timeout)
            for future in pending:
                self._record_failure(
                    futures[future],
                    f"health check did not finish within {self._health_timeout:g} s",
                    confirmed=True,
                )
        finally:
            self._round_lock.release()

    def _check_one(self, backend: _Backend) -> None:
        started = self._clock()
        try:
            backend.manager.health_check()
        except Exception as exc:
            message = exc.error_message if isinstance(exc, XksError) else type(exc).__name__
            if not isinstance(exc, XksError):
                log.error(
                    "health check of key manager %s failed unexpectedly", backend.name, exc_info=exc
                )
            self._record_failure(backend, message, confirmed=True)
        else:
            self._record_health(backend, started)
        finally:
            with self._lock:
                backend.checking = False

    # -------------------------------------------------------------- state updates

    def _record_answer(self, backend: _Backend, started: float) -> None:
        """The backend answered a call (a result or an error about the request)."""
        transitions: list[tuple[_Backend, BackendState, BackendState]] = []
        with self._lock:
            now = self._clock()
            sample = (now - started) * 1000
            backend.average_ms = (
                sample
                if backend.average_ms is None
                else backend.average_ms + _AVERAGE_WEIGHT * (sample - backend.average_ms)
            )
            backend.calls_since_check += 1
            if backend.failed and not backend.confirmed:
                backend.failed = False  # a last-resort call worked: it is back, on probation
            self._refresh(backend, now, transitions)
        _log_transitions(transitions)

    def _record_failure(self, backend: _Backend, message: str, *, confirmed: bool) -> None:
        transitions: list[tuple[_Backend, BackendState, BackendState]] = []
        with self._lock:
            now = self._clock()
            backend.failed = True
            backend.confirmed = backend.confirmed or confirmed
            backend.last_error = message
            backend.last_failure_at = now
            if confirmed:  # a health check found it
                backend.last_checked = self._wall_clock()
            self._refresh(backend, now, transitions)
        _log_transitions(transitions)
        if not confirmed:
            self._wake.set()  # let the prober confirm or clear it soon

    def _record_health(self, backend: _Backend, started: float) -> None:
        transitions: list[tuple[_Backend, BackendState, BackendState]] = []
        with self._lock:
            now = self._clock()
            sample = (now - started) * 1000
            backend.last_checked = self._wall_clock()
            backend.health_ms = sample
            if backend.calls_since_check == 0 or backend.average_ms is None:
                backend.average_ms = sample  # no traffic since the last check: start afresh
            else:
                backend.average_ms += _AVERAGE_WEIGHT * (sample - backend.average_ms)
            backend.calls_since_check = 0
            failed_meanwhile = backend.last_failure_at is not None and backend.last_failure_at > (
                started
            )
            if not failed_meanwhile or backend.confirmed:
                # A call failure after the check began is newer evidence: keep it.
                backend.failed = False
                backend.confirmed = False
            self._refresh(backend, now, transitions)
        _log_transitions(transitions)

    def _state(self, backend: _Backend, now: float) -> BackendState:
        if backend.failed:
            return BackendState.UNAVAILABLE
        if backend.last_failure_at is not None and now - backend.last_failure_at < self._recovery:
            return BackendState.DEGRADED
        slowest = max(backend.health_ms or 0.0, backend.average_ms or 0.0)
        if slowest > self._degraded_ms:
            return BackendState.DEGRADED
        return BackendState.ACTIVE

    def _refresh(
        self,
        backend: _Backend,
        now: float,
        transitions: list[tuple[_Backend, BackendState, BackendState]],
    ) -> BackendState:
        """Derive the state (lock held); note a change for logging after the lock."""
        state = self._state(backend, now)
        if state is BackendState.ACTIVE:
            backend.last_error = None
        if state is not backend.state:
            transitions.append((backend, backend.state, state))
            backend.state = state
        return state


def _log_transitions(transitions: list[tuple[_Backend, BackendState, BackendState]]) -> None:
    for backend, old, new in transitions:
        level = logging.WARNING if new is BackendState.UNAVAILABLE else logging.INFO
        reason = f": {backend.last_error}" if backend.last_error else ""
        log.log(level, "key manager %s: %s -> %s%s", backend.name, old.value, new.value, reason)
