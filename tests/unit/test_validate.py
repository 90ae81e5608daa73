"""Request validation (spec: API operations, Error codes, Appendix B)."""

import base64
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xks_proxy.protocol.errors import (
    UnsupportedOperationException,
    ValidationException,
    XksError,
)
from xks_proxy.protocol.models import (
    DecryptRequest,
    EncryptRequest,
    GetHealthStatusRequest,
    GetKeyMetadataRequest,
    XksOperation,
)
from xks_proxy.protocol.validate import RequestLimits, decode_b64, parse_request, request_ids_of

ARN = "arn:aws:iam::123456789012:user/Alice"
KEY_ARN = "arn:aws:kms:us-east-2:123456789012:/key/1234abcd-12ab-34cd-56ef-1234567890ab"


def metadata(**extra: Any) -> dict[str, Any]:
    base = {
        "awsPrincipalArn": ARN,
        "kmsKeyArn": KEY_ARN,
        "kmsOperation": "Encrypt",
        "kmsRequestId": "4112f4d6-db54-4af4-ae30-c55a22a8dfae",
    }
    base.update(extra)
    return base


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encrypt_body(**fields: Any) -> bytes:
    body: dict[str, Any] = {
        "requestMetadata": metadata(),
        "plaintext": b64(b"Hello World!"),
        "encryptionAlgorithm": "AES_GCM",
    }
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


def decrypt_body(**fields: Any) -> bytes:
    body: dict[str, Any] = {
        "requestMetadata": metadata(kmsOperation="Decrypt"),
        "ciphertext": "ghxkK1txeDNn3q8Y",
        "initializationVector": "HMrlRw85cAJUd5Ax",
        "authenticationTag": "vBxN2ncH1oEkR8WVXpmyYQ==",
        "encryptionAlgorithm": "AES_GCM",
    }
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


def test_spec_encrypt_example_parses() -> None:
    body = {
        "requestMetadata": {
            "awsPrincipalArn": ARN,
            "kmsKeyArn": KEY_ARN,
            "kmsOperation": "Encrypt",
            "kmsRequestId": "4112f4d6-db54-4af4-ae30-c55a22a8dfae",
            "kmsViaService": "ebs",
        },
        "additionalAuthenticatedData": "cHJvamVjdD1uaWxlLGRlcGFydG1lbnQ9bWFya2V0aW5n",
        "plaintext": "SGVsbG8gV29ybGQh",
        "encryptionAlgorithm": "AES_GCM",
        "ciphertextDataIntegrityValueAlgorithm": "SHA_256",
    }
    request = parse_request(XksOperation.ENCRYPT, json.dumps(body).encode())
    assert isinstance(request, EncryptRequest)
    assert request.plaintext == b"Hello World!"
    assert request.aad == b"project=nile,department=marketing"
    assert request.cdiv_algorithm == "SHA_256"
    assert request.metadata.kms_via_service == "ebs"


def test_spec_decrypt_example_parses() -> None:
    request = parse_request(
        XksOperation.DECRYPT, decrypt_body(ciphertextMetadata="a2V5X3ZlcnNpb249MQ==")
    )
    assert isinstance(request, DecryptRequest)
    assert request.ciphertext_metadata == b"key_version=1"
    assert len(request.iv) == 12 and len(request.tag) == 16


def test_health_needs_only_request_id_and_operation() -> None:
    body = b'{"requestMetadata":{"kmsRequestId":"x","kmsOperation":"KmsHealthCheck"}}'
    request = parse_request(XksOperation.GET_HEALTH_STATUS, body)
    assert isinstance(request, GetHealthStatusRequest)


def test_metadata_without_key_arn_is_fine_for_create_key() -> None:
    """GetKeyMetadata from CreateKey carries no kmsKeyArn (spec: GetKeyMetadata example)."""
    body = json.dumps(
        {
            "requestMetadata": {
                "awsPrincipalArn": ARN,
                "kmsOperation": "CreateKey",
                "kmsRequestId": "r",
            }
        }
    ).encode()
    assert isinstance(parse_request(XksOperation.GET_KEY_METADATA, body), GetKeyMetadataRequest)


