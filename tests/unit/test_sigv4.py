"""Tests for the SigV4 verifier (spec Appendix A: Using SigV4 to sign XKS proxy requests).

Requests are signed by independent implementations (botocore's SigV4Auth, curl's
--aws-sigv4, AWS's published test-suite vectors and a vector worked out by hand
below) and fed to ``verify_request`` the way the ASGI server will: lower-case
header names as bytes, the raw path, the exact body.
"""

from __future__ import annotations

import calendar
import datetime
import hashlib
import hmac
import http.server
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import botocore.auth
import pytest
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xks_proxy.protocol.errors import AuthenticationFailedException
from xks_proxy.sigv4 import (
    MAX_CLOCK_SKEW_SECONDS,
    SERVICE,
    SigV4Identity,
    _canonical_query,
    _canonical_uri,
    verify_request,
)

# The defaults of the official compliance client (aws-kms-xksproxy-test-client).
AKID = "BETWEEN2TENAND3TENCHARACTERS"
SECRET = "PleaseReplaceThisWithSomeSecretOfLength43To64"
OTHER_AKID = "ANOTHERACCESSKEYID234567"
OTHER_SECRET = "bm90LXRoZS1zYW1lLXNlY3JldC1hdC1hbGwtMzItYnl0ZXM="
SECRETS = {AKID: SECRET, OTHER_AKID: OTHER_SECRET}

REGION = "us-east-1"
HOST = "xks.example.com"
PATH = "/example/uri/path/prefix/kms/xks/v1/keys/foo/encrypt"
URL = f"https://{HOST}{PATH}"
BODY = (
    b'{"requestMetadata":{"kmsRequestId":"4112f4d6-db54-4af4-ae30-c55a22a8dfae",'
    b'"kmsOperation":"Encrypt","awsPrincipalArn":"arn:aws:iam::123456789012:user/Alice",'
    b'"kmsKeyArn":"arn:aws:kms:us-east-1:123456789012:key/a1b2c3d4"},'
    b'"plaintext":"SGVsbG8gV29ybGQh","encryptionAlgorithm":"AES_GCM"}'
)
SIGNED_AT = datetime.datetime(2024, 5, 1, 12, 0, 0)  # naive UTC, as botocore uses
NOW = calendar.timegm(SIGNED_AT.timetuple())

Headers = list[tuple[bytes, bytes]]


# --------------------------------------------------------------------------- helpers


def botocore_sign(
    url: str = URL,
    body: bytes = BODY,
    headers: Sequence[tuple[str, str]] = (("Content-Type", "application/json"),),
    *,
    akid: str = AKID,
    secret: str = SECRET,
    when: datetime.datetime = SIGNED_AT,
    region: str = REGION,
    service: str = SERVICE,
) -> Headers:
    """Sign with botocore's SigV4Auth and return ASGI-style raw headers.

    botocore >= 1.3x reads the clock through ``botocore.auth.get_current_datetime``
    (patching ``botocore.auth.datetime`` no longer has any effect), and it always
    overwrites X-Amz-Date, so the clock is what we freeze.
    """
    request = AWSRequest(method="POST", url=url, data=body)
    for name, value in headers:
        request.headers[name] = value  # HTTPHeaders appends: repeats are kept
    with mock.patch.object(botocore.auth, "get_current_datetime", return_value=when):
        botocore.auth.SigV4Auth(Credentials(akid, secret), service, region).add_auth(request)
    out = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()]
    if not any(name == b"host" for name, _ in out):
        # botocore signs the URL's host; an HTTP client sends it as the Host header.
        out.insert(0, (b"host", urlsplit(url).netloc.encode("ascii")))
    return out


def verify(
    headers: Sequence[tuple[bytes, bytes]],
    *,
    body: bytes = BODY,
    raw_path: bytes = PATH.encode(),
    query_string: bytes = b"",
    method: str = "POST",
    now: float = NOW,
    secrets: dict[str, str] | None = None,
    service: str = SERVICE,
) -> SigV4Identity:
    return verify_request(
        method=method,
        raw_path=raw_path,
        query_string=query_string,
        headers=headers,
        body=body,
        lookup_secret=(SECRETS if secrets is None else secrets).get,
        now=now,
        service=service,
    )


def get_header(headers: Headers, name: bytes) -> bytes:
    values = [v for n, v in headers if n == name]
    assert len(values) == 1
    return values[0]


def replace_header(headers: Headers, name: bytes, value: bytes) -> Headers:
    return [(n, value if n == name else v) for n, v in headers]


def drop_header(headers: Headers, name: bytes) -> Headers:
    return [(n, v) for n, v in headers if n != name]


def with_authorization(headers: Headers, authorization: bytes | str) -> Headers:
    value = authorization.encode("latin-1") if isinstance(authorization, str) else authorization
    return replace_header(headers, b"authorization", value)


def auth_parts(headers: Headers) -> dict[str, str]:
    """Credential / SignedHeaders / Signature of a botocore Authorization header."""
    value = get_header(headers, b"authorization").decode()
    _, rest = value.split(" ", 1)
    return dict(part.strip().split("=", 1) for part in rest.split(","))


def build_authorization(
    credential: str, signed_headers: str, signature: str, *, algorithm: str = "AWS4-HMAC-SHA256"
) -> str:
    return (
        f"{algorithm} Credential={credential}, SignedHeaders={signed_headers}, "
        f"Signature={signature}"
    )


def assert_fails(headers: Sequence[tuple[bytes, bytes]], match: str, **kwargs: Any) -> None:
    with pytest.raises(AuthenticationFailedException) as info:
        verify(headers, **kwargs)
    assert_safe_message(info.value)
    assert re.search(match, info.value.error_message), info.value.error_message


def assert_safe_message(error: AuthenticationFailedException) -> None:
    """Spec "Error codes": printable ASCII, < 512 chars; and no secret or signature."""
    message = error.error_message
    assert len(message) < 512
    assert all(" " <= ch <= "~" for ch in message)
    assert SECRET not in message and OTHER_SECRET not in message
    assert not re.search(r"[0-9a-f]{64}", message)
    assert error.status == 401
    assert error.error_name == "AuthenticationFailedException"


