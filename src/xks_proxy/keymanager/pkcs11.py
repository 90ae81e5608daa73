"""The PKCS#11 adapter: AES-256-GCM on keys held in an HSM, addressed by CKA_LABEL.

Built on python-pkcs11 (docs/decisions/pkcs11-library.md). That library calls
C_Initialize without CKF_OS_LOCKING_OK, so a module such as SoftHSMv2 turns its own
mutexes off, and it releases the GIL during every C call: two threads in the module
at once can corrupt it (measured: segfaults and spurious CKR_GENERAL_ERROR). Every
call into a module therefore holds that module's one process-wide lock
(:class:`_Module`). Sessions still come from a pool, so an operation's state never
mixes with another thread's, and the GIL stays free for the event loop while the
HSM works.

Only :mod:`xks_proxy.protocol.errors` exceptions leave the adapter; CK_RV codes map
to them in one table, :data:`CKR_TO_XKS_ERROR`. The PIN, plaintext, AAD and key
values are never logged nor put into exceptions.

Recovery without restart, by escalation:

1. *A session breaks* (CKR_SESSION_HANDLE_INVALID, CKR_SESSION_CLOSED,
   CKR_OPERATION_ACTIVE): the session is closed and replaced, the call retried once.
2. *The login is lost* (CKR_USER_NOT_LOGGED_IN, or a search that finds neither the
   key nor the health-check key, since a token hides private keys from a session
   that is not logged in): log in again, replace the session, retry once. Never
   KeyNotFound.
3. *The device fails* (:data:`_DEVICE_FAILED`: CKR_DEVICE_ERROR, CKR_DEVICE_REMOVED,
   CKR_TOKEN_NOT_PRESENT, CKR_CRYPTOKI_NOT_INITIALIZED...), or
   :data:`ESCALATE_AFTER_FAILURES` HSM failures in a row that steps 1-2 did not cure
   (sessions that cannot be reopened, CKR_GENERAL_ERROR outside decrypt...): the
   failing call answers InternalException at once, and the next call into that key
   manager (a request, the health check or the failover prober) re-initialises the
   module: C_Finalize, C_Initialize, find the token again by its label (slot ids
   may change across C_Initialize), log in, reopen the sessions, forget every key
   handle.

A module is shared by every key manager of the process that uses it
(:class:`_Module`, reference counted), so a re-initialisation pulls the sessions,
object handles and logins from under all of them. Each re-initialisation therefore
bumps :attr:`_Module.generation`. Every session, key handle and login is stamped
with the generation it was made in, and every C call on a session runs under the
module lock after checking that stamp (:meth:`Pkcs11KeyManager._locked`): a handle
of an old generation is never used again, not even to close it, because the module
may have handed the same number to a new session or object (a stale key handle
could name another key). A key manager that finds itself behind the module's
generation catches up before its next call (:meth:`Pkcs11KeyManager._resync`):
token found again, shared login renewed, key caches dropped; its pooled sessions
are reopened as they are next borrowed.

Re-initialisation is rate limited per module (:class:`_Backoff`): at most once per
``recovery_interval`` seconds, doubling up to ``recovery_max_interval`` while
attempts do not lead to a working call, so a dead HSM is retried at that pace and
not in a loop. Meanwhile calls fail fast with InternalException; a thread that
finds another thread of the same key manager recovering, or the module being
re-initialised, does not wait for it (InternalException at once), and every wait
for the module lock or a pooled session is bounded by ``acquire_timeout``
(DependencyTimeoutException).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, TypeVar

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass, TokenFlag
from pkcs11 import exceptions as p11_errors
from pkcs11.mechanisms import GCMParams

from xks_proxy.keymanager.base import (
    GCM_IV_BYTES,
    GCM_TAG_BYTES,
    USAGE_ORDER,
    EkmInfo,
    GcmCiphertext,
    KeyDescription,
)
from xks_proxy.protocol.errors import (
    DependencyTimeoutException,
    InternalException,
    InvalidCiphertextException,
    InvalidKeyUsageException,
    KeyNotFoundException,
    UnsupportedOperationException,
    XksError,
)

log = logging.getLogger("xks_proxy.hsm")

T = TypeVar("T")

AES_256_KEY_BYTES = 32
ACCEPTED_DECRYPT_IV_BYTES = (12, 16)  # spec: 12 or 16; other HSMs make 16-byte IVs
GCM_TAG_BITS = GCM_TAG_BYTES * 8
HEALTH_CHECK_AAD = b"xks-proxy health check"

USAGE_ATTRIBUTES: tuple[tuple[str, Attribute], ...] = (
    ("ENCRYPT", Attribute.ENCRYPT),
    ("DECRYPT", Attribute.DECRYPT),
    ("SIGN", Attribute.SIGN),
    ("VERIFY", Attribute.VERIFY),
    ("WRAP", Attribute.WRAP),
    ("UNWRAP", Attribute.UNWRAP),
    ("DERIVE", Attribute.DERIVE),
)
assert tuple(name for name, _ in USAGE_ATTRIBUTES) == USAGE_ORDER


class KeyManagerStartupError(Exception):
    """The key manager could not start; the message names the problem, never the PIN."""


@dataclass(frozen=True, slots=True)
class GcmCapabilities:
    """How an HSM family does AES-GCM. The defaults describe SoftHSMv2.

    SoftHSM never generates the IV, so the proxy draws 12 random bytes. Other HSMs
    generate it themselves (some write it back into a zeroed buffer, Luna appends it
    after the tag); supporting them means adding that path behind this flag.
    """

    proxy_generates_iv: bool = True
    iv_bytes: int = GCM_IV_BYTES


@dataclass(frozen=True, slots=True)
class Pkcs11Settings:
    """Everything needed to open a PKCS#11 key manager, as plain values."""

    module_path: str
    token_label: str | None  # one of token_label / slot must be set
    slot: int | None
    pin: str = field(repr=False)  # never logged, never in reprs/exceptions
    health_check_key_label: str
    sessions: int = 4  # session pool size
    environment: Mapping[str, str] = field(default_factory=dict)  # applied before C_Initialize
    acquire_timeout: float = 1.0  # longest wait for a free session or the module lock, seconds
    gcm: GcmCapabilities = GcmCapabilities()
    # Recovery pace: at most one module re-initialisation (or token re-discovery) per
    # recovery_interval seconds, doubling up to recovery_max_interval while it fails.
    recovery_interval: float = 1.0
    recovery_max_interval: float = 30.0


# --------------------------------------------------------------------------- error mapping


class Ckr(IntEnum):
    """The CK_RV values the adapter distinguishes (PKCS#11 v2.40 numbering)."""

    OK = 0x000
    HOST_MEMORY = 0x002
    GENERAL_ERROR = 0x005
    FUNCTION_FAILED = 0x006
    ARGUMENTS_BAD = 0x007
    ATTRIBUTE_SENSITIVE = 0x011
    ATTRIBUTE_TYPE_INVALID = 0x012
    DATA_INVALID = 0x020
    DATA_LEN_RANGE = 0x021
    DEVICE_ERROR = 0x030
    DEVICE_MEMORY = 0x031
    DEVICE_REMOVED = 0x032
    ENCRYPTED_DATA_INVALID = 0x040
    ENCRYPTED_DATA_LEN_RANGE = 0x041
    FUNCTION_CANCELED = 0x050
    KEY_HANDLE_INVALID = 0x060
    KEY_SIZE_RANGE = 0x062
    KEY_TYPE_INCONSISTENT = 0x063
    KEY_FUNCTION_NOT_PERMITTED = 0x068
    MECHANISM_INVALID = 0x070
    MECHANISM_PARAM_INVALID = 0x071
    OBJECT_HANDLE_INVALID = 0x082
    OPERATION_ACTIVE = 0x090
    OPERATION_NOT_INITIALIZED = 0x091
    PIN_INCORRECT = 0x0A0
    PIN_INVALID = 0x0A1
    PIN_LEN_RANGE = 0x0A2
    PIN_EXPIRED = 0x0A3
    PIN_LOCKED = 0x0A4
    SESSION_CLOSED = 0x0B0
    SESSION_COUNT = 0x0B1
    SESSION_HANDLE_INVALID = 0x0B3
    TOKEN_NOT_PRESENT = 0x0E0
    TOKEN_NOT_RECOGNIZED = 0x0E1
    USER_ALREADY_LOGGED_IN = 0x100
    USER_NOT_LOGGED_IN = 0x101
    USER_PIN_NOT_INITIALIZED = 0x102
    BUFFER_TOO_SMALL = 0x150
    CRYPTOKI_NOT_INITIALIZED = 0x190
    CRYPTOKI_ALREADY_INITIALIZED = 0x191