def test_unknown_kms_operation_and_unknown_fields_are_accepted() -> None:
    """Spec: MUST NOT reject an unknown kmsOperation; Appendix B: new fields will come."""
    body = encrypt_body(
        requestMetadata=metadata(kmsOperation="BulkEncrypt", sourceIdentity="bob", tags={"a": 1}),
        someFutureField=[1, 2],
    )
    request = parse_request(XksOperation.ENCRYPT, body)
    assert request.metadata.kms_operation == "BulkEncrypt"
    assert request.metadata.extra == {"sourceIdentity": "bob", "tags": {"a": 1}}


def test_request_id_is_opaque() -> None:
    for request_id in ("", "not-a-uuid", "x" * 5000, "ünïcode"):
        body = encrypt_body(requestMetadata=metadata(kmsRequestId=request_id))
        assert parse_request(XksOperation.ENCRYPT, body).metadata.kms_request_id == request_id


def test_2048_char_arns_are_accepted() -> None:
    long_arn = "arn:aws:iam::123456789012:role/" + "r" * (2048 - 31)
    assert len(long_arn) == 2048
    body = encrypt_body(requestMetadata=metadata(awsPrincipalArn=long_arn, kmsKeyArn=long_arn))
    assert parse_request(XksOperation.ENCRYPT, body).metadata.aws_principal_arn == long_arn


def test_spec_minimum_sizes_are_accepted() -> None:
    """Spec: plaintext up to 4300 bytes and AAD up to 8192 bytes MUST work."""
    body = encrypt_body(plaintext=b64(b"p" * 4300), additionalAuthenticatedData=b64(b"a" * 8192))
    request = parse_request(XksOperation.ENCRYPT, body)
    assert isinstance(request, EncryptRequest)
    assert len(request.plaintext) == 4300 and request.aad is not None and len(request.aad) == 8192
    body = decrypt_body(ciphertext=b64(b"c" * 4300), additionalAuthenticatedData=b64(b"a" * 8192))
    assert isinstance(parse_request(XksOperation.DECRYPT, body), DecryptRequest)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b"{}", "requestMetadata is required"),
        (b'{"requestMetadata": []}', "requestMetadata must be a JSON object"),
        (b'{"requestMetadata": {}}', "kmsRequestId is required"),
        (
            encrypt_body(requestMetadata={"kmsRequestId": "r", "kmsOperation": "Encrypt"}),
            "awsPrincipalArn is required",
        ),
        (
            encrypt_body(requestMetadata=metadata(kmsKeyArn=None) | {"kmsKeyArn": None}),
            "kmsKeyArn must be a string",
        ),
        (
            encrypt_body(requestMetadata={k: v for k, v in metadata().items() if k != "kmsKeyArn"}),
            "kmsKeyArn is required",
        ),
        (encrypt_body(requestMetadata=metadata(kmsOperation=7)), "kmsOperation must be a string"),
        (encrypt_body(plaintext=None), "plaintext is required"),
        (encrypt_body(plaintext=5), "plaintext must be a string"),
        (encrypt_body(plaintext="SGVsbG8gV29ybGQh\n"), "plaintext is not valid base64"),
        (encrypt_body(plaintext="SGVsbG8_V29ybGQh"), "plaintext is not valid base64"),
        (encrypt_body(plaintext="SGVsbG8gV29ybGQ"), "plaintext is not valid base64"),
        (encrypt_body(plaintext="QR=="), "plaintext is not valid base64"),
        (encrypt_body(encryptionAlgorithm=None), "encryptionAlgorithm is required"),
        (encrypt_body(additionalAuthenticatedData="!!!!"), "additionalAuthenticatedData is not"),
    ],
)
def test_validation_errors(body: bytes, message: str) -> None:
    with pytest.raises(ValidationException) as caught:
        parse_request(XksOperation.ENCRYPT, body)
    assert message in caught.value.error_message


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"initializationVector": b64(b"i" * 11)}, "initializationVector must be 12 or 16 bytes"),
        ({"initializationVector": b64(b"i" * 13)}, "initializationVector must be 12 or 16 bytes"),
        ({"initializationVector": None}, "initializationVector is required"),
        ({"authenticationTag": b64(b"t" * 15)}, "authenticationTag must be 16 bytes"),
        ({"authenticationTag": None}, "authenticationTag is required"),
        ({"ciphertext": None}, "ciphertext is required"),
        ({"ciphertextMetadata": b64(b"m" * 21)}, "ciphertextMetadata must not exceed 20 bytes"),
    ],
)
def test_decrypt_field_errors(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationException) as caught:
        parse_request(XksOperation.DECRYPT, decrypt_body(**fields))
    assert message in caught.value.error_message


