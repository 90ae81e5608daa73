"""Operator key tooling (create/list/show) against a real SoftHSMv2 token."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType, ObjectClass

from xks_proxy.keymanager.base import KeyDescription
from xks_proxy.keymanager.pkcs11 import (
    KeyManagerStartupError,
    Pkcs11KeyManager,
    Pkcs11Settings,
    open_admin_session,
)
from xks_proxy.keymanager.softhsm import (
    HEALTH_CHECK_KEY_LABEL,
    SoftHsmToken,
    provision_softhsm_token,
)
from xks_proxy.keymanager.tooling import (
    BAD_LABEL,
    EXTRACTABLE_WARNING,
    NO_LABEL,
    NOT_AES_256,
    KeyExistsError,
    KeyRow,
    KeyToolingError,
    create_health_check_key,
    create_key,
    format_key_table,
    list_keys,
    show_key,
)
from xks_proxy.protocol.errors import KeyNotFoundException

pytestmark = pytest.mark.hsm

TOKEN_LABEL = "xks-tooling"
PIN = "tooling-user-pin-4321"
SO_PIN = "tooling-so-pin-8765"
AAD = b"\x00\x00\x00"


@pytest.fixture(scope="module")
def tooling_token(softhsm_token: SoftHsmToken) -> SoftHsmToken:
    """A token of its own (keys made here must not leak into other tests), in the shared
    SoftHSM directory so the module's environment stays the same for the whole session."""
    return provision_softhsm_token(
        softhsm_token.conf_path.parent,
        token_label=TOKEN_LABEL,
        pin=PIN,
        so_pin=SO_PIN,
        keys=[],
        health_check_key_label=HEALTH_CHECK_KEY_LABEL,
        module_path=softhsm_token.module_path,
    )


@pytest.fixture
def settings(tooling_token: SoftHsmToken) -> Pkcs11Settings:
    return Pkcs11Settings(
        module_path=tooling_token.module_path,
        token_label=TOKEN_LABEL,
        slot=None,
        pin=PIN,
        health_check_key_label=HEALTH_CHECK_KEY_LABEL,
        sessions=1,
        environment=tooling_token.environment,
    )


@pytest.fixture
def key_manager(settings: Pkcs11Settings) -> Iterator[Pkcs11KeyManager]:
    manager = Pkcs11KeyManager.open(settings)
    try:
        yield manager
    finally:
        manager.close()


def _objects(settings: Pkcs11Settings, label: str) -> int:
    with open_admin_session(settings) as admin, admin.locked():
        template = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label}
        return len(list(admin.session.get_objects(template)))


# ---------------------------------------------------------------------------- create


@pytest.mark.parametrize(
    ("encrypt", "decrypt", "usages"),
    [
        (True, True, ("ENCRYPT", "DECRYPT")),
        (True, False, ("ENCRYPT",)),
        (False, True, ("DECRYPT",)),
        (False, False, ()),
    ],
)
def test_create_key_with_each_usage_combination(
    settings: Pkcs11Settings, encrypt: bool, decrypt: bool, usages: tuple[str, ...]
) -> None:
    label = f"created-{int(encrypt)}{int(decrypt)}"
    row = create_key(settings, label, encrypt=encrypt, decrypt=decrypt)
    assert row == KeyRow(
        label=label,
        key_type="AES",
        size_bits=256,
        usages=usages,
        sensitive=True,
        extractable=False,
        health_check=False,
    )
    assert row.xks_usable
    assert row.reason is None
    assert show_key(settings, label) == row
    manager = Pkcs11KeyManager.open(settings)
    try:
        assert manager.describe_key(label) == KeyDescription("AES_256", usages, enabled=True)
        if encrypt and decrypt:
            sealed = manager.encrypt(label, b"made by the tooling", AAD)
            opened = manager.decrypt(label, sealed.ciphertext, sealed.iv, sealed.tag, AAD)
            assert opened == b"made by the tooling"
    finally:
        manager.close()