# THE table: CK_RV -> XKS error. Anything absent is an InternalException.
CKR_TO_XKS_ERROR: dict[int, type[XksError]] = {
    # The key exists but may not do this (CKA_ENCRYPT/DECRYPT false, wrong type,
    # CKA_ALLOWED_MECHANISMS without CKM_AES_GCM).
    Ckr.KEY_FUNCTION_NOT_PERMITTED: InvalidKeyUsageException,
    Ckr.KEY_TYPE_INCONSISTENT: InvalidKeyUsageException,
    Ckr.KEY_SIZE_RANGE: InvalidKeyUsageException,
    Ckr.MECHANISM_INVALID: InvalidKeyUsageException,
    # Decrypt input that does not verify.
    Ckr.ENCRYPTED_DATA_INVALID: InvalidCiphertextException,
    Ckr.ENCRYPTED_DATA_LEN_RANGE: InvalidCiphertextException,
    Ckr.DATA_LEN_RANGE: InvalidCiphertextException,
    # Session and device failures: the HSM's fault, never the caller's key.
    Ckr.SESSION_HANDLE_INVALID: InternalException,
    Ckr.SESSION_CLOSED: InternalException,
    Ckr.SESSION_COUNT: InternalException,
    Ckr.USER_NOT_LOGGED_IN: InternalException,
    Ckr.OPERATION_ACTIVE: InternalException,
    Ckr.DEVICE_ERROR: InternalException,
    Ckr.DEVICE_MEMORY: InternalException,
    Ckr.DEVICE_REMOVED: InternalException,
    Ckr.TOKEN_NOT_PRESENT: InternalException,
    Ckr.TOKEN_NOT_RECOGNIZED: InternalException,
    Ckr.CRYPTOKI_NOT_INITIALIZED: InternalException,
    Ckr.HOST_MEMORY: InternalException,
    Ckr.GENERAL_ERROR: InternalException,
    Ckr.FUNCTION_FAILED: InternalException,
    Ckr.OBJECT_HANDLE_INVALID: InternalException,  # only after the one re-find failed
    Ckr.KEY_HANDLE_INVALID: InternalException,
}

# Where one CK_RV means something else for one operation.
OPERATION_OVERRIDES: dict[tuple[str, int], type[XksError]] = {
    # SoftHSM 2.6.1 reports a tag mismatch as CKR_GENERAL_ERROR (2.7: ENCRYPTED_DATA_INVALID).
    ("decrypt", Ckr.GENERAL_ERROR): InvalidCiphertextException,
    ("decrypt", Ckr.MECHANISM_PARAM_INVALID): InvalidCiphertextException,  # IV the HSM refuses
    ("encrypt", Ckr.DATA_LEN_RANGE): UnsupportedOperationException,  # plaintext too long for it
}

# A session that answers these is closed and replaced (after logging in again for
# USER_NOT_LOGGED_IN); the call is retried once.
_SESSION_BROKEN = frozenset(
    {Ckr.SESSION_HANDLE_INVALID, Ckr.SESSION_CLOSED, Ckr.USER_NOT_LOGGED_IN, Ckr.OPERATION_ACTIVE}
)
# The device itself is in trouble: answer at once (no retry); the next call re-initialises
# the module (C_Finalize + C_Initialize), rate limited.
_DEVICE_FAILED = frozenset(
    {
        Ckr.DEVICE_ERROR,
        Ckr.DEVICE_MEMORY,
        Ckr.DEVICE_REMOVED,
        Ckr.TOKEN_NOT_PRESENT,
        Ckr.TOKEN_NOT_RECOGNIZED,
        Ckr.CRYPTOKI_NOT_INITIALIZED,
    }
)
# Unspecific failures outside decrypt (where SoftHSM reports a bad tag as
# CKR_GENERAL_ERROR, and the input is the caller's): the session is replaced and the
# failure counts towards ESCALATE_AFTER_FAILURES.
_SUSPECT = frozenset({Ckr.GENERAL_ERROR, Ckr.FUNCTION_FAILED, Ckr.SESSION_COUNT})
_HANDLE_STALE = frozenset({Ckr.OBJECT_HANDLE_INVALID, Ckr.KEY_HANDLE_INVALID})
# C_Login answers that will not change by retrying (and retries could lock the PIN).
_PIN_REFUSED = frozenset(
    {Ckr.PIN_INCORRECT, Ckr.PIN_INVALID, Ckr.PIN_LEN_RANGE, Ckr.PIN_EXPIRED, Ckr.PIN_LOCKED}
)

# HSM failures in a row (no successful call between them) that session replacement and
# re-login did not cure, after which the module is re-initialised.
ESCALATE_AFTER_FAILURES = 3

# python-pkcs11 raises one class per CK_RV without keeping the number: recover it.
_RV_OF_ERROR: dict[type[Exception], Ckr] = {
    p11_errors.GeneralError: Ckr.GENERAL_ERROR,
    p11_errors.FunctionFailed: Ckr.FUNCTION_FAILED,
    p11_errors.HostMemory: Ckr.HOST_MEMORY,
    p11_errors.ArgumentsBad: Ckr.ARGUMENTS_BAD,
    p11_errors.AttributeSensitive: Ckr.ATTRIBUTE_SENSITIVE,
    p11_errors.AttributeTypeInvalid: Ckr.ATTRIBUTE_TYPE_INVALID,
    p11_errors.DataInvalid: Ckr.DATA_INVALID,
    p11_errors.DataLenRange: Ckr.DATA_LEN_RANGE,
    p11_errors.DeviceError: Ckr.DEVICE_ERROR,
    p11_errors.DeviceMemory: Ckr.DEVICE_MEMORY,
    p11_errors.DeviceRemoved: Ckr.DEVICE_REMOVED,
    p11_errors.EncryptedDataInvalid: Ckr.ENCRYPTED_DATA_INVALID,
    p11_errors.EncryptedDataLenRange: Ckr.ENCRYPTED_DATA_LEN_RANGE,
    p11_errors.FunctionCancelled: Ckr.FUNCTION_CANCELED,
    p11_errors.KeyHandleInvalid: Ckr.KEY_HANDLE_INVALID,
    p11_errors.KeySizeRange: Ckr.KEY_SIZE_RANGE,
    p11_errors.KeyTypeInconsistent: Ckr.KEY_TYPE_INCONSISTENT,
    p11_errors.MechanismInvalid: Ckr.MECHANISM_INVALID,
    p11_errors.MechanismParamInvalid: Ckr.MECHANISM_PARAM_INVALID,
    p11_errors.ObjectHandleInvalid: Ckr.OBJECT_HANDLE_INVALID,
    p11_errors.OperationActive: Ckr.OPERATION_ACTIVE,
    p11_errors.OperationNotInitialized: Ckr.OPERATION_NOT_INITIALIZED,
    p11_errors.PinIncorrect: Ckr.PIN_INCORRECT,
    p11_errors.PinInvalid: Ckr.PIN_INVALID,
    p11_errors.PinLenRange: Ckr.PIN_LEN_RANGE,
    p11_errors.PinExpired: Ckr.PIN_EXPIRED,
    p11_errors.PinLocked: Ckr.PIN_LOCKED,
    p11_errors.SessionClosed: Ckr.SESSION_CLOSED,
    p11_errors.SessionCount: Ckr.SESSION_COUNT,
    p11_errors.SessionHandleInvalid: Ckr.SESSION_HANDLE_INVALID,
    p11_errors.TokenNotPresent: Ckr.TOKEN_NOT_PRESENT,
    p11_errors.TokenNotRecognised: Ckr.TOKEN_NOT_RECOGNIZED,
    p11_errors.UserAlreadyLoggedIn: Ckr.USER_ALREADY_LOGGED_IN,
    p11_errors.UserNotLoggedIn: Ckr.USER_NOT_LOGGED_IN,
    p11_errors.UserPinNotInitialized: Ckr.USER_PIN_NOT_INITIALIZED,
}
# Codes python-pkcs11 has no class for, e.g. CKR_KEY_FUNCTION_NOT_PERMITTED.
_UNMAPPED_CODE = re.compile(r"Unmapped error code (0x[0-9a-fA-F]+)")


