"""URI paths (spec: API operations)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xks_proxy.protocol.errors import InvalidUriPathException, ValidationException
from xks_proxy.protocol.models import XksOperation
from xks_proxy.protocol.routing import (
    normalize_uri_prefix,
    parse_path,
    uri_path_problem,
    validate_external_key_id,
)


@pytest.mark.parametrize(
    ("path", "prefix", "operation", "key"),
    [
        ("/kms/xks/v1/health", "", XksOperation.GET_HEALTH_STATUS, None),
        ("/a/b/kms/xks/v1/health", "/a/b", XksOperation.GET_HEALTH_STATUS, None),
        ("/p/kms/xks/v1/keys/foo/metadata", "/p", XksOperation.GET_KEY_METADATA, "foo"),
        ("/p/kms/xks/v1/keys/k.1-_/encrypt", "/p", XksOperation.ENCRYPT, "k.1-_"),
        ("/p/kms/xks/v1/keys/foo/decrypt", "/p", XksOperation.DECRYPT, "foo"),
        ("/kms/xks/v1/x/kms/xks/v1/health", "/kms/xks/v1/x", XksOperation.GET_HEALTH_STATUS, None),
    ],
)
def test_valid_paths(path: str, prefix: str, operation: XksOperation, key: str | None) -> None:
    route = parse_path(path)
    assert (route.uri_prefix, route.operation, route.external_key_id) == (prefix, operation, key)


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/kms/xks/v1",
        "/kms/xks/v1/",
        "/kms/xks/v1/health/",
        "/kms/xks/v2/health",
        "/p/kms/xks/v1/keys/foo",
        "/p/kms/xks/v1/keys/foo/sign",
        "/p/kms/xks/v1/keys/a/b/encrypt",
        "p/kms/xks/v1/health",
        "/p//q/kms/xks/v1/health",
        "/p/q//kms/xks/v1/health",
        "/p/kms/xks/v1/keys/../encrypt",
        "/p/kms/xks/v1/keys/./metadata",
    ],
)
def test_invalid_paths_are_invalid_uri_path(path: str) -> None:
    with pytest.raises(InvalidUriPathException):
        parse_path(path)


def test_external_key_id_rules() -> None:
    validate_external_key_id("a" * 128)
    validate_external_key_id("A-z.0_9")
    for bad in ("", "a" * 129, "a b", "a%20", "ключ", "a/b", "a+b"):
        with pytest.raises(ValidationException):
            validate_external_key_id(bad)


def test_prefix_normalization_and_problems() -> None:
    assert normalize_uri_prefix("") == ""
    assert normalize_uri_prefix("/a/b/") == "/a/b"
    assert normalize_uri_prefix("example/uri/path/prefix") == "/example/uri/path/prefix"
    assert uri_path_problem("example/uri/path/prefix") is None
    assert uri_path_problem("a.b") is not None
    assert uri_path_problem("a//b") is not None
    assert uri_path_problem("a" * 116) is None  # 1 + 116 + 11 = 128
    assert uri_path_problem("a" * 117) is not None


@given(st.text(max_size=60))
def test_parse_path_never_raises_anything_else(path: str) -> None:
    try:
        parse_path(path)
    except InvalidUriPathException:
        pass