def test_created_key_never_leaves_the_hsm(settings: Pkcs11Settings) -> None:
    create_key(settings, "locked-down", encrypt=True, decrypt=True)
    with open_admin_session(settings) as admin, admin.locked():
        key = admin.session.get_key(label="locked-down", object_class=ObjectClass.SECRET_KEY)
        expected = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.ALWAYS_SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.NEVER_EXTRACTABLE: True,
            Attribute.MODIFIABLE: False,
            Attribute.COPYABLE: False,
            Attribute.LOCAL: True,  # generated inside the HSM, never imported
            Attribute.ENCRYPT: True,
            Attribute.DECRYPT: True,
            Attribute.SIGN: False,
            Attribute.VERIFY: False,
            Attribute.WRAP: False,
            Attribute.UNWRAP: False,
            Attribute.DERIVE: False,
            Attribute.KEY_TYPE: KeyType.AES,
            Attribute.VALUE_LEN: 32,
        }
        assert {attribute: key[attribute] for attribute in expected} == expected
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            key[Attribute.VALUE]
        with pytest.raises(pkcs11.exceptions.PKCS11Error):
            key[Attribute.SIGN] = True  # CKA_MODIFIABLE false: usages are fixed for life
        assert key[Attribute.SIGN] is False


def test_an_existing_label_is_never_given_to_a_second_key(settings: Pkcs11Settings) -> None:
    first = create_key(settings, "only-once", encrypt=True, decrypt=True)
    with pytest.raises(KeyExistsError, match="'only-once' already exists"):
        create_key(settings, "only-once", encrypt=True, decrypt=False)
    with pytest.raises(KeyExistsError):
        create_health_check_key(settings, HEALTH_CHECK_KEY_LABEL)  # made by provisioning
    assert _objects(settings, "only-once") == 1
    assert _objects(settings, HEALTH_CHECK_KEY_LABEL) == 1
    assert show_key(settings, "only-once") == first  # not overwritten


@pytest.mark.parametrize(
    "label", ["", "x" * 129, "has space", "slash/key", ".", "..", "caf\u00e9", "new\nline"]
)
def test_invalid_external_key_ids_are_refused(settings: Pkcs11Settings, label: str) -> None:
    with pytest.raises(KeyToolingError, match="not a valid externalKeyId"):
        create_key(settings, label, encrypt=True, decrypt=True)
    if label:
        assert _objects(settings, label) == 0


def test_longest_valid_label(settings: Pkcs11Settings) -> None:
    label = "A-z0.9_" + "k" * 121
    assert len(label) == 128
    assert create_key(settings, label, encrypt=True, decrypt=True).xks_usable


def test_create_health_check_key(settings: Pkcs11Settings) -> None:
    row = create_health_check_key(settings, "fresh-health-key")
    assert row.usages == ("ENCRYPT", "DECRYPT")
    health_settings = dataclasses.replace(settings, health_check_key_label="fresh-health-key")
    manager = Pkcs11KeyManager.open(health_settings)  # refuses to start without the key
    try:
        manager.health_check()
    finally:
        manager.close()
    assert show_key(health_settings, "fresh-health-key").health_check


def test_wrong_pin_is_a_startup_error(settings: Pkcs11Settings) -> None:
    wrong = dataclasses.replace(settings, pin="not-the-pin-0000")
    with pytest.raises(KeyManagerStartupError, match="CKR_PIN_INCORRECT") as caught:
        list_keys(wrong)
    assert "not-the-pin-0000" not in str(caught.value)
    list_keys(settings)  # the failed login left nothing behind


# ------------------------------------------------------------------------ list, show


def _aes(session: Any, label: str | None, value: bytes, **flags: bool) -> None:
    template: dict[Attribute, Any] = {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.KEY_TYPE: KeyType.AES,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.VALUE: value,
        Attribute.ENCRYPT: True,
        Attribute.DECRYPT: True,
        Attribute.SIGN: False,
        Attribute.VERIFY: False,
        Attribute.WRAP: False,
        Attribute.UNWRAP: False,
    }
    if label is not None:
        template[Attribute.LABEL] = label
    template.update({Attribute[name.upper()]: value for name, value in flags.items()})
    session.create_object(template)