def return_value_of(error: Exception) -> int | None:
    """The CK_RV behind a python-pkcs11 exception, or None when it cannot be told."""
    for klass in type(error).__mro__:
        if klass in _RV_OF_ERROR:
            return int(_RV_OF_ERROR[klass])
    message = str(error)
    match = _UNMAPPED_CODE.search(message)
    if match:
        return int(match.group(1), 16)
    if "not initialized" in message:
        return int(Ckr.CRYPTOKI_NOT_INITIALIZED)
    return None


def ckr_name(rv: int | None) -> str:
    """``CKR_GENERAL_ERROR`` style name for logs and messages."""
    if rv is None:
        return "unknown PKCS#11 error"
    try:
        return f"CKR_{Ckr(rv).name}"
    except ValueError:
        return f"CK_RV 0x{rv:x}"


def xks_error_for(operation: str, rv: int | None) -> XksError:
    """The XKS exception for a CK_RV answered to ``operation`` (one table, one override map)."""
    error_class: type[XksError] = InternalException
    if rv is not None:
        error_class = OPERATION_OVERRIDES.get((operation, rv)) or CKR_TO_XKS_ERROR.get(
            rv, InternalException
        )
    if error_class is InternalException:
        return InternalException(f"HSM {operation} failed: {ckr_name(rv)}")
    return error_class()


# ------------------------------------------------------------------------ module registry


class _LongIvGcmParams(GCMParams):
    """GCMParams without python-pkcs11's 12-byte cap: decrypt must accept 16-byte IVs.

    The binding only checks ``isinstance(param, GCMParams)`` and reads these three
    attributes; it keeps a reference to this object for the mechanism's lifetime.
    """

    def __init__(self, nonce: bytes, aad: bytes) -> None:
        self.nonce = nonce
        self.aad = aad
        self.tag_bits = GCM_TAG_BITS


_TokenKey = tuple[str, bytes]  # (label, serial) of a token when first opened: names its login


def _token_key(token: pkcs11.Token) -> _TokenKey:
    return (str(token.label), bytes(token.serial))


@dataclass(eq=False)
class _Login:
    """The application's login on one token: PKCS#11 logs in all sessions at once.

    ``session`` is the logged-in session that holds the login; it is valid only in
    module ``generation`` (after a re-initialisation it is renewed, never closed).
    """

    session: pkcs11.Session
    pin: str = field(repr=False)
    generation: int
    users: int = 1
    # Set when the token refused this PIN while logging in again: no further attempt
    # is made in this process, since retrying a wrong PIN would lock the HSM user.
    refused: str | None = None


@dataclass(slots=True)
class _Backoff:
    """Rate limit of a recovery action: at most one attempt per ``first`` seconds,
    doubling up to ``most`` for every attempt not followed by a working call."""

    failures: int = 0  # attempts since the last working call
    next_at: float = 0.0  # time.monotonic() of the earliest next attempt
    last_at: float = 0.0  # time.monotonic() of the latest attempt

    def left(self, now: float) -> float:
        """Seconds until the next attempt is allowed (0: now)."""
        return max(0.0, self.next_at - now)

    def attempted(self, now: float, first: float, most: float) -> float:
        """Record an attempt; returns the pause before the next one."""
        delay = min(most, first * (1 << min(self.failures, 30)))
        self.failures += 1
        self.last_at = now
        self.next_at = now + delay
        return delay

    def succeeded(self, first: float) -> None:
        """A call worked after the latest attempt: the back-off starts over."""
        self.failures = 0
        self.next_at = min(self.next_at, self.last_at + first)


@dataclass(eq=False)
class _Module:
    """One initialised PKCS#11 module in this process, shared by every key manager on it.

    ``generation`` counts re-initialisations: sessions, object handles and logins are
    only valid in the generation they were made in.
    """

    path: str
    lib: Any  # pkcs11.lib; typed loosely because the stub hides the cached factory
    environment: dict[str, str]
    pid: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0
    logins: dict[_TokenKey, _Login] = field(default_factory=dict)
    generation: int = 0
    reinitializing: bool = False  # C_Finalize/C_Initialize under way (lock held)
    reinit_backoff: _Backoff = field(default_factory=_Backoff)
    reinit_attempts: int = 0
    reinit_failures: int = 0  # C_Initialize failed

    @contextlib.contextmanager
    def locked(self, timeout: float) -> Iterator[None]:
        """Hold the module lock around C calls; DependencyTimeoutException if it stays busy,
        InternalException at once while the module is being re-initialised."""
        if self.reinitializing:
            raise InternalException("the PKCS#11 module is being re-initialised")
        if not self.lock.acquire(timeout=timeout):
            raise DependencyTimeoutException(f"HSM busy: no turn within {timeout:g} s")
        try:
            yield
        finally:
            self.lock.release()


_MODULES: dict[str, _Module] = {}
_MODULES_LOCK = threading.Lock()


def _acquire_module(settings: Pkcs11Settings) -> _Module:
    path = settings.module_path
    environment = dict(settings.environment)
    with _MODULES_LOCK:
        module = _MODULES.get(path)
        if module is not None and module.pid != os.getpid():
            # Inherited across fork: the child must initialise the module afresh.
            del _MODULES[path]
            with contextlib.suppress(Exception):
                module.lib.finalize()
            module = None
        if module is not None:
            if module.environment != environment:
                raise KeyManagerStartupError(
                    f"PKCS#11 module {path} is already initialised in this process with a "
                    "different environment; one configuration per module per process"
                )
            module.users += 1
            return module
        if not os.path.isfile(path):
            raise KeyManagerStartupError(f"PKCS#11 module not found: {path}")
        os.environ.update(environment)  # SoftHSM reads SOFTHSM2_CONF in C_Initialize
        try:
            # pkcs11.lib caches the loaded library per path and re-initialises it if it
            # was finalized; the library is never unloaded, only finalized, because
            # unloading libsofthsm2 can crash at exit in OpenSSL's atexit handlers.
            lib = pkcs11.lib(path)
        except p11_errors.PKCS11Error as exc:
            rv = return_value_of(exc)
            if rv is None:
                raise KeyManagerStartupError(
                    f"not a usable PKCS#11 module: {path} ({exc})"
                ) from None
            raise KeyManagerStartupError(
                f"PKCS#11 module {path} failed to initialise: {ckr_name(rv)}"
                " (for SoftHSM, check SOFTHSM2_CONF and its token directory)"
            ) from None
        module = _Module(path=path, lib=lib, environment=environment, pid=os.getpid(), users=1)
        _MODULES[path] = module
        return module


def _release_module(module: _Module) -> None:
    with _MODULES_LOCK:
        module.users -= 1
        if module.users > 0 or _MODULES.get(module.path) is not module:
            return
        del _MODULES[module.path]
        with module.lock:
            try:
                module.lib.finalize()
            except p11_errors.PKCS11Error as exc:
                log.warning(
                    "C_Finalize on %s failed: %s", module.path, ckr_name(return_value_of(exc))
                )


