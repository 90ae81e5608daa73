"""Shared fixtures: a provisioned SoftHSMv2 token and a key manager opened on it.

``softhsm_token`` (session scope) holds the demo keys (foo, encrypt_only_key,
decrypt_only_key, impotent_key) and the health-check key. ``key_manager`` (function
scope) is a fresh :class:`Pkcs11KeyManager` per test, closed afterwards.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence

import pytest

from xks_proxy.keymanager.pkcs11 import Pkcs11KeyManager, Pkcs11Settings
from xks_proxy.keymanager.softhsm import (
    DEMO_KEYS,
    HEALTH_CHECK_KEY_LABEL,
    KeySpec,
    SoftHsmToken,
    find_softhsm_module,
    provision_softhsm_token,
)

TEST_TOKEN_LABEL = "xks-test"
TEST_PIN = "test-user-pin-1234"
TEST_SO_PIN = "test-so-pin-5678"

AddSoftHsmKeys = Callable[[Sequence[KeySpec], Mapping[str, bytes] | None], None]


@pytest.fixture(scope="session")
def softhsm_token(tmp_path_factory: pytest.TempPathFactory) -> SoftHsmToken:
    """A SoftHSM token with DEMO_KEYS and the health-check key, in a temporary directory."""
    if find_softhsm_module() is None or shutil.which("softhsm2-util") is None:
        pytest.skip(
            "SoftHSMv2 is not installed (libsofthsm2.so and softhsm2-util); "
            "install it with: apt-get install softhsm2"
        )
    return provision_softhsm_token(
        tmp_path_factory.mktemp("softhsm"),
        token_label=TEST_TOKEN_LABEL,
        pin=TEST_PIN,
        so_pin=TEST_SO_PIN,
        keys=DEMO_KEYS,
        health_check_key_label=HEALTH_CHECK_KEY_LABEL,
    )


@pytest.fixture(scope="session")
def add_softhsm_keys(softhsm_token: SoftHsmToken) -> AddSoftHsmKeys:
    """Create more keys on ``softhsm_token`` (idempotent; existing labels are kept)."""

    def add(keys: Sequence[KeySpec], key_values: Mapping[str, bytes] | None = None) -> None:
        provision_softhsm_token(
            softhsm_token.conf_path.parent,
            token_label=softhsm_token.token_label,
            pin=softhsm_token.pin,
            so_pin=TEST_SO_PIN,
            keys=keys,
            health_check_key_label=HEALTH_CHECK_KEY_LABEL,
            key_values=key_values,
            module_path=softhsm_token.module_path,
        )

    return add


@pytest.fixture
def pkcs11_settings(softhsm_token: SoftHsmToken) -> Pkcs11Settings:
    """Settings that open ``softhsm_token`` with a pool of 4 sessions."""
    return Pkcs11Settings(
        module_path=softhsm_token.module_path,
        token_label=softhsm_token.token_label,
        slot=None,
        pin=softhsm_token.pin,
        health_check_key_label=HEALTH_CHECK_KEY_LABEL,
        sessions=4,
        environment=softhsm_token.environment,
    )


@pytest.fixture
def key_manager(pkcs11_settings: Pkcs11Settings) -> Iterator[Pkcs11KeyManager]:
    """An opened Pkcs11KeyManager on ``softhsm_token``; closed after the test."""
    manager = Pkcs11KeyManager.open(pkcs11_settings)
    try:
        yield manager
    finally:
        manager.close()
