"""Operator key tooling: create, list and show the AES keys on a PKCS#11 token.

Backs ``xks-proxy keys create|list|show``. Everything runs through
:func:`~xks_proxy.keymanager.pkcs11.open_admin_session`, so it shares the adapter's
module registry, module lock and login. These functions initialise the PKCS#11
library in the calling process: call them from the CLI process, never from a
process that forks workers afterwards.

Keys are created inside the HSM (C_GenerateKey) and can never leave it: sensitive,
not extractable, not modifiable, not copyable, usable for encrypt and/or decrypt
only. A label is never given to a second key, and no key is ever overwritten.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pkcs11 import Attribute, KeyType, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11_errors

from xks_proxy.keymanager.pkcs11 import (
    AES_256_KEY_BYTES,
    USAGE_ATTRIBUTES,
    AdminSession,
    Ckr,
    Pkcs11Settings,
    ckr_name,
    open_admin_session,
    return_value_of,
)
from xks_proxy.protocol.errors import KeyNotFoundException, XksError
from xks_proxy.protocol.routing import EXTERNAL_KEY_ID_RE

log = logging.getLogger("xks_proxy.keys")

AES_256_BITS = AES_256_KEY_BYTES * 8


# Key sizes implied by the type where CKA_VALUE_LEN is not defined.
_FIXED_KEY_BITS: dict[KeyType, int] = {KeyType.DES2: 128, KeyType.DES3: 192}

# Reasons a key cannot serve XKS (KeyRow.problems) and cautions (KeyRow.warnings).
NOT_AES_256 = "not AES-256"
NO_LABEL = "no label"
BAD_LABEL = "label not a valid externalKeyId"
EXTRACTABLE_WARNING = "extractable: key material could leave the HSM"
NOT_SENSITIVE_WARNING = "not sensitive: key material could be read from the HSM"
HEALTH_KEY_USAGE = "health-check key must allow encrypt and decrypt"


class KeyToolingError(Exception):
    """The tooling refused or the HSM failed; the message is for the operator."""


class KeyExistsError(KeyToolingError):
    """A key with this label is already on the token."""


@dataclass(frozen=True, slots=True)
class KeyRow:
    """One secret key on the token, as the operator sees it."""

    label: str | None  # None: no CKA_LABEL (or an empty one, or not UTF-8)
    key_type: str  # "AES", "GENERIC_SECRET", ... or "unknown"
    size_bits: int | None  # None when the HSM does not tell
    usages: tuple[str, ...]  # in USAGE_ORDER
    sensitive: bool | None  # None when the HSM does not tell
    extractable: bool | None
    health_check: bool  # the label is the configured health-check key's
    problems: tuple[str, ...] = ()  # why XKS cannot use the key; empty when it can
    warnings: tuple[str, ...] = ()  # usable, but worth the operator's attention

    @property
    def xks_usable(self) -> bool:
        """True when the proxy can serve this key as an external key."""
        return not self.problems

    @property
    def reason(self) -> str | None:
        """Problems, then warnings, joined with "; "; None when there is nothing to say."""
        return "; ".join((*self.problems, *self.warnings)) or None


def is_valid_external_key_id(label: str) -> bool:
    """1-128 of A-Z a-z 0-9 . - _ and routable (the router refuses "." and "..")."""
    return EXTERNAL_KEY_ID_RE.fullmatch(label) is not None and label not in (".", "..")


# ------------------------------------------------------------------------------ commands


def create_key(settings: Pkcs11Settings, label: str, *, encrypt: bool, decrypt: bool) -> KeyRow:
    """Generate an AES-256 key labelled ``label`` inside the HSM; return its row.

    KeyToolingError for an invalid label or a refusal of the HSM, KeyExistsError if a
    secret key already carries the label, KeyManagerStartupError if the token cannot
    be opened.
    """
    if not is_valid_external_key_id(label):
        raise KeyToolingError(
            f"{label!r} is not a valid externalKeyId: use 1-128 characters of A-Z a-z 0-9 . - _"
        )
    with _admin(settings) as admin:
        with admin.locked():
            existing = _secret_keys(admin, label)
        if existing:
            raise KeyExistsError(
                f"a secret key labelled {label!r} already exists on token "
                f"{admin.token_label!r}; refusing to create another"
            )
        with admin.locked():
            key = _generate(admin, label, encrypt=encrypt, decrypt=decrypt)
            # Another process may have created the same label meanwhile: never leave two.
            twins = _secret_keys(admin, label)
            if len(twins) > 1:
                _destroy_quietly(key)
                raise KeyExistsError(
                    f"another secret key labelled {label!r} appeared while creating it; "
                    "the new key was destroyed"
                )
            row = _describe(key, settings, duplicates=1)
    log.info(
        "created AES-256 key %r on token %r: usages=%s",
        label,
        admin.token_label,
        ",".join(row.usages) or "none",
    )
    return row


def create_health_check_key(settings: Pkcs11Settings, label: str) -> KeyRow:
    """Create the dedicated health-check key (encrypt and decrypt, never a customer key)."""
    return create_key(settings, label, encrypt=True, decrypt=True)


def list_keys(settings: Pkcs11Settings) -> list[KeyRow]:
    """Every secret key on the token, by label (unlabelled keys last)."""
    with _admin(settings) as admin, admin.locked():
        keys = _secret_keys(admin, None)
        labels = [_label_of(key) for key in keys]
        counts: dict[str, int] = {}
        for label in labels:
            if label is not None:
                counts[label] = counts.get(label, 0) + 1
        rows = [
            _describe(key, settings, duplicates=counts.get(label, 1) if label else 1, label=label)
            for key, label in zip(keys, labels, strict=True)
        ]
    return sorted(rows, key=lambda row: (row.label is None, row.label or ""))


def show_key(settings: Pkcs11Settings, label: str) -> KeyRow:
    """The key labelled ``label``; KeyNotFoundException if there is none. With duplicate
    labels the first one is returned, its problems naming the duplication."""
    with _admin(settings) as admin, admin.locked():
        keys = _secret_keys(admin, label)
        if not keys:
            raise KeyNotFoundException(f"no secret key labelled {label!r} on the token")
        return _describe(keys[0], settings, duplicates=len(keys))


def format_key_table(rows: Sequence[KeyRow]) -> str:
    """A plain-text table for the terminal (labels escaped: they come from the HSM)."""
    if not rows:
        return "no secret keys on the token"
    header = ("LABEL", "TYPE", "BITS", "USAGE", "SENSITIVE", "EXTRACTABLE", "XKS", "NOTES")
    lines = [header]
    for row in rows:
        notes = row.reason or ""
        if row.health_check:
            notes = "health-check key" + (f"; {notes}" if notes else "")
        lines.append(
            (
                _printable(row.label) if row.label is not None else "(none)",
                row.key_type,
                str(row.size_bits) if row.size_bits is not None else "?",
                ",".join(row.usages) or "-",
                _yes_no(row.sensitive),
                _yes_no(row.extractable),
                "yes" if row.xks_usable else "NO",
                notes,
            )
        )
    widths = [max(len(line[column]) for line in lines) for column in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False))
        + "  "
        + line[-1]
        for line in lines
    ).rstrip()


# ------------------------------------------------------------------------------ internals


@contextmanager
def _admin(settings: Pkcs11Settings) -> Iterator[AdminSession]:
    """The admin session, turning HSM errors met inside into KeyToolingError."""
    with open_admin_session(settings) as admin:
        try:
            yield admin
        except p11_errors.PKCS11Error as exc:
            raise KeyToolingError(f"the HSM refused: {ckr_name(return_value_of(exc))}") from None
        except XksError as exc:
            if isinstance(exc, KeyNotFoundException):
                raise
            raise KeyToolingError(exc.error_message) from None


def _secret_keys(admin: AdminSession, label: str | None) -> list[Any]:
    """Secret keys on the token, all or those labelled ``label``; module lock held."""
    template: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.SECRET_KEY}
    if label is not None:
        template[Attribute.LABEL] = label
    try:
        return list(admin.session.get_objects(template))
    except p11_errors.PKCS11Error as exc:
        # Drop the traceback now: it keeps python-pkcs11's search context alive, whose
        # __del__ would call C_FindObjectsFinal later, outside the module lock.
        bare = type(exc)(*exc.args)
    raise bare


def _generate(admin: AdminSession, label: str, *, encrypt: bool, decrypt: bool) -> Any:
    """C_GenerateKey for AES-256 with the safe template; module lock held."""
    template: dict[Attribute, Any] = {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.MODIFIABLE: False,
        Attribute.COPYABLE: False,
        Attribute.ENCRYPT: encrypt,
        Attribute.DECRYPT: decrypt,
        Attribute.SIGN: False,
        Attribute.VERIFY: False,
        Attribute.WRAP: False,
        Attribute.UNWRAP: False,
        Attribute.DERIVE: False,
    }
    try:
        return _generate_with(admin, label, template)
    except p11_errors.AttributeTypeInvalid:
        # CKA_COPYABLE is PKCS#11 v2.40; an older HSM does not know it (nor copies keys).
        del template[Attribute.COPYABLE]
        return _generate_with(admin, label, template)


def _generate_with(admin: AdminSession, label: str, template: dict[Attribute, Any]) -> Any:
    try:
        return admin.session.generate_key(
            KeyType.AES,
            AES_256_BITS,
            label=label,
            store=True,
            capabilities=MechanismFlag(0),
            template=template,
        )
    except p11_errors.AttributeTypeInvalid:
        raise
    except p11_errors.PKCS11Error as exc:
        rv = return_value_of(exc)
        hint = " (the session may not be read-write)" if rv == Ckr.ARGUMENTS_BAD else ""
        raise KeyToolingError(
            f"the HSM refused to generate the key: {ckr_name(rv)}{hint}"
        ) from None


def _destroy_quietly(key: Any) -> None:
    try:
        key.destroy()
    except p11_errors.PKCS11Error as exc:
        log.error("could not destroy a duplicate key: %s", ckr_name(return_value_of(exc)))


def _describe(
    key: Any,
    settings: Pkcs11Settings,
    *,
    duplicates: int,
    label: str | None = None,
) -> KeyRow:
    """One key's row from its attributes; module lock held."""
    if label is None:
        label = _label_of(key)
    raw_type = _read(key, Attribute.KEY_TYPE)
    key_type = raw_type.name.lstrip("_") if isinstance(raw_type, KeyType) else "unknown"
    value_len = _read(key, Attribute.VALUE_LEN)
    size_bits: int | None
    if isinstance(value_len, int):
        size_bits = value_len * 8
    elif isinstance(raw_type, KeyType):
        size_bits = _FIXED_KEY_BITS.get(raw_type)
    else:
        size_bits = None
    usages = tuple(name for name, attribute in USAGE_ATTRIBUTES if _read(key, attribute) is True)
    sensitive = _flag(_read(key, Attribute.SENSITIVE))
    extractable = _flag(_read(key, Attribute.EXTRACTABLE))
    health_check = label is not None and label == settings.health_check_key_label

    problems: list[str] = []
    warnings: list[str] = []
    if raw_type != KeyType.AES or size_bits != AES_256_BITS:
        size = f"{size_bits} bits" if size_bits is not None else "size unknown"
        problems.append(f"{NOT_AES_256} ({key_type}, {size})")
    if label is None:
        problems.append(NO_LABEL)
    elif not is_valid_external_key_id(label):
        problems.append(BAD_LABEL)
    if duplicates > 1:
        problems.append(f"duplicate label ({duplicates} keys)")
    if health_check and not {"ENCRYPT", "DECRYPT"} <= set(usages):
        problems.append(HEALTH_KEY_USAGE)
    if extractable is not False:
        warnings.append(EXTRACTABLE_WARNING if extractable else "extractable: unknown")
    if sensitive is not True:
        warnings.append(NOT_SENSITIVE_WARNING if sensitive is False else "sensitive: unknown")
    return KeyRow(
        label=label,
        key_type=key_type,
        size_bits=size_bits,
        usages=usages,
        sensitive=sensitive,
        extractable=extractable,
        health_check=health_check,
        problems=tuple(problems),
        warnings=tuple(warnings),
    )


def _label_of(key: Any) -> str | None:
    label = _read(key, Attribute.LABEL)
    return label if isinstance(label, str) and label else None


def _read(key: Any, attribute: Attribute) -> Any:
    """One attribute, or None when the HSM will not tell (sensitive, undefined, or a
    value python-pkcs11 cannot decode, such as a vendor key type or non-UTF-8 label)."""
    try:
        return key[attribute]
    except (p11_errors.AttributeSensitive, p11_errors.AttributeTypeInvalid):
        return None
    except (ValueError, UnicodeDecodeError):
        return None


def _flag(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _yes_no(value: bool | None) -> str:
    return "?" if value is None else ("yes" if value else "no")


def _printable(text: str) -> str:
    """Escape what a terminal would interpret (labels are whatever the HSM holds)."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