def _reinitialize(
    module: _Module,
    seen_generation: int,
    reason: str,
    timeout: float,
    interval: float,
    max_interval: float,
) -> None:
    """C_Finalize + C_Initialize ``module``, unless it has moved on from ``seen_generation``
    (another key manager re-initialised it since: nothing to do) or its back-off forbids
    an attempt now (InternalException at once). Bumps the generation even if
    C_Initialize then fails: the old sessions are gone either way."""

    def backing_off(left: float) -> InternalException:
        return InternalException(
            f"PKCS#11 module recovery after {reason} is backing off; next attempt in {left:.1f} s"
        )

    if module.generation != seen_generation:
        return
    left = module.reinit_backoff.left(time.monotonic())
    if left > 0:
        raise backing_off(left)
    with module.locked(timeout):
        if module.generation != seen_generation:
            return
        now = time.monotonic()
        left = module.reinit_backoff.left(now)
        if left > 0:
            raise backing_off(left)
        pause = module.reinit_backoff.attempted(now, interval, max_interval)
        module.reinit_attempts += 1
        module.reinitializing = True
        try:
            log.warning(
                "PKCS#11 module %s: %s; re-initialising it (C_Finalize, C_Initialize), "
                "generation %d -> %d",
                module.path,
                reason,
                module.generation,
                module.generation + 1,
            )
            try:
                module.lib.finalize()
            except p11_errors.PKCS11Error as exc:
                log.info(
                    "PKCS#11 module %s: C_Finalize answered %s (ignored)",
                    module.path,
                    ckr_name(return_value_of(exc)),
                )
            # From here every session, object handle and login of the old generation is
            # dead, whether or not C_Initialize works.
            module.generation += 1
            os.environ.update(module.environment)
            try:
                module.lib.initialize()
            except p11_errors.PKCS11Error as exc:
                module.reinit_failures += 1
                rv = return_value_of(exc)
                log.error(
                    "PKCS#11 module %s: C_Initialize failed: %s; next attempt in %.1f s",
                    module.path,
                    ckr_name(rv),
                    pause,
                )
                raise InternalException(
                    f"PKCS#11 module re-initialisation failed: {ckr_name(rv)}"
                ) from None
            log.warning(
                "PKCS#11 module %s re-initialised (generation %d); its key managers log in "
                "and reopen their sessions on their next call",
                module.path,
                module.generation,
            )
        finally:
            module.reinitializing = False


# ------------------------------------------------------------------------------ sessions


@dataclass(eq=False)
class _PooledSession:
    """One pool place: a session (None while it must be reopened) and its key objects.

    ``generation`` is the module generation the session (and so its key handles) was
    opened in; ``key_epoch`` the key manager's key epoch its key handles belong to.
    """

    session: pkcs11.Session | None = None
    keys: dict[str, Any] = field(default_factory=dict)  # external key id -> SecretKey
    generation: int = -1
    key_epoch: int = 0


class _SessionPool:
    """Pool places lent to one thread at a time. Sessions are (re)opened by the borrower."""

    def __init__(
        self, size: int, opener: Callable[[], tuple[pkcs11.Session, int]], timeout: float
    ) -> None:
        self._opener = opener
        self._timeout = timeout
        # SimpleQueue: a C queue with a timed get, several times cheaper per call than
        # queue.Queue (which is on every request's path).
        self._idle: queue.SimpleQueue[_PooledSession] = queue.SimpleQueue()
        self.size = size
        self.places = [_PooledSession() for _ in range(size)]  # every place, lent or idle
        for place in self.places:
            self._idle.put(place)

    def open_all(self) -> None:
        places = [self._idle.get_nowait() for _ in range(self.size)]
        try:
            for place in places:
                place.session, place.generation = self._opener()
        finally:
            for place in places:
                self._idle.put(place)

    def borrow(self) -> _PooledSession:
        """A place for this thread; give it back with :meth:`give_back`."""
        try:
            return self._idle.get(timeout=self._timeout)
        except queue.Empty:
            raise DependencyTimeoutException(
                f"no HSM session became free within {self._timeout:g} s"
            ) from None

    def give_back(self, place: _PooledSession) -> None:
        self._idle.put(place)

    @contextlib.contextmanager
    def borrowed(self) -> Iterator[_PooledSession]:
        place = self.borrow()
        try:
            yield place
        finally:
            self.give_back(place)

    def drain(self, closer: Callable[[_PooledSession], None]) -> None:
        """Close every session; waits up to the timeout for each one that is lent out."""
        for _ in range(self.size):
            try:
                place = self._idle.get(timeout=self._timeout)
            except queue.Empty:
                log.warning("an HSM session was still in use at close; abandoning it")
                continue
            if place.session is not None:
                closer(place)
            place.session = None
            place.keys.clear()


class _KeysInvisible(Exception):
    """A search found nothing, and not even the health-check key: the login is gone."""


class _Stale(Exception):
    """The module was re-initialised since this session or token was obtained."""


class _OpenFailed(Exception):
    """C_OpenSession failed with ``rv`` in module generation ``generation``."""

    def __init__(self, rv: int | None, generation: int) -> None:
        super().__init__(ckr_name(rv))
        self.rv = rv
        self.generation = generation


class _TokenMissing(Exception):
    """The token could not be found again after a re-initialisation."""


class _LoginRefused(Exception):
    """The token refused the PIN when logging in again; the message names the CK_RV."""


@dataclass(frozen=True, slots=True)
class _KnownKey:
    handle: int
    description: KeyDescription


@dataclass(frozen=True, slots=True)
class RecoveryStats:
    """What a key manager (and its module) did to recover from HSM faults, for tests,
    metrics and the operator."""

    generation: int  # the module's generation: re-initialisation attempts so far
    module_reinit_attempts: int  # C_Finalize + C_Initialize attempts on the module
    module_reinit_failures: int  # ...of which C_Initialize failed
    sessions_replaced: int  # by this key manager
    relogins: int  # logins renewed by this key manager after CKR_USER_NOT_LOGGED_IN
    resyncs: int  # times this key manager caught up with a re-initialised module
    strikes: int  # HSM failures in a row right now (ESCALATE_AFTER_FAILURES escalates)
    recovering: bool  # a re-initialisation is wanted or the token is not yet found again


# ------------------------------------------------------------------------------ adapter


