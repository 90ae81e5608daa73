"""Error shape (spec: Error codes)."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xks_proxy.protocol import errors
from xks_proxy.service import error_body

SPEC_TABLE = {
    "ValidationException": 400,
    "InvalidStateException": 400,
    "InvalidCiphertextException": 400,
    "InvalidKeyUsageException": 400,
    "AuthenticationFailedException": 401,
    "AccessDeniedException": 403,
    "KeyNotFoundException": 404,
    "InvalidUriPathException": 404,
    "ThrottlingException": 429,
    "UnsupportedOperationException": 501,
    "DependencyTimeoutException": 503,
    "InternalException": 500,
}


def test_every_row_of_the_spec_table_has_its_status() -> None:
    table = {cls.error_name: cls.status for cls in errors.ALL_ERRORS}
    assert table == SPEC_TABLE


@pytest.mark.parametrize("cls", errors.ALL_ERRORS)
def test_body_is_single_line_json_with_name_and_message(cls: type[errors.XksError]) -> None:
    body = error_body(cls())
    assert b"\n" not in body
    parsed = json.loads(body)
    assert parsed["errorName"] == cls.error_name
    assert 0 < len(parsed["errorMessage"]) < 512


@given(st.text(max_size=2000))
def test_messages_are_printable_ascii_under_512(message: str) -> None:
    error = errors.ValidationException(message)
    assert len(error.error_message) < 512
    assert all(0x20 <= ord(ch) <= 0x7E for ch in error.error_message)