# --------------------------------------------------------------------------- positive


def test_botocore_signed_request_verifies() -> None:
    """spec Appendix A: a request signed like KMS signs it (host;x-amz-date) verifies."""
    headers = botocore_sign(headers=())
    assert auth_parts(headers)["SignedHeaders"] == "host;x-amz-date"
    identity = verify(headers)
    assert identity == SigV4Identity(access_key_id=AKID, region=REGION, signed_at=NOW)


def test_identity_carries_region_from_scope_and_has_no_secret_in_repr() -> None:
    """spec Appendix A: the region is taken from the credential scope."""
    headers = botocore_sign(region="eu-west-2", akid=OTHER_AKID, secret=OTHER_SECRET)
    identity = verify(headers)
    assert identity.region == "eu-west-2"
    assert identity.access_key_id == OTHER_AKID
    assert OTHER_SECRET not in repr(identity)


def test_content_type_signed() -> None:
    """spec Appendix A: whatever SignedHeaders lists is verified, content-type included."""
    headers = botocore_sign()
    assert auth_parts(headers)["SignedHeaders"] == "content-type;host;x-amz-date"
    verify(headers)


def test_extra_signed_headers() -> None:
    """spec Appendix A: CanonicalHeaders include every header in SignedHeaders."""
    headers = botocore_sign(
        headers=[
            ("Content-Type", "application/json"),
            ("Accept", "*/*"),
            ("X-Amz-Meta-Tenant", "blue"),
            ("Content-Length", str(len(BODY))),
        ]
    )
    assert (
        auth_parts(headers)["SignedHeaders"]
        == "accept;content-length;content-type;host;x-amz-date;x-amz-meta-tenant"
    )
    verify(headers)


def test_header_values_with_odd_whitespace() -> None:
    """spec Appendix A: canonical values are trimmed and inner space runs folded."""
    headers = botocore_sign(
        headers=[
            ("Content-Type", "  application/json  "),
            ("X-Spaced", "a    b  \t c"),
            ("X-Quoted", '"a   b   c"'),
        ]
    )
    verify(headers)
    # The same request with the whitespace an HTTP server would strip removed.
    stripped = [(n, v.strip()) for n, v in headers]
    verify(stripped)
    # Folding makes "a b c" equivalent to "a    b  \t c", as AWS defines it.
    verify(replace_header(headers, b"x-spaced", b"a b c"))


def test_repeated_header_values_are_joined_in_order() -> None:
    """spec Appendix A: repeated headers canonicalise as their values joined by ','."""
    headers = botocore_sign(
        headers=[
            ("Content-Type", "application/json"),
            ("X-Multi", "first"),
            ("X-Multi", "  second   value "),
            ("X-Multi", "third"),
        ]
    )
    assert sum(1 for n, _ in headers if n == b"x-multi") == 3
    verify(headers)
    # Order of repeated values matters.
    multi = [v for n, v in headers if n == b"x-multi"]
    others = [(n, v) for n, v in headers if n != b"x-multi"]
    reordered = others + [(b"x-multi", v) for v in reversed(multi)]
    assert_fails(reordered, "^signature does not match$")


def test_unsigned_headers_are_ignored() -> None:
    """spec Appendix A: only SignedHeaders enter the signature; proxies may add others."""
    headers = botocore_sign(headers=[("Content-Type", "application/json"), ("User-Agent", "x")])
    assert "user-agent" not in auth_parts(headers)["SignedHeaders"]  # botocore skips it
    verify([*headers, (b"x-forwarded-for", b"10.0.0.1"), (b"user-agent", b"other")])


def test_authorization_component_order_and_whitespace_are_tolerated() -> None:
    """spec Appendix A: the Authorization components may come in any order, any spacing."""
    headers = botocore_sign()
    p = auth_parts(headers)
    cred, sh, sig = p["Credential"], p["SignedHeaders"], p["Signature"]
    for value in (
        f"AWS4-HMAC-SHA256 Credential={cred},SignedHeaders={sh},Signature={sig}",
        f"AWS4-HMAC-SHA256 Signature={sig}, Credential={cred}, SignedHeaders={sh}",
        f"AWS4-HMAC-SHA256 SignedHeaders={sh} ,Signature={sig} ,  Credential={cred}",
        f"AWS4-HMAC-SHA256   Credential={cred}  ,  SignedHeaders={sh}  ,  Signature={sig}  ",
        f"  AWS4-HMAC-SHA256 Credential={cred}, SignedHeaders={sh}, Signature={sig}",
    ):
        verify(with_authorization(headers, value))


def test_empty_body() -> None:
    """spec Appendix A: the payload hash of an empty body is SHA-256 of b''."""
    headers = botocore_sign(body=b"")
    verify(headers, body=b"")
    assert_fails(headers, "^signature does not match$", body=b"{}")


def test_query_string_is_canonicalised() -> None:
    """spec Appendix A: CanonicalQueryString (empty for XKS) is sorted and encoded."""
    headers = botocore_sign(url=URL + "?b=2&a=1&a=0&c=x%2Fy&d")
    verify(headers, query_string=b"b=2&a=1&a=0&c=x%2Fy&d")
    assert_fails(headers, "^signature does not match$", query_string=b"b=2&a=1&a=0")
    assert_fails(headers, "^signature does not match$", query_string=b"")


def test_unnormalised_and_encoded_paths_match_botocore() -> None:
    """spec Appendix A: CanonicalURI as AWS computes it for non-S3 services (botocore)."""
    for path in (
        "/",
        "/prefix//kms/xks/v1/health",
        "/prefix/./kms/xks/v1/keys/./foo/encrypt",
        "/prefix/x/../kms/xks/v1/keys/foo/encrypt/",
        "/prefix/kms/xks/v1/keys/a%20b/encrypt",
        "/prefix/kms/xks/v1/keys/a~b/encrypt",
        "/prefix/kms/xks/v1/keys/a%2Fb/encrypt",
    ):
        headers = botocore_sign(url=f"https://{HOST}{path}")
        verify(headers, raw_path=path.encode())