class Pkcs11KeyManager:
    """AES-256-GCM on PKCS#11 secret keys found by CKA_LABEL (the external key id)."""

    def __init__(self, settings: Pkcs11Settings, module: _Module, token: pkcs11.Token) -> None:
        """Use :meth:`open`; this only wires parts together."""
        self._settings = settings
        self._module = module
        self._token = token
        self._login_key = _token_key(token)
        self._slot_id: int = token.slot.slot_id
        self._generation = module.generation  # the module generation _token belongs to
        self._timeout = settings.acquire_timeout
        self._pid = os.getpid()
        self._closed = False
        self._known: dict[str, _KnownKey] = {}
        self._known_lock = threading.Lock()
        self._pool = _SessionPool(settings.sessions, self._open_session, settings.acquire_timeout)
        # Recovery state. Plain attributes: written by one thread at a time in practice
        # (under _recovery_lock or the module lock), read racily on the hot path.
        self._recovery_lock = threading.Lock()
        self._reinit_wanted: int | None = None  # generation in which the device failed
        self._reinit_reason = ""
        # This key manager asked for the latest re-initialisation and has not had a
        # working call since: only its own success resets the module's back-off (a
        # neighbour on another token working fine proves nothing about this device).
        self._reinit_unproven = False
        self._resync_backoff = _Backoff()
        self._resync_error = ""
        self._resync_failed_in = -1  # module generation of the last failed resync
        self._strikes = 0
        self._key_epoch = 0  # bumped when any session broke: every key handle is re-found
        self._sessions_replaced = 0
        self._relogins = 0
        self._resyncs = 0
        firmware = token.firmware_version
        self._info = EkmInfo(
            vendor=token.manufacturer_id.strip(),
            id=token.serial.decode("ascii", "replace").strip() or token.label.strip(),
            model=f"{token.model.strip()} {firmware[0]}.{firmware[1]}",
        )

    def __repr__(self) -> str:
        return f"Pkcs11KeyManager(module={self._module.path!r}, token={self._token.label!r})"

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    def open(cls, settings: Pkcs11Settings) -> Pkcs11KeyManager:
        """Load the module, find the token, log in and open the session pool; check the
        health-check key. Raises :class:`KeyManagerStartupError` naming the problem."""
        if settings.token_label is None and settings.slot is None:
            raise KeyManagerStartupError("set token_label or slot to choose the token")
        if settings.sessions < 1:
            raise KeyManagerStartupError("sessions must be at least 1")
        if not settings.gcm.proxy_generates_iv:
            raise KeyManagerStartupError("HSM-generated GCM IVs are not supported yet")
        if not 0 < settings.recovery_interval <= settings.recovery_max_interval:
            raise KeyManagerStartupError(
                "recovery_interval must be positive and at most recovery_max_interval"
            )
        module = _acquire_module(settings)
        manager: Pkcs11KeyManager | None = None
        login_key: _TokenKey | None = None
        try:
            with module.locked(settings.acquire_timeout):
                token = _find_token(module, settings)
                login_key = _log_in(module, token, settings.pin)
            manager = cls(settings, module, token)
            try:
                manager._pool.open_all()
            except (XksError, _OpenFailed, _Stale) as exc:
                reason = exc.error_message if isinstance(exc, XksError) else str(exc)
                raise KeyManagerStartupError(
                    f"could not open sessions on token {token.label!r}: {reason}"
                ) from None
            manager._check_health_key()
        except BaseException:
            if manager is not None:
                manager._pool.drain(manager._close_place)
            if login_key is not None:
                _log_out(module, login_key)
            _release_module(module)
            raise
        log.info(
            "PKCS#11 key manager ready: module=%s token=%r slot=%s sessions=%d",
            module.path,
            token.label,
            token.slot.slot_id,
            settings.sessions,
        )
        return manager

    def close(self) -> None:
        """Close the sessions, end the login and finalize the module (best effort)."""
        if self._closed:
            return
        self._closed = True
        if os.getpid() != self._pid:
            return  # a forked copy owns nothing it may clean up
        self._pool.drain(self._close_place)
        _log_out(self._module, self._login_key)
        _release_module(self._module)

    def _check_health_key(self) -> None:
        label = self._settings.health_check_key_label
        try:
            with self._pool.borrowed() as place:
                self._ready_place(place)
                assert place.session is not None
                with self._locked(place.generation):
                    present = _is_visible(place.session, label)
        except (XksError, p11_errors.PKCS11Error, _OpenFailed, _Stale) as exc:
            if isinstance(exc, XksError):
                reason = exc.error_message
            elif isinstance(exc, p11_errors.PKCS11Error):
                reason = ckr_name(return_value_of(exc))
            else:
                reason = str(exc) or "the module was re-initialised"
            raise KeyManagerStartupError(f"cannot search the token for keys: {reason}") from None
        if not present:
            raise KeyManagerStartupError(
                f"health-check key {label!r} not found on token {self._token.label!r}"
            )
        try:
            description = self.describe_key(label)
        except XksError as exc:
            raise KeyManagerStartupError(
                f"health-check key {label!r} is not usable: {exc.error_message}"
            ) from None
        if not {"ENCRYPT", "DECRYPT"} <= set(description.key_usage):
            raise KeyManagerStartupError(
                f"health-check key {label!r} must allow both encrypt and decrypt"
            )

    # ------------------------------------------------------------- KeyManager

    def describe_key(self, external_key_id: str) -> KeyDescription:
        """Key spec and usages from the HSM's attributes (cached per process while the
        HSM works; during a recovery the call goes to the HSM and fails like the others)."""
        known = self._known.get(external_key_id)
        if known is not None and self._is_current():
            return known.description
        return self._with_key("describe", external_key_id, None, lambda key: None)[1]

    def encrypt(self, external_key_id: str, plaintext: bytes, hsm_aad: bytes) -> GcmCiphertext:
        """AES-256-GCM with a fresh random IV; the 16-byte tag is split off the output."""
        iv = os.urandom(self._settings.gcm.iv_bytes)
        params = _LongIvGcmParams(iv, bytes(hsm_aad))
        data = bytes(plaintext)

        def run(key: Any) -> bytes:
            encrypt = _key_method(key, "encrypt")
            return _as_bytes(encrypt(data, mechanism=Mechanism.AES_GCM, mechanism_param=params))

        output = self._with_key("encrypt", external_key_id, "ENCRYPT", run)[0]
        if len(output) != len(data) + GCM_TAG_BYTES:
            raise InternalException(
                f"HSM returned {len(output)} bytes for {len(data)} bytes of plaintext"
            )
        return GcmCiphertext(iv=iv, ciphertext=output[:-GCM_TAG_BYTES], tag=output[-GCM_TAG_BYTES:])

    def decrypt(
        self, external_key_id: str, ciphertext: bytes, iv: bytes, tag: bytes, hsm_aad: bytes
    ) -> bytes:
        """AES-256-GCM decrypt; InvalidCiphertextException when the tag does not verify."""
        if len(iv) not in ACCEPTED_DECRYPT_IV_BYTES:
            raise InvalidCiphertextException("the initialization vector must be 12 or 16 bytes")
        if len(tag) != GCM_TAG_BYTES:
            raise InvalidCiphertextException("the authentication tag must be 16 bytes")
        params = _LongIvGcmParams(bytes(iv), bytes(hsm_aad))
        data = bytes(ciphertext) + bytes(tag)

        def run(key: Any) -> bytes:
            decrypt = _key_method(key, "decrypt")
            return _as_bytes(decrypt(data, mechanism=Mechanism.AES_GCM, mechanism_param=params))

        plaintext = self._with_key("decrypt", external_key_id, "DECRYPT", run)[0]
        if len(plaintext) != len(ciphertext):
            raise InternalException("HSM returned a plaintext of the wrong length")
        return plaintext

    def health_check(self) -> None:
        """Encrypt+decrypt 32 random bytes on the health-check key; InternalException if not."""
        label = self._settings.health_check_key_label
        probe = os.urandom(32)
        try:
            sealed = self.encrypt(label, probe, HEALTH_CHECK_AAD)
            opened = self.decrypt(label, sealed.ciphertext, sealed.iv, sealed.tag, HEALTH_CHECK_AAD)
        except XksError as exc:
            raise InternalException(
                f"HSM health check failed: {exc.error_name}: {exc.error_message}"
            ) from exc
        if not hmac.compare_digest(opened, probe):
            raise InternalException("HSM health check failed: decrypt did not return the probe")

    def info(self) -> EkmInfo:
        """Vendor, id (serial) and model of the token."""
        return self._info

    def recovery_stats(self) -> RecoveryStats:
        """Counters of the recovery machinery (a snapshot)."""
        module = self._module
        return RecoveryStats(
            generation=module.generation,
            module_reinit_attempts=module.reinit_attempts,
            module_reinit_failures=module.reinit_failures,
            sessions_replaced=self._sessions_replaced,
            relogins=self._relogins,
            resyncs=self._resyncs,
            strikes=self._strikes,
            recovering=not self._is_current(),
        )

    # ------------------------------------------------------------- internals

    def _with_key(
        self,
        operation: str,
        external_key_id: str,
        usage: str | None,
        action: Callable[[Any], T],
    ) -> tuple[T, KeyDescription]:
        """Borrow a session, resolve the key on it, check ``usage``, run ``action`` under
        the module lock. A stale key handle is re-found once; a broken session is
        replaced and the call retried once; a call that finds the module re-initialised
        under it catches up and restarts once; device failures mark the module for
        re-initialisation. HSM errors become XKS errors via the table."""
        if self._closed:
            raise InternalException("the key manager is closed")
        if os.getpid() != self._pid:
            raise InternalException("PKCS#11 key manager used after fork; open one per worker")
        self._ensure_current()
        place = self._pool.borrow()
        try:
            return self._with_key_on(place, operation, external_key_id, usage, action)
        finally:
            self._pool.give_back(place)

    def _with_key_on(
        self,
        place: _PooledSession,
        operation: str,
        external_key_id: str,
        usage: str | None,
        action: Callable[[Any], T],
    ) -> tuple[T, KeyDescription]:
        refound = False
        reopened = False
        restarted = False
        while True:  # at most one re-find, one session replacement and one restart
            try:
                self._ready_place(place)
                key, description = self._key_on(place, external_key_id)
                if usage is not None and usage not in description.key_usage:
                    raise InvalidKeyUsageException(
                        f"the external key does not allow {usage.lower()}"
                    )
                with self._locked(place.generation):
                    result = action(key)
            except _Stale:
                # The module was re-initialised while this call waited for its lock.
                if restarted:
                    raise InternalException(
                        "the PKCS#11 module was re-initialised during the call"
                    ) from None
                restarted = True
                self._ensure_current()
                continue
            except _KeysInvisible:
                generation = place.generation
                self._replace_session(place, Ckr.USER_NOT_LOGGED_IN)
                if not reopened:
                    reopened = True
                    continue
                login = self._module.logins.get(self._login_key)
                if login is not None and login.refused is not None:
                    raise InternalException(
                        f"HSM login lost and the token refused the PIN ({login.refused})"
                    ) from None
                self._strike("keys invisible after logging in again", generation)
                raise InternalException(
                    "HSM keys are not visible: the login was lost or the health-check key "
                    "is missing"
                ) from None
            except _OpenFailed as failure:
                if failure.rv in _DEVICE_FAILED:
                    self._want_reinit(
                        failure.generation, f"{ckr_name(failure.rv)} opening a session"
                    )
                else:
                    self._strike(f"{ckr_name(failure.rv)} opening a session", failure.generation)
                raise xks_error_for("open session", failure.rv) from None
            except p11_errors.PKCS11Error as exc:
                rv = return_value_of(exc)
                generation = place.generation
                if rv in _HANDLE_STALE and not refound:
                    refound = True
                    self._forget(external_key_id, place)
                    continue
                if rv in _DEVICE_FAILED:
                    # Not closed: the module is about to be finalized, which ends it.
                    self._drop_session(place)
                    self._want_reinit(generation, f"{ckr_name(rv)} during {operation}")
                elif rv in _SESSION_BROKEN:
                    # Retried on this same pool place, now holding a fresh session:
                    # the other pooled sessions may be broken too.
                    self._replace_session(place, rv)
                    if not reopened:
                        reopened = True
                        continue
                    self._strike(f"{ckr_name(rv)} again on a fresh session", generation)
                elif rv in _SUSPECT and operation != "decrypt":
                    # Never for decrypt: its input is the caller's, so a caller could
                    # otherwise drive the module into re-initialisation.
                    self._replace_session(place, rv)
                    self._strike(f"{ckr_name(rv)} during {operation}", generation)
                raise xks_error_for(operation, rv) from None
            else:
                self._succeeded()
                return result, description

    def _key_on(self, place: _PooledSession, external_key_id: str) -> tuple[Any, KeyDescription]:
        """The key object on this pooled session, found (and described) if not yet known."""
        known = self._known.get(external_key_id)
        key = place.keys.get(external_key_id)
        if known is not None and key is not None and key.handle == known.handle:
            return key, known.description
        session = place.session
        assert session is not None
        health_label = self._settings.health_check_key_label
        with self._locked(place.generation):
            try:
                key, description = _find_key(session, external_key_id)
            except KeyNotFoundException:
                # Private keys vanish from searches when the HSM drops the login (restart,
                # C_CloseAllSessions): that must not be answered as KeyNotFound. The
                # health-check key is always there, so it tells the two cases apart.
                if external_key_id == health_label or not _is_visible(session, health_label):
                    raise _KeysInvisible from None
                raise
        place.keys[external_key_id] = key
        with self._known_lock:
            self._known[external_key_id] = _KnownKey(handle=key.handle, description=description)
        return key, description

    def _forget(self, external_key_id: str, place: _PooledSession) -> None:
        place.keys.pop(external_key_id, None)
        with self._known_lock:
            self._known.pop(external_key_id, None)

    @contextlib.contextmanager
    def _locked(self, generation: int) -> Iterator[None]:
        """The module lock, for C calls on a session or token of module ``generation``;
        :class:`_Stale` (lock released) if the module was re-initialised since."""
        with self._module.locked(self._timeout):
            if generation != self._module.generation:
                raise _Stale()
            yield

    def _is_current(self) -> bool:
        return self._reinit_wanted is None and self._generation == self._module.generation

    def _ready_place(self, place: _PooledSession) -> None:
        """Make the place's session usable in the current generation (reopen if needed)."""
        if place.session is not None and place.generation != self._module.generation:
            # Opened before a re-initialisation: the handle is dead and its number may
            # already belong to a new session, so it is dropped, never closed.
            place.session = None
            place.keys.clear()
        if place.key_epoch != self._key_epoch:
            place.keys.clear()
            place.key_epoch = self._key_epoch
        if place.session is None:
            place.session, place.generation = self._open_session()

    def _open_session(self) -> tuple[pkcs11.Session, int]:
        # Sessions are opened without a PIN: the login held by _Login covers them all,
        # and closing them then never calls C_Logout (which would log out every session).
        generation = self._generation
        with self._locked(generation):
            try:
                return _open_session_on(self._token), generation
            except p11_errors.PKCS11Error as exc:
                raise _OpenFailed(return_value_of(exc), generation) from None

    def _close_place(self, place: _PooledSession) -> None:
        session, generation = place.session, place.generation
        place.session = None
        place.keys.clear()
        if session is None:
            return
        with contextlib.suppress(XksError, _Stale), self._locked(generation):
            try:
                session.close()
            except p11_errors.PKCS11Error as exc:
                log.debug("closing an HSM session failed: %s", ckr_name(return_value_of(exc)))

    def _drop_session(self, place: _PooledSession) -> None:
        place.session = None
        place.keys.clear()

    def _replace_session(self, place: _PooledSession, rv: int | None) -> None:
        log.warning("HSM session failed with %s; replacing it", ckr_name(rv))
        self._sessions_replaced += 1
        # Key handles found on the other pooled sessions are suspect too (the HSM may
        # have restarted under all of them): every place finds its keys again.
        self._key_epoch += 1
        generation = place.generation
        self._close_place(place)
        try:
            if rv == Ckr.USER_NOT_LOGGED_IN:
                with self._locked(generation):
                    if _relog_in(self._module, self._login_key, self._token):
                        self._relogins += 1
            place.session, place.generation = self._open_session()
        except _Stale:
            pass  # re-initialised meanwhile: the next use of the place catches up
        except _OpenFailed as failure:
            # Left empty: the next borrower tries again, so the pool heals after an outage.
            log.warning("could not reopen an HSM session: %s", ckr_name(failure.rv))
            if failure.rv in _DEVICE_FAILED:
                self._want_reinit(failure.generation, f"{ckr_name(failure.rv)} opening a session")
            else:
                self._strike(f"{ckr_name(failure.rv)} reopening a session", failure.generation)
        except XksError as exc:
            log.warning("could not reopen an HSM session: %s", exc.error_message)

    # ------------------------------------------------------------- recovery

    def _succeeded(self) -> None:
        if self._strikes:
            self._strikes = 0
        if self._reinit_unproven:
            self._reinit_unproven = False
            self._module.reinit_backoff.succeeded(self._settings.recovery_interval)

    def _strike(self, reason: str, generation: int) -> None:
        """An HSM failure that session replacement and re-login did not cure."""
        self._strikes += 1
        if self._strikes >= ESCALATE_AFTER_FAILURES:
            self._strikes = 0
            self._want_reinit(
                generation, f"{ESCALATE_AFTER_FAILURES} HSM failures in a row (last: {reason})"
            )

    def _want_reinit(self, generation: int, reason: str) -> None:
        """Ask for a module re-initialisation, done by the next call (rate limited)."""
        if self._reinit_wanted is not None:
            return
        self._reinit_reason = reason
        self._reinit_wanted = generation
        log.error(
            "HSM token %r: %s; the PKCS#11 module will be re-initialised",
            self._login_key[0],
            reason,
        )

    def _ensure_current(self) -> None:
        """Catch up with the module before a call: re-initialise it if this key manager
        asked for that, and find the token and log in again after a re-initialisation.
        Fails fast (InternalException) while another thread recovers or the back-off
        forbids an attempt."""
        module = self._module
        if self._reinit_wanted is None and self._generation == module.generation:
            return
        if not self._recovery_lock.acquire(blocking=False):
            raise InternalException("HSM recovery in progress")
        try:
            wanted = self._reinit_wanted
            if wanted is not None:
                settings = self._settings
                try:
                    _reinitialize(
                        module,
                        wanted,
                        self._reinit_reason,
                        self._timeout,
                        settings.recovery_interval,
                        settings.recovery_max_interval,
                    )
                except XksError:
                    if module.generation != wanted:
                        # Attempted, and C_Initialize failed: the new generation needs it too.
                        self._reinit_wanted = module.generation
                    raise
                self._reinit_wanted = None
                self._reinit_unproven = True
            if self._generation != module.generation:
                # The back-off applies within one generation: after a new
                # re-initialisation the token is worth looking for at once.
                left = self._resync_backoff.left(time.monotonic())
                if left > 0 and self._resync_failed_in == module.generation:
                    raise InternalException(
                        f"HSM token not usable ({self._resync_error}); next attempt in {left:.1f} s"
                    )
                self._resync()
        finally:
            self._recovery_lock.release()

    def _resync(self) -> None:
        """After a re-initialisation: find the token again (by label; slot ids may have
        changed), renew the shared login, forget every key handle."""
        module = self._module
        settings = self._settings
        try:
            with module.locked(self._timeout):
                generation = module.generation
                token = _find_token_again(module, self._login_key)
                _ensure_login(module, self._login_key, token)
        except (p11_errors.PKCS11Error, _TokenMissing, _LoginRefused) as exc:
            if isinstance(exc, _TokenMissing):
                reason = str(exc)
                if module.users == 1:
                    # Many modules (SoftHSM among them) list the tokens they found at
                    # C_Initialize: a token that came back is only seen after another
                    # re-initialisation. Never when other key managers share the module:
                    # that would pull their sessions away every time.
                    self._want_reinit(module.generation, reason)
            elif isinstance(exc, _LoginRefused):
                reason = f"the token refused the PIN ({exc}); correct it and restart the proxy"
            else:
                rv = return_value_of(exc)
                reason = f"{ckr_name(rv)} finding the token and logging in"
                if rv in _DEVICE_FAILED:
                    self._want_reinit(module.generation, reason)
            self._resync_error = reason
            self._resync_failed_in = module.generation
            pause = self._resync_backoff.attempted(
                time.monotonic(), settings.recovery_interval, settings.recovery_max_interval
            )
            log.error(
                "HSM token %r: recovery failed: %s; next attempt in %.1f s",
                self._login_key[0],
                reason,
                pause,
            )
            raise InternalException(f"HSM token not usable: {reason}") from None
        self._resync_backoff.succeeded(settings.recovery_interval)
        self._token = token
        self._slot_id = token.slot.slot_id
        with self._known_lock:
            self._known.clear()
        self._key_epoch += 1
        self._resyncs += 1
        self._generation = generation
        log.warning(
            "HSM token %r found again in slot %s and logged in (module generation %d); "
            "sessions reopen as they are used",
            token.label,
            token.slot.slot_id,
            generation,
        )


