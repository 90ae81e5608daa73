"""The AAD handed to the HSM (spec: Encrypt, ciphertextMetadata NOTE)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xks_proxy.protocol.aad import hsm_aad


def test_layout_with_both_fields() -> None:
    assert hsm_aad(b"abc", b"m1") == b"\x00\x03abc\x02m1"


def test_absent_fields_have_length_zero() -> None:
    assert hsm_aad(None, None) == b"\x00\x00\x00"
    assert hsm_aad(b"", None) == b"\x00\x00\x00"
    assert hsm_aad(None, b"m") == b"\x00\x00\x01m"


def test_moving_metadata_into_aad_changes_the_hsm_aad() -> None:
    """The spec's example attack: metadata passed back as AAD must not verify."""
    assert hsm_aad(None, b"key_version=1") != hsm_aad(b"key_version=1", None)


def test_aad_is_fed_raw_not_hashed() -> None:
    """The AWS sample hashes the AAD; the spec feeds it as is."""
    aad = b"x" * 40
    assert hsm_aad(aad, None)[2:42] == aad


def test_limits() -> None:
    assert len(hsm_aad(b"a" * 65535, b"m" * 20)) == 2 + 65535 + 1 + 20
    with pytest.raises(ValueError):
        hsm_aad(b"a" * 65536, None)
    with pytest.raises(ValueError):
        hsm_aad(None, b"m" * 21)


@given(
    st.binary(max_size=300), st.binary(max_size=20), st.binary(max_size=300), st.binary(max_size=20)
)
def test_injective(aad1: bytes, md1: bytes, aad2: bytes, md2: bytes) -> None:
    """Different (AAD, metadata) pairs never give the same HSM AAD."""
    if (aad1, md1) != (aad2, md2):
        assert hsm_aad(aad1, md1) != hsm_aad(aad2, md2)