def test_curl_style_content_type_without_space() -> None:
    """spec Appendix A: curl sends 'Content-Type:application/json' and signs it."""
    headers = botocore_sign(headers=[("Content-Type", "application/json")])
    verify(replace_header(headers, b"content-type", b"application/json"))


def test_signed_x_amz_content_sha256_must_match_body() -> None:
    """spec Appendix A: the payload hash is SHA-256 of the exact body bytes."""
    good = hashlib.sha256(BODY).hexdigest()
    headers = botocore_sign(headers=[("X-Amz-Content-SHA256", good)])
    verify(headers)
    unsigned = botocore_sign(headers=[("X-Amz-Content-SHA256", "UNSIGNED-PAYLOAD")])
    assert_fails(unsigned, "^X-Amz-Content-SHA256 does not match the payload$")


def test_secret_rotation_takes_effect_without_restart() -> None:
    """spec Appendix A: the access key id picks the secret; a changed secret is used."""
    headers = botocore_sign()
    verify(headers)  # warms the signing-key cache with SECRET
    assert_fails(headers, "^signature does not match$", secrets={AKID: OTHER_SECRET})
    verify(botocore_sign(secret=OTHER_SECRET), secrets={AKID: OTHER_SECRET})


def test_two_live_credentials() -> None:
    """spec Appendix A (SHOULD): more than one credential can be live at once."""
    assert verify(botocore_sign()).access_key_id == AKID
    other = botocore_sign(akid=OTHER_AKID, secret=OTHER_SECRET)
    assert verify(other).access_key_id == OTHER_AKID


def test_concurrent_verification_shares_caches_safely() -> None:
    """spec Appendix A: verification is stateless apart from bounded, shared caches."""
    requests = [
        (botocore_sign(body=BODY + bytes([i])), BODY + bytes([i]), AKID) for i in range(4)
    ] + [
        (
            botocore_sign(akid=OTHER_AKID, secret=OTHER_SECRET, region="eu-west-1"),
            BODY,
            OTHER_AKID,
        )
    ]
    failures: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(200):
                for headers, body, akid in requests:
                    assert verify(headers, body=body).access_key_id == akid
                    with pytest.raises(AuthenticationFailedException):
                        verify(headers, body=body + b"!")
        except BaseException as error:  # surfaced below
            failures.append(error)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


@pytest.mark.parametrize("offset", [-299, -300, 0, 299, 300])
def test_clock_skew_within_five_minutes_is_accepted(offset: int) -> None:
    """spec Appendix A: requests up to 5 minutes in the past or future are accepted."""
    verify(botocore_sign(), now=NOW + offset)


@pytest.mark.parametrize("offset", [-301, 301, -86400, 86400])
def test_clock_skew_beyond_five_minutes_is_rejected(offset: int) -> None:
    """spec Appendix A: more than 5 minutes in the past (or future) fails authentication."""
    assert_fails(
        botocore_sign(),
        "^request time is more than 5 minutes from the server time$",
        now=NOW + offset,
    )


def test_custom_max_skew() -> None:
    """spec Appendix A: the freshness window is a parameter (default 5 minutes)."""
    headers = botocore_sign()
    verify_request(
        method="POST",
        raw_path=PATH.encode(),
        query_string=b"",
        headers=headers,
        body=BODY,
        lookup_secret=SECRETS.get,
        now=NOW + 30,
        max_skew=30,
    )
    with pytest.raises(AuthenticationFailedException, match="more than 30 seconds"):
        verify_request(
            method="POST",
            raw_path=PATH.encode(),
            query_string=b"",
            headers=headers,
            body=BODY,
            lookup_secret=SECRETS.get,
            now=NOW + 31,
            max_skew=30,
        )
    assert MAX_CLOCK_SKEW_SECONDS == 300


@pytest.mark.parametrize(
    "when",
    [
        datetime.datetime(2024, 2, 29, 23, 59, 59),
        datetime.datetime(2023, 12, 31, 23, 59, 59),
        datetime.datetime(2000, 1, 1, 0, 0, 0),
        datetime.datetime(2100, 3, 1, 0, 0, 0),
    ],
)
def test_signed_at_matches_calendar_timegm(when: datetime.datetime) -> None:
    """spec Appendix A: X-Amz-Date is a UTC timestamp YYYYMMDD'T'HHMMSS'Z'."""
    expected = calendar.timegm(when.timetuple())
    identity = verify(botocore_sign(when=when), now=expected)
    assert identity.signed_at == expected


def test_lookup_is_called_with_the_access_key_id_only_after_parsing() -> None:
    """spec Appendix A: the access key id in the Credential selects the secret."""
    calls: list[str] = []

    def lookup(akid: str) -> str | None:
        calls.append(akid)
        return SECRETS.get(akid)

    headers = botocore_sign()
    verify_request(
        method="POST",
        raw_path=PATH.encode(),
        query_string=b"",
        headers=headers,
        body=BODY,
        lookup_secret=lookup,
        now=NOW,
    )
    assert calls == [AKID]
    # A stale request is refused before any secret is looked up.
    with pytest.raises(AuthenticationFailedException):
        verify_request(
            method="POST",
            raw_path=PATH.encode(),
            query_string=b"",
            headers=headers,
            body=BODY,
            lookup_secret=lookup,
            now=NOW + 3600,
        )
    assert calls == [AKID]


# --------------------------------------------------------------------------- fixed vectors

