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
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import queue
import re
import threading
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

_USAGE_ATTRIBUTES: tuple[tuple[str, Attribute], ...] = (
    ("ENCRYPT", Attribute.ENCRYPT),
    ("DECRYPT", Attribute.DECRYPT),
    ("SIGN", Attribute.SIGN),
    ("VERIFY", Attribute.VERIFY),
    ("WRAP", Attribute.WRAP),
    ("UNWRAP", Attribute.UNWRAP),
    ("DERIVE", Attribute.DERIVE),
)
assert tuple(name for name, _ in _USAGE_ATTRIBUTES) == USAGE_ORDER


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

# A session that answers these is closed and replaced; the call is retried once.
_SESSION_BROKEN = frozenset(
    {Ckr.SESSION_HANDLE_INVALID, Ckr.SESSION_CLOSED, Ckr.USER_NOT_LOGGED_IN, Ckr.OPERATION_ACTIVE}
)
# The device itself is in trouble: replace the session, answer at once (no retry).
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
_HANDLE_STALE = frozenset({Ckr.OBJECT_HANDLE_INVALID, Ckr.KEY_HANDLE_INVALID})

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


@dataclass(eq=False)
class _Login:
    """The application's login on one token: PKCS#11 logs in all sessions at once."""

    session: pkcs11.Session
    pin: str = field(repr=False)
    users: int = 1


@dataclass(eq=False)
class _Module:
    """One initialised PKCS#11 module in this process, shared by every key manager on it."""

    path: str
    lib: Any  # pkcs11.lib; typed loosely because the stub hides the cached factory
    environment: dict[str, str]
    pid: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0
    logins: dict[int, _Login] = field(default_factory=dict)

    @contextlib.contextmanager
    def locked(self, timeout: float) -> Iterator[None]:
        """Hold the module lock around C calls; DependencyTimeoutException if it stays busy."""
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


# ------------------------------------------------------------------------------ sessions


@dataclass(eq=False)
class _PooledSession:
    """One pool place: a session (None while it must be reopened) and its key objects."""

    session: pkcs11.Session | None = None
    keys: dict[str, Any] = field(default_factory=dict)  # external key id -> SecretKey


class _SessionPool:
    """Logged-in sessions lent to one thread at a time; broken ones are replaced."""

    def __init__(self, size: int, opener: Callable[[], pkcs11.Session], timeout: float) -> None:
        self._opener = opener
        self._timeout = timeout
        self._idle: queue.Queue[_PooledSession] = queue.Queue()
        self.size = size
        for _ in range(size):
            self._idle.put(_PooledSession())

    def open_all(self) -> None:
        places = [self._idle.get_nowait() for _ in range(self.size)]
        try:
            for place in places:
                place.session = self._opener()
        finally:
            for place in places:
                self._idle.put(place)

    @contextlib.contextmanager
    def borrowed(self) -> Iterator[_PooledSession]:
        try:
            place = self._idle.get(timeout=self._timeout)
        except queue.Empty:
            raise DependencyTimeoutException(
                f"no HSM session became free within {self._timeout:g} s"
            ) from None
        try:
            if place.session is None:
                place.session = self._opener()
            yield place
        finally:
            self._idle.put(place)

    def drain(self, closer: Callable[[pkcs11.Session], None]) -> None:
        """Close every session; waits up to the timeout for each one that is lent out."""
        for _ in range(self.size):
            try:
                place = self._idle.get(timeout=self._timeout)
            except queue.Empty:
                log.warning("an HSM session was still in use at close; abandoning it")
                continue
            if place.session is not None:
                closer(place.session)
            place.session = None
            place.keys.clear()


class _KeysInvisible(Exception):
    """A search found nothing, and not even the health-check key: the login is gone."""


@dataclass(frozen=True, slots=True)
class _KnownKey:
    handle: int
    description: KeyDescription


# ------------------------------------------------------------------------------ adapter


