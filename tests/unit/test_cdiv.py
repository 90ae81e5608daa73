"""CDIV (spec: Appendix C) against the spec's own worked example."""

import base64
import hashlib

from hypothesis import given
from hypothesis import strategies as st

from xks_proxy.protocol.cdiv import ciphertext_data_integrity_value

AAD = b"project=nile,department=marketing"
METADATA = b"key_version=1"
IV = bytes.fromhex("1ccae5470f39700254779031")
CIPHERTEXT = bytes.fromhex("821c642b5b71783367deaf18")
TAG = bytes.fromhex("bc1c4dda7707d6812447c5955e99b261")


def test_spec_appendix_c_example() -> None:
    """The 86-byte example of Appendix C hashes to the published value."""
    assert len(AAD + METADATA + IV + CIPHERTEXT + TAG) == 86
    cdiv = ciphertext_data_integrity_value(AAD, METADATA, IV, CIPHERTEXT, TAG)
    assert cdiv.hex() == "a8703f2260bd8791ec2d15ea0b23e65a0631eedcf2a13a65cc82db3f47cf5ec7"
    assert base64.b64encode(cdiv).decode() == "qHA/ImC9h5HsLRXqCyPmWgYx7tzyoTplzILbP0fPXsc="


def test_spec_example_fields_match_the_encrypt_response_example() -> None:
    """The hex of Appendix C is the base64 of the Encrypt response example."""
    assert base64.b64encode(IV).decode() == "HMrlRw85cAJUd5Ax"
    assert base64.b64encode(CIPHERTEXT).decode() == "ghxkK1txeDNn3q8Y"
    assert base64.b64encode(TAG).decode() == "vBxN2ncH1oEkR8WVXpmyYQ=="
    assert base64.b64encode(METADATA).decode() == "a2V5X3ZlcnNpb249MQ=="


def test_absent_fields_count_as_empty() -> None:
    """Appendix C: a missing AAD or metadata is the empty string in the hash."""
    assert ciphertext_data_integrity_value(None, None, IV, CIPHERTEXT, TAG) == (
        hashlib.sha256(IV + CIPHERTEXT + TAG).digest()
    )
    assert ciphertext_data_integrity_value(AAD, None, IV, CIPHERTEXT, TAG) == (
        hashlib.sha256(AAD + IV + CIPHERTEXT + TAG).digest()
    )


@given(st.binary(), st.binary(max_size=20), st.binary(min_size=12, max_size=12), st.binary())
def test_order_is_aad_metadata_iv_ciphertext_tag(
    aad: bytes, metadata: bytes, iv: bytes, ciphertext: bytes
) -> None:
    expected = hashlib.sha256(aad + metadata + iv + ciphertext + TAG).digest()
    assert ciphertext_data_integrity_value(aad, metadata, iv, ciphertext, TAG) == expected