# Worked by hand from the algorithm in spec Appendix A (AWS General Reference
# "Create a canonical request" / "string to sign" / "calculate the signature"),
# independent of botocore: if canonicalisation regresses, these constants catch it.
HAND_AMZ_DATE = "20240501T120000Z"
HAND_CANONICAL_REQUEST = (
    "POST\n"
    "/example/uri/path/prefix/kms/xks/v1/keys/foo/encrypt\n"
    "\n"
    "content-type:application/json\n"
    "host:xks.example.com\n"
    "x-amz-date:20240501T120000Z\n"
    "\n"
    "content-type;host;x-amz-date\n"
    "3c438e1b8bb574f08567978541a25bfb25fc9d92f46e2a0f3823bd0b75b5bb0e"
)
HAND_BODY_SHA256 = "3c438e1b8bb574f08567978541a25bfb25fc9d92f46e2a0f3823bd0b75b5bb0e"
HAND_CANONICAL_REQUEST_SHA256 = "6f5bfc6aa41d1b3a98b91b8d50040852273f2f4787ca52107bc98c3e01aa9437"
HAND_SIGNING_KEY = "7346bb2aa5bdc812303a39031534264863d93116f730583b47eaca6a91cbf27f"
HAND_SIGNATURE = "1bfeccb93602b8f235b2b0295a101f9a03c8107c45e15ab7ab081d9b88c152e2"


def hand_headers(content_type: bytes = b"application/json") -> Headers:
    return [
        (b"host", HOST.encode()),
        (b"content-type", content_type),
        (b"content-length", str(len(BODY)).encode()),
        (b"x-amz-date", HAND_AMZ_DATE.encode()),
        (
            b"authorization",
            build_authorization(
                f"{AKID}/20240501/us-east-1/kms-xks-proxy/aws4_request",
                "content-type;host;x-amz-date",
                HAND_SIGNATURE,
            ).encode(),
        ),
    ]