class Pkcs11KeyManager:
    """AES-256-GCM on PKCS#11 secret keys found by CKA_LABEL (the external key id)."""

    def __init__(self, settings: Pkcs11Settings, module: _Module, token: pkcs11.Token) -> None:
        """Use :meth:`open`; this only wires parts together."""
        self._settings = settings
        self._module = module
        self._token = token
        self._slot_id: int = token.slot.slot_id
        self._timeout = settings.acquire_timeout
        self._pid = os.getpid()
        self._closed = False
        self._known: dict[str, _KnownKey] = {}
        self._known_lock = threading.Lock()
        self._pool = _SessionPool(settings.sessions, self._open_session, settings.acquire_timeout)
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
        module = _acquire_module(settings)
        manager: Pkcs11KeyManager | None = None
        logged_in = False
        try:
            with module.locked(settings.acquire_timeout):
                token = _find_token(module, settings)
                _log_in(module, token, settings.pin)
            logged_in = True
            manager = cls(settings, module, token)
            try:
                manager._pool.open_all()
            except XksError as exc:
                raise KeyManagerStartupError(
                    f"could not open sessions on token {token.label!r}: {exc.error_message}"
                ) from None
            manager._check_health_key()
        except BaseException:
            if manager is not None:
                manager._pool.drain(manager._close_session)
            if logged_in:
                _log_out(module, token.slot.slot_id)
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
        self._pool.drain(self._close_session)
        _log_out(self._module, self._slot_id)
        _release_module(self._module)

    def _check_health_key(self) -> None:
        label = self._settings.health_check_key_label
        try:
            with self._pool.borrowed() as place, self._module.locked(self._timeout):
                assert place.session is not None
                present = _is_visible(place.session, label)
        except (XksError, p11_errors.PKCS11Error) as exc:
            reason = (
                exc.error_message if isinstance(exc, XksError) else ckr_name(return_value_of(exc))
            )
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
        """Key spec and usages from the HSM's attributes (cached per process)."""
        known = self._known.get(external_key_id)
        if known is not None:
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
        replaced and the call retried once; HSM errors become XKS errors via the table."""
        if self._closed:
            raise InternalException("the key manager is closed")
        if os.getpid() != self._pid:
            raise InternalException("PKCS#11 key manager used after fork; open one per worker")
        with self._pool.borrowed() as place:
            refound = False
            reopened = False
            while True:  # at most one re-find and one session replacement
                try:
                    if place.session is None:
                        place.session = self._open_session()
                    key, description = self._key_on(place, external_key_id)
                    if usage is not None and usage not in description.key_usage:
                        raise InvalidKeyUsageException(
                            f"the external key does not allow {usage.lower()}"
                        )
                    with self._module.locked(self._timeout):
                        return action(key), description
                except _KeysInvisible:
                    self._replace_session(place, Ckr.USER_NOT_LOGGED_IN)
                    if not reopened:
                        reopened = True
                        continue
                    raise InternalException(
                        "HSM keys are not visible: the login was lost or the health-check key "
                        "is missing"
                    ) from None
                except p11_errors.PKCS11Error as exc:
                    rv = return_value_of(exc)
                    if rv in _HANDLE_STALE and not refound:
                        refound = True
                        self._forget(external_key_id, place)
                        continue
                    if rv in _SESSION_BROKEN or rv in _DEVICE_FAILED:
                        # Retried on this same pool place, now holding a fresh session:
                        # the other pooled sessions may be broken too.
                        self._replace_session(place, rv)
                        if rv in _SESSION_BROKEN and not reopened:
                            reopened = True
                            continue
                    raise xks_error_for(operation, rv) from None

    def _key_on(self, place: _PooledSession, external_key_id: str) -> tuple[Any, KeyDescription]:
        """The key object on this pooled session, found (and described) if not yet known."""
        known = self._known.get(external_key_id)
        key = place.keys.get(external_key_id)
        if known is not None and key is not None and key.handle == known.handle:
            return key, known.description
        session = place.session
        assert session is not None
        health_label = self._settings.health_check_key_label
        with self._module.locked(self._timeout):
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

    def _open_session(self) -> pkcs11.Session:
        # Sessions are opened without a PIN: the login held by _Login covers them all,
        # and closing them then never calls C_Logout (which would log out every session).
        with self._module.locked(self._timeout):
            try:
                return self._token.open(rw=False)
            except p11_errors.PKCS11Error as exc:
                raise xks_error_for("open session", return_value_of(exc)) from None

    def _close_session(self, session: pkcs11.Session) -> None:
        with self._module.locked(self._timeout):
            try:
                session.close()
            except p11_errors.PKCS11Error as exc:
                log.debug("closing an HSM session failed: %s", ckr_name(return_value_of(exc)))

    def _replace_session(self, place: _PooledSession, rv: int | None) -> None:
        log.warning("HSM session failed with %s; replacing it", ckr_name(rv))
        if place.session is not None:
            with contextlib.suppress(XksError):
                self._close_session(place.session)
        place.session = None
        place.keys.clear()
        if rv == Ckr.USER_NOT_LOGGED_IN:
            with contextlib.suppress(XksError), self._module.locked(self._timeout):
                _relog_in(self._module, self._token)
        try:
            place.session = self._open_session()
        except XksError as exc:
            # Left empty: the next borrower tries again, so the pool heals after an outage.
            log.warning("could not reopen an HSM session: %s", exc.error_message)


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


def _log_in(module: _Module, token: pkcs11.Token, pin: str) -> None:
    """Log the application in to ``token`` once, shared by every key manager on it."""
    slot_id: int = token.slot.slot_id
    existing = module.logins.get(slot_id)
    if existing is not None:
        # A second C_Login answers CKR_USER_ALREADY_LOGGED_IN even for a wrong PIN:
        # compare with the PIN that did log in instead.
        if not hmac.compare_digest(existing.pin.encode(), pin.encode()):
            raise KeyManagerStartupError(
                f"token {token.label!r} is already logged in in this process with a different PIN"
            )
        existing.users += 1
        return
    try:
        session = token.open(user_pin=pin)
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
    module.logins[slot_id] = _Login(session=session, pin=pin)


def _relog_in(module: _Module, token: pkcs11.Token) -> None:
    """Log in again after the HSM dropped the login (restart, C_CloseAllSessions)."""
    login = module.logins.get(token.slot.slot_id)
    if login is None:
        return
    with contextlib.suppress(p11_errors.PKCS11Error):
        login.session.close()
    try:
        login.session = token.open(user_pin=login.pin)
    except p11_errors.PKCS11Error as exc:
        log.warning("HSM login failed again: %s", ckr_name(return_value_of(exc)))


def _log_out(module: _Module, slot_id: int) -> None:
    with module.lock:
        login = module.logins.get(slot_id)
        if login is None:
            return
        login.users -= 1
        if login.users > 0:
            return
        del module.logins[slot_id]
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
    usage = tuple(name for name, attribute in _USAGE_ATTRIBUTES if _read_attribute(key, attribute))
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
            _log_in(module, token, settings.pin)
        try:
            with module.locked(settings.acquire_timeout):
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
                        session.close()
                    except p11_errors.PKCS11Error as exc:
                        log.debug(
                            "closing the admin session failed: %s", ckr_name(return_value_of(exc))
                        )
        finally:
            _log_out(module, token.slot.slot_id)
    finally:
        _release_module(module)