# ------------------------------------------------------------------- helpers (locked)


def _key_method(key: Any, name: str) -> Callable[..., bytes | Iterator[bytes]]:
    """``key.encrypt``/``key.decrypt``: python-pkcs11 builds key objects without the method
    when CKA_ENCRYPT/CKA_DECRYPT was false at lookup (the flag may change later)."""
    method: Callable[..., bytes | Iterator[bytes]] | None = getattr(key, name, None)
    if method is None:
        raise InvalidKeyUsageException(f"the external key does not allow {name}")
    return method


def _as_bytes(result: bytes | Iterator[bytes]) -> bytes:
    if not isinstance(result, bytes):
        raise InternalException("PKCS#11 binding returned a stream for a single-part operation")
    return result


def _find_token(module: _Module, settings: Pkcs11Settings) -> pkcs11.Token:
    """The configured token; KeyManagerStartupError listing what is present otherwise."""
    present: list[str] = []
    matches: list[pkcs11.Token] = []
    for slot in module.lib.get_slots(token_present=True):
        try:
            token = slot.get_token()
        except p11_errors.PKCS11Error:
            continue
        if not token.flags & TokenFlag.TOKEN_INITIALIZED:
            continue
        present.append(f"{token.label!r} (slot {slot.slot_id})")
        label_ok = settings.token_label is None or token.label == settings.token_label
        slot_ok = settings.slot is None or slot.slot_id == settings.slot
        if label_ok and slot_ok:
            matches.append(token)
    wanted = (
        f"token {settings.token_label!r}" if settings.token_label is not None else "a token"
    ) + (f" in slot {settings.slot}" if settings.slot is not None else "")
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise KeyManagerStartupError(
            f"{len(matches)} tokens match {wanted}; set slot to choose one"
        )
    listing = ", ".join(present) if present else "none"
    raise KeyManagerStartupError(
        f"{wanted} not found in PKCS#11 module {module.path}; initialised tokens present: {listing}"
    )