def test_hand_computed_vector_steps() -> None:
    """spec Appendix A Tasks 1-3, step by step with hashlib/hmac only."""
    assert hashlib.sha256(BODY).hexdigest() == HAND_BODY_SHA256
    assert hashlib.sha256(HAND_CANONICAL_REQUEST.encode()).hexdigest() == (
        HAND_CANONICAL_REQUEST_SHA256
    )
    key = ("AWS4" + SECRET).encode()
    for part in ("20240501", "us-east-1", "kms-xks-proxy", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    assert key.hex() == HAND_SIGNING_KEY
    string_to_sign = (
        "AWS4-HMAC-SHA256\n"
        f"{HAND_AMZ_DATE}\n"
        "20240501/us-east-1/kms-xks-proxy/aws4_request\n"
        f"{HAND_CANONICAL_REQUEST_SHA256}"
    )
    assert hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest() == HAND_SIGNATURE


def test_hand_computed_vector_verifies() -> None:
    """spec Appendix A Task 4: the verifier accepts the hand-computed signature."""
    identity = verify(hand_headers())
    assert identity == SigV4Identity(AKID, REGION, NOW)
    # Raw values as curl or a sloppy client might send them canonicalise the same.
    verify(hand_headers(b"  application/json "))
    assert_fails(hand_headers(b"application/json; charset=utf-8"), "^signature does not match$")


def test_hand_computed_vector_agrees_with_botocore() -> None:
    """spec Appendix A: botocore, our verifier and the hand computation agree."""
    headers = botocore_sign(headers=[("Content-Type", "application/json")])
    assert auth_parts(headers)["Signature"] == HAND_SIGNATURE


# AWS's published Signature Version 4 test suite (AKIDEXAMPLE, service "service",
# 20150830T123600Z); the signatures are AWS's, not computed by any code here.
SUITE_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
SUITE_NOW = calendar.timegm((2015, 8, 30, 12, 36, 0))


@pytest.mark.parametrize(
    ("name", "method", "path", "query", "extra", "body", "signature"),
    [
        (
            "get-vanilla",
            "GET",
            b"/",
            b"",
            [],
            b"",
            "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
        ),
        (
            "get-vanilla-query-order-key-case",
            "GET",
            b"/",
            b"Param2=value2&Param1=value1",
            [],
            b"",
            "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
        ),
        (
            "get-header-value-trim",
            "GET",
            b"/",
            b"",
            [(b"my-header1", b" value1"), (b"my-header2", b'"a   b   c"')],
            b"",
            "acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736",
        ),
        (
            "get-header-key-duplicate",
            "GET",
            b"/",
            b"",
            [(b"my-header1", b"value2"), (b"my-header1", b"value2"), (b"my-header1", b"value1")],
            b"",
            "c9d5ea9f3f72853aea855b47ea873832890dbdd183b4468f858259531a5138ea",
        ),
        (
            "get-utf8",
            "GET",
            "/\u1234".encode(),
            b"",
            [],
            b"",
            "8318018e0b0f223aa2bbf98705b62bb787dc9c0e678f255a891fd03141be5d85",
        ),
        (
            "post-vanilla",
            "POST",
            b"/",
            b"",
            [],
            b"",
            "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b",
        ),
        (
            "post-x-www-form-urlencoded",
            "POST",
            b"/",
            b"",
            [(b"content-type", b"application/x-www-form-urlencoded")],
            b"Param1=value1",
            "ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a",
        ),
        (
            "post-x-www-form-urlencoded-parameters",
            "POST",
            b"/",
            b"",
            [(b"content-type", b"application/x-www-form-urlencoded; charset=utf8")],
            b"Param1=value1",
            "1a72ec8f64bd914b0e42e42607c7fbce7fb2c7465f63e3092b3b0d39fa77a6fe",
        ),
    ],
)
def test_aws_published_test_suite_vectors(
    name: str,
    method: str,
    path: bytes,
    query: bytes,
    extra: Headers,
    body: bytes,
    signature: str,
) -> None:
    """spec Appendix A points at the AWS SigV4 documentation; its test suite must pass."""
    names = sorted({b"host", b"x-amz-date"} | {n for n, _ in extra})
    headers: Headers = [
        (b"host", b"example.amazonaws.com"),
        (b"x-amz-date", b"20150830T123600Z"),
        *extra,
        (
            b"authorization",
            build_authorization(
                "AKIDEXAMPLE/20150830/us-east-1/service/aws4_request",
                b";".join(names).decode(),
                signature,
            ).encode(),
        ),
    ]
    identity = verify(
        headers,
        method=method,
        raw_path=path,
        query_string=query,
        body=body,
        now=SUITE_NOW,
        secrets={"AKIDEXAMPLE": SUITE_SECRET},
        service="service",
    )
    assert identity.access_key_id == "AKIDEXAMPLE", name


# --------------------------------------------------------------------------- negative


def test_missing_authorization_header() -> None:
    """spec Appendix A: every request carries an Authorization header."""
    assert_fails(drop_header(botocore_sign(), b"authorization"), "^missing Authorization header$")


def test_multiple_authorization_headers() -> None:
    """spec Appendix A: exactly one Authorization header."""
    headers = botocore_sign()
    auth = get_header(headers, b"authorization")
    assert_fails([*headers, (b"authorization", auth)], "^multiple Authorization headers$")


@pytest.mark.parametrize(
    "value",
    [
        "",
        "Bearer abc",
        "AWS4-HMAC-SHA1 Credential=a/20240501/us-east-1/kms-xks-proxy/aws4_request",
        "aws4-hmac-sha256 Credential=x",
        "AWS4-HMAC-SHA256Credential=x",
        "AWS4-ECDSA-P256-SHA256 Credential=x, SignedHeaders=host, Signature=00",
    ],
)
def test_unsupported_algorithm(value: str) -> None:
    """spec Appendix A: the algorithm is always AWS4-HMAC-SHA256."""
    assert_fails(with_authorization(botocore_sign(), value), "^unsupported algorithm$")


def _auth_with(**overrides: str) -> tuple[Headers, str]:
    headers = botocore_sign()
    parts = auth_parts(headers)
    parts.update(overrides)
    value = build_authorization(parts["Credential"], parts["SignedHeaders"], parts["Signature"])
    return with_authorization(headers, value), value


@pytest.mark.parametrize(
    ("credential", "match"),
    [
        (f"{AKID}/20240501/us-east-1/kms-xks-proxy", "^malformed Credential$"),
        (f"{AKID}/20240501/us-east-1/kms-xks-proxy/aws4_request/x", "^malformed Credential$"),
        (f"{AKID}", "^malformed Credential$"),
        ("/20240501/us-east-1/kms-xks-proxy/aws4_request", "^malformed Credential: bad access"),
        ("A" * 129 + "/20240501/us-east-1/kms-xks-proxy/aws4_request", "^malformed Credential"),
        ("AK ID/20240501/us-east-1/kms-xks-proxy/aws4_request", "^malformed Credential: bad acc"),
        (f"{AKID}/2024050/us-east-1/kms-xks-proxy/aws4_request", "^malformed Credential: bad date"),
        (f"{AKID}/2024-5-1/us-east-1/kms-xks-proxy/aws4_request", "^malformed Credential: bad d"),
        (f"{AKID}/20240501//kms-xks-proxy/aws4_request", "^malformed Credential: bad region$"),
        (f"{AKID}/20240501/{'r' * 65}/kms-xks-proxy/aws4_request", "^malformed Credential: bad r"),
        (
            f"{AKID}/20240501/us-east-1/kms/aws4_request",
            "^credential scope service must be kms-xks",
        ),
        (f"{AKID}/20240501/us-east-1//aws4_request", "^credential scope service must be kms-xks"),
        (f"{AKID}/20240501/us-east-1/KMS-XKS-PROXY/aws4_request", "^credential scope service mu"),
        (f"{AKID}/20240501/us-east-1/kms-xks-proxy/aws4_requests", "^credential scope must end"),
        (f"{AKID}/20240501/us-east-1/kms-xks-proxy/aws5_request", "^credential scope must end "),
        (f"{AKID}/20240430/us-east-1/kms-xks-proxy/aws4_request", "^credential scope date does"),
        (f"{AKID}/20240502/us-east-1/kms-xks-proxy/aws4_request", "^credential scope date does"),
    ],
)
def test_bad_credential(credential: str, match: str) -> None:
    """spec Appendix A: Credential=<akid>/<yyyymmdd>/<region>/kms-xks-proxy/aws4_request."""
    headers, _ = _auth_with(Credential=credential)
    assert_fails(headers, match)


def test_access_key_id_length_limit_is_cheap_and_not_a_syntax_check() -> None:
    """spec Appendix A: the access key id picks the secret; absurd lengths are refused."""
    long_ok = "A" * 128
    headers, _ = _auth_with(Credential=f"{long_ok}/20240501/us-east-1/kms-xks-proxy/aws4_request")
    assert_fails(headers, "^unknown access key id$")
    lower = "not-a-spec-akid"
    headers = botocore_sign(akid=lower)
    assert verify(headers, secrets={lower: SECRET}).access_key_id == lower


def test_signed_by_botocore_for_another_service_is_rejected() -> None:
    """spec Appendix A: the service is kms-xks-proxy."""
    assert_fails(botocore_sign(service="kms"), "^credential scope service must be kms-xks-proxy$")


def test_unknown_access_key_id() -> None:
    """spec Appendix A: the proxy must identify the secret from the access key id."""
    headers = botocore_sign(akid="UNKNOWNAKIDUNKNOWNAKID")
    assert_fails(headers, "^unknown access key id$")


def test_wrong_secret() -> None:
    """spec Appendix A Task 4: a signature made with another secret does not match."""
    assert_fails(botocore_sign(secret=OTHER_SECRET), "^signature does not match$")


def test_tampered_body_one_bit() -> None:
    """spec Appendix A: the payload hash covers the exact body bytes."""
    headers = botocore_sign()
    for index in (0, len(BODY) // 2, len(BODY) - 1):
        tampered = bytearray(BODY)
        tampered[index] ^= 0x01
        assert_fails(headers, "^signature does not match$", body=bytes(tampered))
    assert_fails(headers, "^signature does not match$", body=BODY + b" ")
    assert_fails(headers, "^signature does not match$", body=BODY[:-1])


@pytest.mark.parametrize(
    "path",
    [
        b"/example/uri/path/prefix/kms/xks/v1/keys/foo/decrypt",
        b"/example/uri/path/prefix/kms/xks/v1/keys/fop/encrypt",
        b"/other/prefix/kms/xks/v1/keys/foo/encrypt",
        b"/example/uri/path/prefix/kms/xks/v1/keys/FOO/encrypt",
        b"/example/uri/path/prefix/kms/xks/v1/keys/foo/encrypt/",
        b"",
    ],
)
def test_tampered_path(path: bytes) -> None:
    """spec Appendix A Task 1: the CanonicalURI is the signed API URI."""
    assert_fails(botocore_sign(), "^signature does not match$", raw_path=path)


def test_tampered_method_and_query() -> None:
    """spec Appendix A Task 1: method and (empty) query are part of the canonical request."""
    assert_fails(botocore_sign(), "^signature does not match$", method="PUT")
    assert_fails(botocore_sign(), "^signature does not match$", query_string=b"a=1")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (b"content-type", b"application/xml"),
        (b"content-type", b"application/json;"),
        (b"host", b"evil.example.com"),
        (b"host", b"xks.example.com:443"),
    ],
)
def test_tampered_signed_header_value(name: bytes, value: bytes) -> None:
    """spec Appendix A: CanonicalHeaders carry the signed headers' values."""
    assert_fails(replace_header(botocore_sign(), name, value), "^signature does not match$")