def test_16_byte_iv_and_20_byte_metadata_are_valid() -> None:
    body = decrypt_body(initializationVector=b64(b"i" * 16), ciphertextMetadata=b64(b"m" * 20))
    request = parse_request(XksOperation.DECRYPT, body)
    assert isinstance(request, DecryptRequest)
    assert len(request.iv) == 16


def test_unsupported_algorithms_are_501() -> None:
    with pytest.raises(UnsupportedOperationException):
        parse_request(XksOperation.ENCRYPT, encrypt_body(encryptionAlgorithm="AES_CBC"))
    with pytest.raises(UnsupportedOperationException):
        parse_request(
            XksOperation.ENCRYPT, encrypt_body(ciphertextDataIntegrityValueAlgorithm="MD5")
        )
    with pytest.raises(UnsupportedOperationException):
        parse_request(XksOperation.DECRYPT, decrypt_body(encryptionAlgorithm="RSA"))


def test_sizes_beyond_our_limits_are_501_not_a_crash() -> None:
    """The AWS sample panics on AAD > 65,535 bytes in decrypt; we answer 501."""
    limits = RequestLimits(max_plaintext_bytes=5000, max_aad_bytes=9000)
    with pytest.raises(UnsupportedOperationException):
        parse_request(XksOperation.ENCRYPT, encrypt_body(plaintext=b64(b"p" * 5001)), limits)
    with pytest.raises(UnsupportedOperationException):
        parse_request(
            XksOperation.DECRYPT, decrypt_body(additionalAuthenticatedData=b64(b"a" * 65536))
        )
    with pytest.raises(UnsupportedOperationException):
        parse_request(
            XksOperation.DECRYPT, decrypt_body(additionalAuthenticatedData=b64(b"a" * 9001)), limits
        )


def test_limits_cannot_go_below_spec_minimums() -> None:
    with pytest.raises(ValueError):
        RequestLimits(max_plaintext_bytes=4299)
    with pytest.raises(ValueError):
        RequestLimits(max_aad_bytes=8191)


@given(st.binary(max_size=200))
def test_b64_round_trip(data: bytes) -> None:
    assert decode_b64(base64.b64encode(data).decode(), "f") == data


@given(st.binary(max_size=400))
def test_arbitrary_bodies_only_raise_xks_errors(body: bytes) -> None:
    for operation in XksOperation:
        try:
            parse_request(operation, body)
        except XksError:
            pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(
    st.dictionaries(
        st.sampled_from(
            [
                "requestMetadata",
                "plaintext",
                "ciphertext",
                "initializationVector",
                "authenticationTag",
                "additionalAuthenticatedData",
                "ciphertextMetadata",
                "encryptionAlgorithm",
                "ciphertextDataIntegrityValueAlgorithm",
                "x",
            ]
        ),
        json_values,
        max_size=8,
    )
)
def test_arbitrary_json_objects_only_raise_xks_errors(document: dict[str, Any]) -> None:
    body = json.dumps(document).encode()
    for operation in XksOperation:
        try:
            parse_request(operation, body)
        except XksError as error:
            assert error.status in (400, 501)


@pytest.mark.parametrize(
    ("body", "ids"),
    [
        (
            encrypt_body(plaintext="not base64!"),
            {"kmsRequestId": "4112f4d6-db54-4af4-ae30-c55a22a8dfae", "kmsOperation": "Encrypt"},
        ),
        (
            b'{"requestMetadata": {"kmsRequestId": "' + b"r" * 300 + b'"}}',
            {"kmsRequestId": "r" * 128},
        ),
        (b'{"requestMetadata": {"kmsRequestId": 7, "kmsOperation": ""}}', {}),
        (b'{"requestMetadata": "x"}', {}),
        (b"[1, 2]", {}),
        (b"{not json", {}),
        (b"", {}),
    ],
)
def test_request_ids_of_a_refused_body(body: bytes, ids: dict[str, str]) -> None:
    # Spec: Logging — requests refused for their content still log kmsRequestId.
    assert request_ids_of(body) == ids