def _open_session_on(token: pkcs11.Token) -> pkcs11.Session:
    """C_OpenSession (read-only, no login of its own): the seam fault-injection tests use."""
    return token.open(rw=False)


def _find_token_again(module: _Module, key: _TokenKey) -> pkcs11.Token:
    """The token named ``key`` after a re-initialisation, by label: slot ids may change
    across C_Initialize. Among several tokens with that label the one with the same
    serial wins; a single one with another serial is taken (a replaced token), with a
    warning. :class:`_TokenMissing` if there is none or no way to choose."""
    label, serial = key
    matches: list[pkcs11.Token] = []
    for slot in module.lib.get_slots(token_present=True):
        try:
            token = slot.get_token()
        except (p11_errors.TokenNotPresent, p11_errors.TokenNotRecognised):
            continue
        if token.label == label and token.flags & TokenFlag.TOKEN_INITIALIZED:
            matches.append(token)
    same = [token for token in matches if bytes(token.serial) == serial]
    if len(same) == 1:
        return same[0]
    if len(matches) == 1:
        log.warning(
            "token %r now has serial %r (was %r); using it",
            label,
            bytes(matches[0].serial).decode("ascii", "replace"),
            serial.decode("ascii", "replace"),
        )
        return matches[0]
    if not matches:
        raise _TokenMissing(f"token {label!r} is not present in PKCS#11 module {module.path}")
    raise _TokenMissing(f"{len(matches)} tokens are labelled {label!r} and none has its serial")


def _log_in(module: _Module, token: pkcs11.Token, pin: str) -> _TokenKey:
    """Log the application in to ``token`` once, shared by every key manager on it;
    returns the key of the login (for :func:`_log_out`)."""
    key = _token_key(token)
    existing = module.logins.get(key)
    if existing is not None:
        # A second C_Login answers CKR_USER_ALREADY_LOGGED_IN even for a wrong PIN:
        # compare with the PIN that did log in instead.
        if not hmac.compare_digest(existing.pin.encode(), pin.encode()):
            raise KeyManagerStartupError(
                f"token {token.label!r} is already logged in in this process with a different PIN"
            )
        if existing.generation != module.generation:
            try:
                _ensure_login(module, key, token)
            except (p11_errors.PKCS11Error, _LoginRefused) as exc:
                reason = (
                    str(exc) if isinstance(exc, _LoginRefused) else ckr_name(return_value_of(exc))
                )
                raise KeyManagerStartupError(
                    f"cannot log in to token {token.label!r} again: {reason}"
                ) from None
        existing.users += 1
        return key
    try:
        session = _open_logged_in(token, pin)
    except p11_errors.PKCS11Error as exc:
        rv = return_value_of(exc)
        reasons: dict[int, str] = {
            Ckr.PIN_INCORRECT: "wrong PIN",
            Ckr.PIN_LOCKED: "the PIN is locked",
            Ckr.PIN_EXPIRED: "the PIN has expired",
            Ckr.PIN_LEN_RANGE: "the PIN has the wrong length",
            Ckr.USER_PIN_NOT_INITIALIZED: "the user PIN is not initialised",
            Ckr.USER_ALREADY_LOGGED_IN: "another user of this module in this process is "
            "already logged in",
        }
        reason = reasons.get(rv, "login failed") if rv is not None else "login failed"
        raise KeyManagerStartupError(
            f"cannot log in to token {token.label!r}: {reason} ({ckr_name(rv)})"
        ) from None
    module.logins[key] = _Login(session=session, pin=pin, generation=module.generation)
    return key