def test_tampered_x_amz_date_within_the_same_day() -> None:
    """spec Appendix A Task 2: RequestDateTime comes from X-Amz-Date and is signed."""
    headers = replace_header(botocore_sign(), b"x-amz-date", b"20240501T120001Z")
    assert_fails(headers, "^signature does not match$")


def test_missing_x_amz_date() -> None:
    """spec Appendix A: X-Amz-Date is required."""
    assert_fails(drop_header(botocore_sign(), b"x-amz-date"), "^missing X-Amz-Date header$")


def test_multiple_x_amz_date() -> None:
    """spec Appendix A: exactly one X-Amz-Date."""
    headers = botocore_sign()
    date = get_header(headers, b"x-amz-date")
    assert_fails([*headers, (b"x-amz-date", date)], "^multiple X-Amz-Date headers$")


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"20240501",
        b"20240501T120000",
        b"20240501T120000z",
        b"20240501t120000Z",
        b"2024-05-01T12:00:00Z",
        b"20240501T12000Z0",
        b"20241301T120000Z",
        b"20240001T120000Z",
        b"20240500T120000Z",
        b"20240532T120000Z",
        b"20230229T120000Z",
        b"20240501T240000Z",
        b"20240501T126000Z",
        b"20240501T120060Z",
        b"00000101T000000Z",
        b"+2024050T120000Z",
        b"2024_501T120000Z",
        b" 024-501T120000Z",
        "20240501T12000\u0661Z".encode(),
        b"Wed, 01 May 2024 12:00:00 GMT",
    ],
)
def test_malformed_x_amz_date(value: bytes) -> None:
    """spec Appendix A: X-Amz-Date is formatted YYYYMMDD'T'HHMMSS'Z'."""
    headers = replace_header(botocore_sign(), b"x-amz-date", value)
    assert_fails(headers, "^malformed X-Amz-Date header$")


@pytest.mark.parametrize(
    ("signed_headers", "match"),
    [
        ("host", "^SignedHeaders must include host and x-amz-date$"),
        ("x-amz-date", "^SignedHeaders must include host and x-amz-date$"),
        ("content-type;x-amz-date", "^SignedHeaders must include host and x-amz-date$"),
        ("content-type", "^SignedHeaders must include host and x-amz-date$"),
        ("x-amz-date;host", "^SignedHeaders must be lower-case, sorted and unique$"),
        ("content-type;host;host;x-amz-date", "^SignedHeaders must be lower-case, sorted and uni"),
        ("Host;x-amz-date", "^SignedHeaders must be lower-case, sorted and unique$"),
        ("host;;x-amz-date", "^SignedHeaders must be lower-case, sorted and unique$"),
        ("host;x-amz-date;", "^SignedHeaders must be lower-case, sorted and unique$"),
        (";host;x-amz-date", "^SignedHeaders must be lower-case, sorted and unique$"),
    ],
)
def test_bad_signed_headers(signed_headers: str, match: str) -> None:
    """spec Appendix A: SignedHeaders includes at least host;x-amz-date."""
    headers, _ = _auth_with(SignedHeaders=signed_headers)
    assert_fails(headers, match)


def test_signed_header_missing_from_request() -> None:
    """spec Appendix A: CanonicalHeaders are the headers SignedHeaders lists."""
    headers = drop_header(botocore_sign(), b"content-type")
    assert_fails(headers, "^signed header content-type is missing$")
    headers, _ = _auth_with(SignedHeaders="host;x-amz-date;" + "x" * 200)
    with pytest.raises(AuthenticationFailedException) as info:
        verify(headers)
    assert info.value.error_message == f"signed header {'x' * 64}... is missing"


@pytest.mark.parametrize(
    "signature",
    [
        "",
        "abc",
        "0" * 63,
        "0" * 65,
        "g" * 64,
        "A" * 64,
        "0x" + "0" * 62,
        " " * 64,
        "-" + "0" * 63,
    ],
)
def test_non_hex_or_short_signature(signature: str) -> None:
    """spec Appendix A: Signature is a 64-digit lower-case hex string."""
    headers, _ = _auth_with(Signature=signature)
    if not signature.strip():
        assert_fails(headers, "^(malformed Authorization header|Signature must be 64 lower-case)")
    else:
        assert_fails(headers, "^Signature must be 64 lower-case hex digits$")


def test_upper_case_hex_signature_is_rejected() -> None:
    """spec Appendix A: the signature is sent as lower-case hex, as every signer does."""
    headers = botocore_sign()
    upper = auth_parts(headers)["Signature"].upper()
    headers, _ = _auth_with(Signature=upper)
    assert_fails(headers, "^Signature must be 64 lower-case hex digits$")


def _components(headers: Headers) -> tuple[str, str, str]:
    p = auth_parts(headers)
    return (
        f"Credential={p['Credential']}",
        f"SignedHeaders={p['SignedHeaders']}",
        f"Signature={p['Signature']}",
    )


