"""Pkcs11KeyManager against a real SoftHSMv2 token."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pkcs11 import Attribute, KeyType, ObjectClass

from xks_proxy.keymanager import pkcs11 as adapter
from xks_proxy.keymanager.base import GCM_TAG_BYTES, KeyDescription
from xks_proxy.keymanager.pkcs11 import (
    CKR_TO_XKS_ERROR,
    Ckr,
    KeyManagerStartupError,
    Pkcs11KeyManager,
    Pkcs11Settings,
    return_value_of,
    xks_error_for,
)
from xks_proxy.keymanager.softhsm import (
    HEALTH_CHECK_KEY_LABEL,
    KeySpec,
    SoftHsmToken,
    softhsm_conf_text,
)
from xks_proxy.protocol.errors import (
    DependencyTimeoutException,
    InternalException,
    InvalidCiphertextException,
    InvalidKeyUsageException,
    KeyNotFoundException,
    UnsupportedOperationException,
)

pytestmark = pytest.mark.hsm

AAD = b"\x00\x05hello\x00"  # u16be(len) || AAD || u8(len(metadata)), as the core builds it
KNOWN_KEY_LABEL = "known-value-key"
KNOWN_KEY = bytes.fromhex("6c0c0d4f0a0a3d1c9c3b8e4e1f2a7d5b3e6f8a9b0c1d2e3f405162738495a6b7")

AddKeys = Callable[[Sequence[KeySpec], Mapping[str, bytes] | None], None]


@pytest.fixture(scope="module")
def known_key(add_softhsm_keys: AddKeys) -> bytes:
    """A key on the token whose value the test knows, to cross-check with `cryptography`."""
    add_softhsm_keys([KeySpec(KNOWN_KEY_LABEL, True, True)], {KNOWN_KEY_LABEL: KNOWN_KEY})
    return KNOWN_KEY


@pytest.fixture
def scratch_session(key_manager: Pkcs11KeyManager, softhsm_token: SoftHsmToken) -> Iterator[Any]:
    """A read-write session on the same token, for session objects that vanish afterwards.

    Single-threaded tests only: it bypasses the adapter's module lock. The key
    manager's login covers it, so no PIN is given (and closing it does not log out).
    """
    lib = pkcs11.lib(softhsm_token.module_path)  # the adapter's already-initialised copy
    token = lib.get_token(token_label=softhsm_token.token_label)
    session = token.open(rw=True)
    try:
        yield session
    finally:
        session.close()


def _session_key(session: Any, label: str, value: bytes, key_type: KeyType = KeyType.AES) -> None:
    session.create_object(
        {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: key_type,
            Attribute.TOKEN: False,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.LABEL: label,
            Attribute.VALUE: value,
            Attribute.ENCRYPT: True,
            Attribute.DECRYPT: True,
            Attribute.SIGN: False,  # SoftHSM defaults these four to true
            Attribute.VERIFY: False,
            Attribute.WRAP: False,
            Attribute.UNWRAP: False,
        }
    )


def _flip(data: bytes, index: int = 0) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


# ------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("size", [0, 1, 32, 4300])
def test_round_trip(key_manager: Pkcs11KeyManager, size: int) -> None:
    plaintext = os.urandom(size)
    sealed = key_manager.encrypt("foo", plaintext, AAD)
    assert len(sealed.iv) == 12
    assert len(sealed.tag) == GCM_TAG_BYTES
    assert len(sealed.ciphertext) == size
    assert key_manager.decrypt("foo", sealed.ciphertext, sealed.iv, sealed.tag, AAD) == plaintext


def test_round_trip_with_largest_aad(key_manager: Pkcs11KeyManager) -> None:
    # spec minimums: 8192 bytes of AAD and 20 of metadata, framed by the core
    hsm_aad = (8192).to_bytes(2, "big") + os.urandom(8192) + b"\x14" + os.urandom(20)
    sealed = key_manager.encrypt("foo", b"secret", hsm_aad)
    assert (
        key_manager.decrypt("foo", sealed.ciphertext, sealed.iv, sealed.tag, hsm_aad) == b"secret"
    )


def test_round_trip_with_empty_aad(key_manager: Pkcs11KeyManager) -> None:
    sealed = key_manager.encrypt("foo", b"secret", b"")
    assert key_manager.decrypt("foo", sealed.ciphertext, sealed.iv, sealed.tag, b"") == b"secret"


def test_every_encryption_uses_a_fresh_iv(key_manager: Pkcs11KeyManager) -> None:
    ivs = {key_manager.encrypt("foo", b"same", AAD).iv for _ in range(200)}
    assert len(ivs) == 200


# ---------------------------------------------- cross-check with standard AES-GCM


def test_ciphertext_is_standard_gcm(key_manager: Pkcs11KeyManager, known_key: bytes) -> None:
    plaintext = os.urandom(100)
    sealed = key_manager.encrypt(KNOWN_KEY_LABEL, plaintext, AAD)
    reference = AESGCM(known_key).decrypt(sealed.iv, sealed.ciphertext + sealed.tag, AAD)
    assert reference == plaintext


@pytest.mark.parametrize("iv_bytes", [12, 16])
def test_decrypts_standard_gcm_with_12_and_16_byte_ivs(
    key_manager: Pkcs11KeyManager, known_key: bytes, iv_bytes: int
) -> None:
    # SoftHSM only makes 12-byte IVs through the adapter; other HSMs make 16-byte ones,
    # so produce one with `cryptography` under the same key.
    iv = os.urandom(iv_bytes)
    plaintext = os.urandom(48)
    sealed = AESGCM(known_key).encrypt(iv, plaintext, AAD)
    ciphertext, tag = sealed[:-GCM_TAG_BYTES], sealed[-GCM_TAG_BYTES:]
    assert key_manager.decrypt(KNOWN_KEY_LABEL, ciphertext, iv, tag, AAD) == plaintext
    with pytest.raises(InvalidCiphertextException):
        key_manager.decrypt(KNOWN_KEY_LABEL, ciphertext, _flip(iv), tag, AAD)


# ----------------------------------------------------------------------- tampering


@pytest.mark.parametrize("field", ["tag", "iv", "aad", "ciphertext", "truncated_tag", "empty_aad"])
def test_tampering_is_invalid_ciphertext(key_manager: Pkcs11KeyManager, field: str) -> None:
    sealed = key_manager.encrypt("foo", b"attack at dawn", AAD)
    ciphertext, iv, tag, aad = sealed.ciphertext, sealed.iv, sealed.tag, AAD
    if field == "tag":
        tag = _flip(tag, 15)
    elif field == "iv":
        iv = _flip(iv, 11)
    elif field == "aad":
        aad = _flip(aad, 3)
    elif field == "ciphertext":
        ciphertext = _flip(ciphertext, 5)
    elif field == "truncated_tag":
        tag = tag[:12]
    else:
        aad = b""
    with pytest.raises(InvalidCiphertextException):
        key_manager.decrypt("foo", ciphertext, iv, tag, aad)


def test_tampered_empty_plaintext_is_invalid_ciphertext(key_manager: Pkcs11KeyManager) -> None:
    sealed = key_manager.encrypt("foo", b"", AAD)
    with pytest.raises(InvalidCiphertextException):
        key_manager.decrypt("foo", b"", sealed.iv, _flip(sealed.tag), AAD)


@pytest.mark.parametrize("iv_bytes", [0, 8, 13, 32])
def test_iv_of_unsupported_length_is_invalid_ciphertext(
    key_manager: Pkcs11KeyManager, iv_bytes: int
) -> None:
    sealed = key_manager.encrypt("foo", b"data", AAD)
    with pytest.raises(InvalidCiphertextException):
        key_manager.decrypt("foo", sealed.ciphertext, os.urandom(iv_bytes), sealed.tag, AAD)


def test_wrong_16_byte_iv_is_invalid_ciphertext_not_a_crash(
    key_manager: Pkcs11KeyManager,
) -> None:
    sealed = key_manager.encrypt("foo", b"data", AAD)
    with pytest.raises(InvalidCiphertextException):
        key_manager.decrypt("foo", sealed.ciphertext, os.urandom(16), sealed.tag, AAD)


def test_ciphertext_under_another_key_is_invalid(key_manager: Pkcs11KeyManager) -> None:
    sealed = key_manager.encrypt("foo", b"data", AAD)
    with pytest.raises(InvalidCiphertextException):
        key_manager.decrypt("decrypt_only_key", sealed.ciphertext, sealed.iv, sealed.tag, AAD)


# --------------------------------------------------------------------- key usage


def test_encrypt_only_key_cannot_decrypt(key_manager: Pkcs11KeyManager) -> None:
    sealed = key_manager.encrypt("encrypt_only_key", b"data", AAD)
    with pytest.raises(InvalidKeyUsageException):
        key_manager.decrypt("encrypt_only_key", sealed.ciphertext, sealed.iv, sealed.tag, AAD)


def test_decrypt_only_key_cannot_encrypt(key_manager: Pkcs11KeyManager) -> None:
    with pytest.raises(InvalidKeyUsageException):
        key_manager.encrypt("decrypt_only_key", b"data", AAD)


def test_impotent_key_can_do_neither(key_manager: Pkcs11KeyManager) -> None:
    with pytest.raises(InvalidKeyUsageException):
        key_manager.encrypt("impotent_key", b"data", AAD)
    with pytest.raises(InvalidKeyUsageException):
        key_manager.decrypt("impotent_key", b"data", os.urandom(12), os.urandom(16), AAD)


@pytest.mark.parametrize(
    ("label", "usage"),
    [
        ("foo", ("ENCRYPT", "DECRYPT")),
        ("encrypt_only_key", ("ENCRYPT",)),
        ("decrypt_only_key", ("DECRYPT",)),
        ("impotent_key", ()),
        (HEALTH_CHECK_KEY_LABEL, ("ENCRYPT", "DECRYPT")),
    ],
)
def test_describe_key(key_manager: Pkcs11KeyManager, label: str, usage: tuple[str, ...]) -> None:
    assert key_manager.describe_key(label) == KeyDescription(
        key_spec="AES_256", key_usage=usage, enabled=True
    )


def test_usage_follows_usage_order_with_all_flags(
    key_manager: Pkcs11KeyManager, scratch_session: Any
) -> None:
    scratch_session.generate_key(
        KeyType.AES,
        256,
        label="all-usages",
        template={
            Attribute.TOKEN: False,
            Attribute.ENCRYPT: True,
            Attribute.DECRYPT: True,
            Attribute.SIGN: True,
            Attribute.VERIFY: True,
            Attribute.WRAP: True,
            Attribute.UNWRAP: True,
            Attribute.DERIVE: True,
        },
    )
    assert key_manager.describe_key("all-usages").key_usage == (
        "ENCRYPT",
        "DECRYPT",
        "SIGN",
        "VERIFY",
        "WRAP",
        "UNWRAP",
        "DERIVE",
    )


def test_usage_revoked_in_the_hsm_is_invalid_key_usage(
    key_manager: Pkcs11KeyManager, pkcs11_settings: Pkcs11Settings, scratch_session: Any
) -> None:
    _session_key(scratch_session, "revocable", os.urandom(32))
    key_manager.encrypt("revocable", b"data", AAD)  # cached as able to encrypt
    key = scratch_session.get_key(label="revocable", object_class=ObjectClass.SECRET_KEY)
    key[Attribute.ENCRYPT] = False
    # The HSM refuses with CKR_KEY_FUNCTION_NOT_PERMITTED (python-pkcs11: "unmapped").
    with pytest.raises(InvalidKeyUsageException):
        key_manager.encrypt("revocable", b"data", AAD)
    fresh = Pkcs11KeyManager.open(pkcs11_settings)
    try:
        assert fresh.describe_key("revocable").key_usage == ("DECRYPT",)
        with pytest.raises(InvalidKeyUsageException):
            fresh.encrypt("revocable", b"data", AAD)
    finally:
        fresh.close()


# ------------------------------------------------------------------ key lookup


def test_unknown_label_is_key_not_found(key_manager: Pkcs11KeyManager) -> None:
    with pytest.raises(KeyNotFoundException):
        key_manager.describe_key("no-such-key")
    with pytest.raises(KeyNotFoundException):
        key_manager.encrypt("no-such-key", b"data", AAD)
    with pytest.raises(KeyNotFoundException):
        key_manager.decrypt("no-such-key", b"data", os.urandom(12), os.urandom(16), AAD)


def test_duplicate_label_is_internal_error(
    key_manager: Pkcs11KeyManager, scratch_session: Any, caplog: pytest.LogCaptureFixture
) -> None:
    _session_key(scratch_session, "twice", os.urandom(32))
    _session_key(scratch_session, "twice", os.urandom(32))
    with caplog.at_level(logging.WARNING, logger="xks_proxy.hsm"):
        with pytest.raises(InternalException, match="ambiguous: 2 keys carry this label"):
            key_manager.describe_key("twice")
        with pytest.raises(InternalException):
            key_manager.encrypt("twice", b"data", AAD)
    assert any("twice" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    ("key_type", "value"),
    [
        (KeyType.AES, os.urandom(16)),
        (KeyType.AES, os.urandom(24)),
        (KeyType.GENERIC_SECRET, os.urandom(32)),
    ],
    ids=["aes128", "aes192", "generic-secret"],
)
def test_non_aes256_key_is_unsupported(
    key_manager: Pkcs11KeyManager, scratch_session: Any, key_type: KeyType, value: bytes
) -> None:
    _session_key(scratch_session, "not-aes-256", value, key_type)
    with pytest.raises(UnsupportedOperationException, match="not an AES-256 key"):
        key_manager.describe_key("not-aes-256")
    with pytest.raises(UnsupportedOperationException):
        key_manager.encrypt("not-aes-256", b"data", AAD)


def test_aes128_key_created_through_provisioning_is_unsupported(
    key_manager: Pkcs11KeyManager, add_softhsm_keys: AddKeys
) -> None:
    add_softhsm_keys([KeySpec("aes-128-key", True, True)], {"aes-128-key": os.urandom(16)})
    with pytest.raises(UnsupportedOperationException):
        key_manager.describe_key("aes-128-key")


def test_deleted_key_is_found_again_or_reported_missing(
    key_manager: Pkcs11KeyManager, scratch_session: Any
) -> None:
    # Cache the handle, destroy the object behind the adapter's back, recreate it.
    _session_key(scratch_session, "short-lived", os.urandom(32))
    key_manager.encrypt("short-lived", b"data", AAD)
    scratch_session.get_key(label="short-lived", object_class=ObjectClass.SECRET_KEY).destroy()
    with pytest.raises(KeyNotFoundException):
        key_manager.encrypt("short-lived", b"data", AAD)
    _session_key(scratch_session, "short-lived", os.urandom(32))
    sealed = key_manager.encrypt("short-lived", b"data", AAD)
    assert (
        key_manager.decrypt("short-lived", sealed.ciphertext, sealed.iv, sealed.tag, AAD) == b"data"
    )


# ------------------------------------------------------------------ health, info


def test_health_check_passes(key_manager: Pkcs11KeyManager) -> None:
    key_manager.health_check()


def test_info_describes_the_token(key_manager: Pkcs11KeyManager) -> None:
    info = key_manager.info()
    assert info.vendor == "SoftHSM project"
    assert info.model.startswith("SoftHSM v2 ")
    assert info.id and info.id == info.id.strip()
    assert all(" " <= ch <= "~" for ch in info.vendor + info.id + info.model)


# -------------------------------------------------------------- session recovery


def _pooled_places(manager: Pkcs11KeyManager) -> list[Any]:
    # White-box: reach into the pool to break sessions behind the adapter's back.
    return list(manager._pool.places)


# python-pkcs11 reports the failed C_FindObjectsFinal of its abandoned search context
# as an "unraisable" exception; the adapter makes it happen under the module lock.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_sessions_closed_behind_our_back_are_replaced(
    key_manager: Pkcs11KeyManager, caplog: pytest.LogCaptureFixture
) -> None:
    key_manager.encrypt("foo", b"warm the caches", AAD)
    places = _pooled_places(key_manager)
    old_handles = {place.session.handle for place in places}
    for place in places:
        place.session.close()
    with caplog.at_level(logging.WARNING, logger="xks_proxy.hsm"):
        for _ in range(3 * len(places)):
            sealed = key_manager.encrypt("foo", b"still works", AAD)
            assert (
                key_manager.decrypt("foo", sealed.ciphertext, sealed.iv, sealed.tag, AAD)
                == b"still works"
            )
    new_handles = {place.session.handle for place in _pooled_places(key_manager)}
    assert not new_handles & old_handles
    assert any("replacing" in record.getMessage() for record in caplog.records)
    key_manager.health_check()


def test_lost_login_is_restored_not_reported_as_key_not_found(
    key_manager: Pkcs11KeyManager, pkcs11_settings: Pkcs11Settings
) -> None:
    key_manager.encrypt("foo", b"warm the caches", AAD)
    module = adapter._MODULES[pkcs11_settings.module_path]
    for login in module.logins.values():
        login.session.close()  # C_Logout: every session of the application loses its login
    # Without the login SoftHSM hides private keys; the adapter must log in again.
    sealed = key_manager.encrypt("foo", b"after logout", AAD)
    assert (
        key_manager.decrypt("foo", sealed.ciphertext, sealed.iv, sealed.tag, AAD) == b"after logout"
    )
    assert key_manager.describe_key("foo").key_usage == ("ENCRYPT", "DECRYPT")
    with pytest.raises(KeyNotFoundException):
        key_manager.describe_key("still-no-such-key")


def test_no_free_session_is_dependency_timeout(pkcs11_settings: Pkcs11Settings) -> None:
    settings = dataclasses.replace(pkcs11_settings, sessions=1, acquire_timeout=0.2)
    manager = Pkcs11KeyManager.open(settings)
    try:
        holding = threading.Event()
        release = threading.Event()

        def hog() -> None:
            with manager._pool.borrowed():
                holding.set()
                release.wait(5)

        thread = threading.Thread(target=hog)
        thread.start()
        assert holding.wait(5)
        try:
            with pytest.raises(DependencyTimeoutException):
                manager.encrypt("foo", b"data", AAD)
        finally:
            release.set()
            thread.join()
        manager.encrypt("foo", b"data", AAD)
    finally:
        manager.close()


def test_two_managers_share_the_login(
    key_manager: Pkcs11KeyManager, pkcs11_settings: Pkcs11Settings
) -> None:
    second = Pkcs11KeyManager.open(pkcs11_settings)
    sealed = second.encrypt("foo", b"shared", AAD)
    second.close()
    # Closing the second must not log out or finalize under the first.
    assert key_manager.decrypt("foo", sealed.ciphertext, sealed.iv, sealed.tag, AAD) == b"shared"
    key_manager.health_check()


def test_closed_manager_refuses_calls(pkcs11_settings: Pkcs11Settings) -> None:
    manager = Pkcs11KeyManager.open(pkcs11_settings)
    manager.close()
    manager.close()  # idempotent
    with pytest.raises(InternalException, match="closed"):
        manager.encrypt("foo", b"data", AAD)


# ------------------------------------------------------------------ startup errors


WRONG_PIN = "wrong-pin-7f3a9c"


def _startup_error(settings: Pkcs11Settings) -> str:
    with pytest.raises(KeyManagerStartupError) as caught:
        Pkcs11KeyManager.open(settings).close()
    message = str(caught.value)
    assert settings.pin not in message
    assert settings.pin not in repr(settings)
    return message


def test_wrong_pin(pkcs11_settings: Pkcs11Settings) -> None:
    message = _startup_error(dataclasses.replace(pkcs11_settings, pin=WRONG_PIN))
    assert "CKR_PIN_INCORRECT" in message
    assert "xks-test" in message


def test_wrong_pin_while_another_manager_is_logged_in(
    key_manager: Pkcs11KeyManager, pkcs11_settings: Pkcs11Settings
) -> None:
    # SoftHSM answers CKR_USER_ALREADY_LOGGED_IN to any PIN once logged in.
    message = _startup_error(dataclasses.replace(pkcs11_settings, pin=WRONG_PIN))
    assert "different PIN" in message
    key_manager.health_check()


def test_missing_module(pkcs11_settings: Pkcs11Settings, tmp_path: Path) -> None:
    missing = str(tmp_path / "libnothing.so")
    message = _startup_error(dataclasses.replace(pkcs11_settings, module_path=missing))
    assert "not found" in message
    assert missing in message


def test_file_that_is_not_a_pkcs11_module(pkcs11_settings: Pkcs11Settings, tmp_path: Path) -> None:
    bogus = tmp_path / "libbogus.so"
    bogus.write_bytes(b"this is not a shared object")
    message = _startup_error(dataclasses.replace(pkcs11_settings, module_path=str(bogus)))
    assert "not a usable PKCS#11 module" in message


def test_unknown_token_label_lists_the_tokens(pkcs11_settings: Pkcs11Settings) -> None:
    message = _startup_error(dataclasses.replace(pkcs11_settings, token_label="no-such-token"))
    assert "'no-such-token' not found" in message
    assert "'xks-test'" in message


def test_unknown_slot(pkcs11_settings: Pkcs11Settings) -> None:
    message = _startup_error(dataclasses.replace(pkcs11_settings, token_label=None, slot=424242))
    assert "slot 424242 not found" in message


def test_token_chosen_by_slot(
    key_manager: Pkcs11KeyManager, pkcs11_settings: Pkcs11Settings
) -> None:
    slot_id = key_manager._slot_id
    manager = Pkcs11KeyManager.open(
        dataclasses.replace(pkcs11_settings, token_label=None, slot=slot_id)
    )
    try:
        manager.health_check()
    finally:
        manager.close()


def test_neither_label_nor_slot(pkcs11_settings: Pkcs11Settings) -> None:
    message = _startup_error(dataclasses.replace(pkcs11_settings, token_label=None, slot=None))
    assert "token_label or slot" in message


def test_missing_health_check_key(pkcs11_settings: Pkcs11Settings) -> None:
    message = _startup_error(
        dataclasses.replace(pkcs11_settings, health_check_key_label="no-health-key")
    )
    assert "health-check key 'no-health-key' not found" in message


def test_health_check_key_that_cannot_decrypt(pkcs11_settings: Pkcs11Settings) -> None:
    message = _startup_error(
        dataclasses.replace(pkcs11_settings, health_check_key_label="encrypt_only_key")
    )
    assert "must allow both encrypt and decrypt" in message


def test_failed_startup_leaves_the_module_usable(pkcs11_settings: Pkcs11Settings) -> None:
    _startup_error(dataclasses.replace(pkcs11_settings, pin=WRONG_PIN))
    _startup_error(dataclasses.replace(pkcs11_settings, health_check_key_label="nope"))
    manager = Pkcs11KeyManager.open(pkcs11_settings)
    try:
        manager.health_check()
    finally:
        manager.close()


def test_two_tokens_with_the_same_label(
    pkcs11_settings: Pkcs11Settings, softhsm_token: SoftHsmToken, tmp_path: Path
) -> None:
    # Its own SoftHSM configuration: nothing else holds the module during this test,
    # so the new SOFTHSM2_CONF is applied before C_Initialize.
    token_dir = tmp_path / "tokens"
    token_dir.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(softhsm_conf_text(token_dir))
    for _ in range(2):
        subprocess.run(
            [
                *("softhsm2-util", "--init-token", "--free", "--label", "twin"),
                *("--pin", "1234", "--so-pin", "5678", "--module", softhsm_token.module_path),
            ],
            env=dict(os.environ, SOFTHSM2_CONF=str(conf)),
            check=True,
            capture_output=True,
        )
    settings = dataclasses.replace(
        pkcs11_settings, token_label="twin", pin="1234", environment={"SOFTHSM2_CONF": str(conf)}
    )
    message = _startup_error(settings)
    assert "2 tokens match token 'twin'; set slot" in message


def test_second_configuration_for_a_loaded_module(
    key_manager: Pkcs11KeyManager, pkcs11_settings: Pkcs11Settings, tmp_path: Path
) -> None:
    other = {"SOFTHSM2_CONF": str(tmp_path / "other.conf")}
    message = _startup_error(dataclasses.replace(pkcs11_settings, environment=other))
    assert "different environment" in message
    key_manager.health_check()


def test_settings_repr_hides_the_pin(pkcs11_settings: Pkcs11Settings) -> None:
    assert pkcs11_settings.pin not in repr(pkcs11_settings)


# -------------------------------------------------------------- the error table


@pytest.mark.parametrize(
    ("operation", "rv", "expected"),
    [
        ("decrypt", Ckr.GENERAL_ERROR, InvalidCiphertextException),
        ("encrypt", Ckr.GENERAL_ERROR, InternalException),
        ("decrypt", Ckr.ENCRYPTED_DATA_INVALID, InvalidCiphertextException),
        ("decrypt", Ckr.ENCRYPTED_DATA_LEN_RANGE, InvalidCiphertextException),
        ("decrypt", Ckr.DATA_LEN_RANGE, InvalidCiphertextException),
        ("encrypt", Ckr.DATA_LEN_RANGE, UnsupportedOperationException),
        ("encrypt", Ckr.KEY_FUNCTION_NOT_PERMITTED, InvalidKeyUsageException),
        ("decrypt", Ckr.KEY_TYPE_INCONSISTENT, InvalidKeyUsageException),
        ("encrypt", 0x8000_0001, InternalException),  # vendor-defined
        ("encrypt", None, InternalException),
    ],
)
def test_error_table(operation: str, rv: int | None, expected: type[Exception]) -> None:
    assert type(xks_error_for(operation, rv)) is expected


@pytest.mark.parametrize(
    "rv",
    [
        Ckr.SESSION_HANDLE_INVALID,
        Ckr.SESSION_CLOSED,
        Ckr.DEVICE_ERROR,
        Ckr.DEVICE_REMOVED,
        Ckr.TOKEN_NOT_PRESENT,
        Ckr.USER_NOT_LOGGED_IN,
        Ckr.CRYPTOKI_NOT_INITIALIZED,
        Ckr.OBJECT_HANDLE_INVALID,
    ],
)
def test_session_and_device_failures_are_internal_never_key_not_found(rv: Ckr) -> None:
    for operation in ("describe", "encrypt", "decrypt"):
        error = xks_error_for(operation, rv)
        assert type(error) is InternalException
        assert f"CKR_{rv.name}" in error.error_message
    assert CKR_TO_XKS_ERROR[rv] is InternalException


def test_return_value_recovered_from_python_pkcs11_errors() -> None:
    assert return_value_of(pkcs11.exceptions.GeneralError()) == Ckr.GENERAL_ERROR
    assert return_value_of(pkcs11.exceptions.SessionHandleInvalid()) == Ckr.SESSION_HANDLE_INVALID
    unmapped = pkcs11.exceptions.PKCS11Error("Unmapped error code 0x68")
    assert return_value_of(unmapped) == Ckr.KEY_FUNCTION_NOT_PERMITTED
    assert return_value_of(pkcs11.exceptions.PKCS11Error("mystery")) is None