@pytest.fixture(scope="module")
def odd_keys(tooling_token: SoftHsmToken) -> None:
    """Keys the tooling would never make, created directly with python-pkcs11."""
    settings = Pkcs11Settings(
        module_path=tooling_token.module_path,
        token_label=TOKEN_LABEL,
        slot=None,
        pin=PIN,
        health_check_key_label=HEALTH_CHECK_KEY_LABEL,
        environment=tooling_token.environment,
    )
    with open_admin_session(settings) as admin, admin.locked():
        session = admin.session
        _aes(session, "odd-aes128", os.urandom(16))
        _aes(session, "odd-extractable", os.urandom(32), extractable=True)
        _aes(session, "odd-twice", os.urandom(32))
        _aes(session, "odd-twice", os.urandom(32))
        _aes(session, "odd bad label", os.urandom(32))
        _aes(session, None, os.urandom(32))
        session.create_object(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.LABEL: "odd-generic",
                Attribute.VALUE: os.urandom(32),
            }
        )
        session.generate_key(
            KeyType.DES3,
            label="odd-des3",
            store=True,
            template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
        )


@pytest.mark.usefixtures("odd_keys")
def test_list_explains_every_key(settings: Pkcs11Settings) -> None:
    rows = list_keys(settings)
    by_label: dict[str | None, list[KeyRow]] = {}
    for row in rows:
        by_label.setdefault(row.label, []).append(row)

    health = by_label[HEALTH_CHECK_KEY_LABEL][0]
    assert health.health_check and health.xks_usable

    aes128 = by_label["odd-aes128"][0]
    assert (aes128.key_type, aes128.size_bits, aes128.xks_usable) == ("AES", 128, False)
    assert aes128.problems == (f"{NOT_AES_256} (AES, 128 bits)",)

    generic = by_label["odd-generic"][0]
    assert (generic.key_type, generic.size_bits) == ("GENERIC_SECRET", 256)
    assert generic.problems[0].startswith(NOT_AES_256)

    des3 = by_label["odd-des3"][0]
    assert (des3.key_type, des3.size_bits, des3.xks_usable) == ("DES3", 192, False)

    extractable = by_label["odd-extractable"][0]
    assert extractable.xks_usable  # a warning, not a refusal
    assert extractable.extractable is True
    assert extractable.warnings == (EXTRACTABLE_WARNING,)
    assert extractable.reason == EXTRACTABLE_WARNING

    twins = by_label["odd-twice"]
    assert len(twins) == 2
    assert all(row.problems == ("duplicate label (2 keys)",) for row in twins)

    assert by_label["odd bad label"][0].problems == (BAD_LABEL,)
    unlabelled = by_label[None]
    assert unlabelled and all(row.problems == (NO_LABEL,) for row in unlabelled)
    assert rows[-1].label is None  # unlabelled keys last

    table = format_key_table(rows)
    assert table.splitlines()[0].split() == [
        *("LABEL", "TYPE", "BITS", "USAGE", "SENSITIVE", "EXTRACTABLE", "XKS", "NOTES")
    ]
    assert len(table.splitlines()) == len(rows) + 1
    assert "duplicate label (2 keys)" in table
    assert "health-check key" in table


@pytest.mark.usefixtures("odd_keys")
def test_show_key(settings: Pkcs11Settings) -> None:
    assert show_key(settings, "odd-twice").problems == ("duplicate label (2 keys)",)
    assert not show_key(settings, "odd-des3").xks_usable
    with pytest.raises(KeyNotFoundException):
        show_key(settings, "no-such-key")


def test_created_keys_agree_with_the_adapter(
    settings: Pkcs11Settings, key_manager: Pkcs11KeyManager
) -> None:
    # The adapter has the module open meanwhile: the tooling shares its module and login.
    row = create_key(settings, "while-serving", encrypt=False, decrypt=True)
    assert key_manager.describe_key("while-serving").key_usage == row.usages
    key_manager.health_check()


# ------------------------------------------------------------------------------ format


def test_format_key_table_escapes_labels() -> None:
    row = KeyRow(
        label="evil\x1b[2Jlabel",
        key_type="AES",
        size_bits=256,
        usages=("ENCRYPT",),
        sensitive=True,
        extractable=None,
        health_check=False,
        problems=(BAD_LABEL,),
    )
    table = format_key_table([row])
    assert "\x1b" not in table
    assert "evil\\x1b[2Jlabel" in table
    assert " NO " in table
    assert "?" in table  # unknown extractable flag
    assert format_key_table([]) == "no secret keys on the token"