@pytest.mark.parametrize(
    ("layout", "match"),
    [
        ("{c}, {c}, {h}, {s}", "^duplicate Credential in Authorization header$"),
        ("{c}, {h}, {s}, {c}", "^duplicate Credential in Authorization header$"),
        ("{c}, {h}, {h}, {s}", "^duplicate SignedHeaders in Authorization header$"),
        ("{c}, {h}, {s}, {s}", "^duplicate Signature in Authorization header$"),
        ("{s}, {c}, {h}, {s}", "^duplicate Signature in Authorization header$"),
        ("{s}, {s}, {c}, {h}", "^duplicate Signature in Authorization header$"),
        ("{h}, {s}", "^missing Credential in Authorization header$"),
        ("{c}, {s}", "^missing SignedHeaders in Authorization header$"),
        ("{c}, {h}", "^missing Signature in Authorization header$"),
        ("{c}, {h}, {s}, Extra=1", "^unexpected component 'Extra' in Authorization header$"),
        ("{c}, {h}, Extra=1, {s}", "^unexpected component 'Extra' in Authorization header$"),
        ("{c}, {h}, {s},", "^malformed Authorization header$"),
        ("{c}, {h},, {s}", "^malformed Authorization header$"),
        ("{c} {h}, {s}", "^missing SignedHeaders in Authorization header$"),
        ("AWS4-HMAC-SHA256", "^malformed Authorization header$"),
        ("{c}; {h}; {s}", "^(malformed|missing)"),
        ("credential=x, {h}, {s}", "^unexpected component 'credential'"),
        ("{c}, {h}, Signature", "^malformed Authorization header$"),
        ("{c}, {h}, Signature=", "^(malformed Authorization header|Signature must be)"),
    ],
)
def test_malformed_authorization_components(layout: str, match: str) -> None:
    """spec Appendix A: Credential, SignedHeaders and Signature, each exactly once."""
    headers = botocore_sign()
    c, h, s = _components(headers)
    value = layout.format(c=c, h=h, s=s)
    if not value.startswith("AWS4-HMAC-SHA256"):
        value = "AWS4-HMAC-SHA256 " + value
    assert_fails(with_authorization(headers, value), match)


def test_oversized_and_non_ascii_authorization() -> None:
    """Never parse (or echo) unbounded attacker-controlled input."""
    headers = botocore_sign()
    c, h, s = _components(headers)
    huge = f"AWS4-HMAC-SHA256 {c}, {h}, {s}, " + "X" * 5000
    assert_fails(with_authorization(headers, huge), "^Authorization header is too long$")
    non_ascii = f"AWS4-HMAC-SHA256 {c}, {h}, {s}".encode() + "\u00e9".encode()
    assert_fails(with_authorization(headers, non_ascii), "^malformed Authorization header$")
    long_key = f"AWS4-HMAC-SHA256 {c}, {h}, {'K' * 1000}=1, {s}"
    with pytest.raises(AuthenticationFailedException) as info:
        verify(with_authorization(headers, long_key))
    assert len(info.value.error_message) < 120
    assert "K" * 65 not in info.value.error_message


def test_error_messages_never_contain_secret_or_expected_signature() -> None:
    """spec "Error codes": messages are printable ASCII < 512 chars; no secrets leak."""
    headers = botocore_sign()
    tampered = BODY.replace(b"Encrypt", b"Decrypt")
    expected = botocore_sign(body=tampered)
    expected_sig = auth_parts(expected)["Signature"]
    with pytest.raises(AuthenticationFailedException) as info:
        verify(headers, body=tampered)
    assert_safe_message(info.value)
    assert expected_sig not in str(info.value) and expected_sig not in repr(info.value)
    assert SECRET not in str(info.value)


# --------------------------------------------------------------------------- properties

XKS_SEGMENT = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.",
    min_size=0,
    max_size=20,
)
XKS_PATH = st.lists(XKS_SEGMENT, min_size=1, max_size=8).map(lambda s: "/" + "/".join(s))
HEADER_NAME = st.from_regex(r"\Ax-[a-z0-9-]{1,20}\Z").filter(
    lambda n: n not in {"x-amz-date", "x-amz-content-sha256", "x-amzn-trace-id"}
)
HEADER_VALUE = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from("\t"),
    max_size=40,
)
HEADER_SET = st.lists(st.tuples(HEADER_NAME, HEADER_VALUE), max_size=6)
PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY_SETTINGS
@given(
    body=st.binary(max_size=2048),
    path=XKS_PATH,
    extra=HEADER_SET,
    skew=st.integers(-MAX_CLOCK_SKEW_SECONDS, MAX_CLOCK_SKEW_SECONDS),
    content_type=st.booleans(),
)
def test_property_botocore_signed_requests_always_verify(
    body: bytes,
    path: str,
    extra: list[tuple[str, str]],
    skew: int,
    content_type: bool,
) -> None:
    """spec Appendix A: any request botocore signs for kms-xks-proxy verifies."""
    headers_in = ([("Content-Type", "application/json")] if content_type else []) + extra
    headers = botocore_sign(url=f"https://{HOST}{path}", body=body, headers=headers_in)
    identity = verify(headers, body=body, raw_path=path.encode(), now=NOW + skew)
    assert identity == SigV4Identity(AKID, REGION, NOW)


@PROPERTY_SETTINGS
@given(data=st.data(), body=st.binary(min_size=1, max_size=512))
def test_property_any_single_byte_body_mutation_fails(data: st.DataObject, body: bytes) -> None:
    """spec Appendix A: the signature covers every byte of the payload."""
    headers = botocore_sign(body=body)
    index = data.draw(st.integers(0, len(body) - 1))
    delta = data.draw(st.integers(1, 255))
    mutated = bytearray(body)
    mutated[index] ^= delta
    with pytest.raises(AuthenticationFailedException, match=r"^signature does not match$"):
        verify(headers, body=bytes(mutated))


_SIGNED = botocore_sign()
_SIGNATURE = auth_parts(_SIGNED)["Signature"]