def _open_logged_in(token: pkcs11.Token, pin: str) -> pkcs11.Session:
    """C_OpenSession + C_Login: the seam fault-injection tests use."""
    return token.open(user_pin=pin)


def _refuse_login(login: _Login, token: pkcs11.Token, rv: int | None) -> None:
    login.refused = ckr_name(rv)
    log.error(
        "HSM token %r refused the PIN when logging in again (%s); no more login attempts "
        "until the proxy is restarted with the right PIN",
        token.label,
        login.refused,
    )


def _ensure_login(module: _Module, key: _TokenKey, token: pkcs11.Token) -> None:
    """Renew the login named ``key`` on ``token`` if it predates the module's generation
    (the old login session died with the old generation: it is not closed).
    :class:`_LoginRefused` if the token refused the PIN, now or before."""
    login = module.logins.get(key)
    if login is None or login.generation == module.generation:
        return
    if login.refused is not None:
        raise _LoginRefused(login.refused)
    try:
        login.session = _open_logged_in(token, login.pin)
    except p11_errors.UserAlreadyLoggedIn:
        # Someone in this process logged in meanwhile; hold a plain session instead.
        login.session = token.open()
    except p11_errors.PKCS11Error as exc:
        rv = return_value_of(exc)
        if rv not in _PIN_REFUSED:
            raise
        _refuse_login(login, token, rv)
        raise _LoginRefused(login.refused) from None
    login.generation = module.generation
    log.info("logged in to token %r again", token.label)


def _relog_in(module: _Module, key: _TokenKey, token: pkcs11.Token) -> bool:
    """Log in again after the HSM dropped the login (restart, C_CloseAllSessions);
    True if the login was renewed. Never retries a PIN the token refused."""
    login = module.logins.get(key)
    if login is None or login.refused is not None:
        return False
    if login.generation == module.generation:
        with contextlib.suppress(p11_errors.PKCS11Error):
            login.session.close()
    try:
        login.session = _open_logged_in(token, login.pin)
    except p11_errors.PKCS11Error as exc:
        rv = return_value_of(exc)
        if rv in _PIN_REFUSED:
            _refuse_login(login, token, rv)
        else:
            log.warning("HSM login failed again: %s", ckr_name(rv))
        return False
    login.generation = module.generation
    log.warning("HSM login on token %r was lost; logged in again", token.label)
    return True


def _log_out(module: _Module, key: _TokenKey) -> None:
    with module.lock:
        login = module.logins.get(key)
        if login is None:
            return
        login.users -= 1
        if login.users > 0:
            return
        del module.logins[key]
        if login.generation != module.generation:
            return  # died with its generation
        try:
            login.session.close()  # C_Logout, then C_CloseSession
        except p11_errors.PKCS11Error as exc:
            log.debug("logout failed: %s", ckr_name(return_value_of(exc)))


def _search(session: pkcs11.Session, label: str) -> list[Any]:
    """Every secret key labelled ``label``; call with the module lock held.

    When C_FindObjectsInit fails, python-pkcs11 leaves its search context marked
    active, and the context's ``__del__`` calls C_FindObjectsFinal later. The
    exception's traceback keeps the context alive, so it is dropped here, while the
    lock is held and before the session can be replaced (its handle may be reused).
    """
    try:
        return list(
            session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label})
        )
    except p11_errors.PKCS11Error as exc:
        bare = type(exc)(*exc.args)
    raise bare


def _find_key(session: pkcs11.Session, external_key_id: str) -> tuple[Any, KeyDescription]:
    """Find the one AES-256 secret key labelled ``external_key_id`` and describe it."""
    found = _search(session, external_key_id)
    if not found:
        raise KeyNotFoundException()
    if len(found) > 1:
        log.warning(
            "%d secret keys carry the label %r; refusing to guess", len(found), external_key_id
        )
        raise InternalException(f"external key id is ambiguous: {len(found)} keys carry this label")
    key = found[0]
    key_type = _read_attribute(key, Attribute.KEY_TYPE)
    value_len = _read_attribute(key, Attribute.VALUE_LEN)
    if key_type != KeyType.AES:
        raise UnsupportedOperationException("external key is not an AES-256 key")
    if value_len is None:
        # CKA_VALUE_LEN is not sensitive in PKCS#11, but some HSMs hide it anyway. Without
        # it the key could be AES-128; refuse rather than report AES_256 unproven.
        log.warning(
            "CKA_VALUE_LEN of key %r is unreadable; treating it as unsupported", external_key_id
        )
        raise UnsupportedOperationException("the length of the external key cannot be read")
    if value_len != AES_256_KEY_BYTES:
        raise UnsupportedOperationException("external key is not an AES-256 key")
    usage = tuple(name for name, attribute in USAGE_ATTRIBUTES if _read_attribute(key, attribute))
    return key, KeyDescription(key_spec="AES_256", key_usage=usage, enabled=True)


def _is_visible(session: pkcs11.Session, label: str) -> bool:
    return bool(_search(session, label))


def _read_attribute(key: Any, attribute: Attribute) -> Any:
    """One attribute, or None when the HSM will not reveal it (sensitive or not defined)."""
    try:
        return key[attribute]
    except (p11_errors.AttributeSensitive, p11_errors.AttributeTypeInvalid):
        return None


# ------------------------------------------------------------------- operator tooling


@dataclass(frozen=True, eq=False)
class AdminSession:
    """A logged-in read-write session for operator tooling (``xks-proxy keys``).

    It shares the module registry and the login with any :class:`Pkcs11KeyManager` in
    the process. Hold :meth:`locked` around every call into the module, as the adapter
    does; it is not re-entrant, so make no key-manager call while holding it.
    """

    session: pkcs11.Session
    token_label: str
    _module: _Module = field(repr=False)
    _timeout: float = field(repr=False)

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """The module lock (DependencyTimeoutException if it stays busy)."""
        return self._module.locked(self._timeout)


@contextlib.contextmanager
def open_admin_session(settings: Pkcs11Settings) -> Iterator[AdminSession]:
    """Load the module, find the token, log in and open a read-write session.

    Unlike :meth:`Pkcs11KeyManager.open` it needs no health-check key (the tooling
    creates it). Raises :class:`KeyManagerStartupError` naming the problem. Never use it
    in a process that forks afterwards.
    """
    if settings.token_label is None and settings.slot is None:
        raise KeyManagerStartupError("set token_label or slot to choose the token")
    module = _acquire_module(settings)
    try:
        with module.locked(settings.acquire_timeout):
            token = _find_token(module, settings)
            login_key = _log_in(module, token, settings.pin)
        try:
            with module.locked(settings.acquire_timeout):
                generation = module.generation
                try:
                    session = token.open(rw=True)  # covered by the login; closing never logs out
                except p11_errors.PKCS11Error as exc:
                    raise KeyManagerStartupError(
                        f"cannot open a read-write session on token {token.label!r}: "
                        f"{ckr_name(return_value_of(exc))}"
                    ) from None
            try:
                yield AdminSession(session, token.label, module, settings.acquire_timeout)
            finally:
                with module.lock:
                    try:
                        if module.generation == generation:  # else it died with its generation
                            session.close()
                    except p11_errors.PKCS11Error as exc:
                        log.debug(
                            "closing the admin session failed: %s", ckr_name(return_value_of(exc))
                        )
        finally:
            _log_out(module, login_key)
    finally:
        _release_module(module)