@PROPERTY_SETTINGS
@given(
    index=st.integers(0, 63),
    char=st.characters(min_codepoint=0x21, max_codepoint=0x7E).filter(lambda c: c not in ",="),
)
def test_property_any_single_char_signature_mutation_fails(index: int, char: str) -> None:
    """spec Appendix A Task 4: only the exact signature matches."""
    if _SIGNATURE[index] == char:
        char = "0" if char != "0" else "1"
    mutated = _SIGNATURE[:index] + char + _SIGNATURE[index + 1 :]
    headers, _ = _auth_with(Signature=mutated)
    with pytest.raises(AuthenticationFailedException) as info:
        verify(headers)
    assert_safe_message(info.value)


AUTH_FRAGMENTS = st.sampled_from(
    [
        "AWS4-HMAC-SHA256",
        " ",
        ",",
        ", ",
        "=",
        "/",
        ";",
        "Credential=",
        "SignedHeaders=",
        "Signature=",
        AKID,
        "20240501",
        "us-east-1",
        "kms-xks-proxy",
        "aws4_request",
        "host",
        "x-amz-date",
        "content-type",
        _SIGNATURE,
        "\u00e9",
        "\x00",
    ]
)
GARBAGE_AUTH = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(lambda t: t.encode("utf-8")),
    st.lists(AUTH_FRAGMENTS | st.text(max_size=8), max_size=40).map(
        lambda parts: "".join(parts).encode("utf-8")
    ),
)


@PROPERTY_SETTINGS
@given(auth=GARBAGE_AUTH, date=st.one_of(st.just(b"20240501T120000Z"), st.binary(max_size=20)))
def test_property_garbage_authorization_only_raises_authentication_failed(
    auth: bytes, date: bytes
) -> None:
    """spec Appendix A: any unverifiable request fails with AuthenticationFailedException."""
    headers = replace_header(with_authorization(_SIGNED, auth), b"x-amz-date", date)
    try:
        verify(headers)
    except AuthenticationFailedException as error:
        assert_safe_message(error)
    else:  # pragma: no cover - would need a forged signature
        pytest.fail("garbage verified")


@PROPERTY_SETTINGS
@given(
    headers=st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=60)), max_size=10),
    path=st.binary(max_size=60),
    query=st.binary(max_size=60),
)
def test_property_garbage_request_only_raises_authentication_failed(
    headers: Headers, path: bytes, query: bytes
) -> None:
    """spec Appendix A: arbitrary headers, path and query never crash the verifier."""
    for candidate in (
        headers,
        [*headers, (b"authorization", get_header(_SIGNED, b"authorization"))],
    ):
        with pytest.raises(AuthenticationFailedException) as info:
            verify(candidate, raw_path=path, query_string=query)
        assert_safe_message(info.value)
    # A correctly signed request with a garbage path/query verifies only if both
    # canonicalise to what was signed.
    try:
        verify(_SIGNED, raw_path=path, query_string=query)
    except AuthenticationFailedException as error:
        assert_safe_message(error)
    else:
        assert _canonical_uri(path) == PATH.encode()
        assert _canonical_query(query) == b""


# --------------------------------------------------------------------------- curl


def _curl_supports_aws_sigv4() -> bool:
    curl = shutil.which("curl")
    if curl is None:
        return False
    result = subprocess.run(
        [curl, "--help", "all"], capture_output=True, text=True, timeout=10, check=False
    )
    return "--aws-sigv4" in result.stdout


class _Capture(http.server.BaseHTTPRequestHandler):
    captured: list[tuple[str, str, list[tuple[str, str]], bytes]]

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        self.captured.append((self.command, self.path, list(self.headers.items()), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def capture_server() -> Iterator[tuple[int, list[tuple[str, str, list[tuple[str, str]], bytes]]]]:
    captured: list[tuple[str, str, list[tuple[str, str]], bytes]] = []
    handler = type("Handler", (_Capture,), {"captured": captured})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], captured
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.skipif(not _curl_supports_aws_sigv4(), reason="curl lacks --aws-sigv4")
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/example/uri/path/prefix/kms/xks/v1/keys/foo/encrypt", BODY.decode()),
        (
            "/example/uri/path/prefix/kms/xks/v1/health",
            '{"requestMetadata":{"kmsRequestId":"c1f3a5e0","kmsOperation":"CreateCustomKeyStore"}}',
        ),
        ("/kms/xks/v1/keys/key.with-dots_and-dashes/metadata", '{"requestMetadata": {}}'),
    ],
)
def test_agrees_with_curl_aws_sigv4(
    capture_server: tuple[int, list[tuple[str, str, list[tuple[str, str]], bytes]]],
    path: str,
    body: str,
) -> None:
    """spec Appendix A: a request signed by `curl --aws-sigv4` (the compliance client) verifies."""
    port, captured = capture_server
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--aws-sigv4",
            "aws:amz:us-east-1:kms-xks-proxy",
            "--user",
            f"{AKID}:{SECRET}",
            "-X",
            "POST",
            "-H",
            "Content-Type:application/json",
            "--data",
            body,
            f"http://127.0.0.1:{port}{path}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert len(captured) == 1
    method, target, raw_headers, raw_body = captured[0]
    raw_path, _, query = target.partition("?")
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in raw_headers]
    assert b"content-type" in auth_parts(headers)["SignedHeaders"].encode()
    identity = verify_request(
        method=method,
        raw_path=raw_path.encode("latin-1"),
        query_string=query.encode("latin-1"),
        headers=headers,
        body=raw_body,
        lookup_secret=SECRETS.get,
        now=time.time(),
    )
    assert identity.access_key_id == AKID
    assert identity.region == "us-east-1"
    assert abs(identity.signed_at - time.time()) < 60
    # And the captured request is really protected: a one-byte change fails.
    with pytest.raises(AuthenticationFailedException, match=r"^signature does not match$"):
        verify_request(
            method=method,
            raw_path=raw_path.encode("latin-1"),
            query_string=b"",
            headers=headers,
            body=raw_body[:-1] + b" ",
            lookup_secret=SECRETS.get,
            now=time.time(),
        )
