"""Request bodies -> typed requests, with the spec's errors for bad input.

Rules (spec: API operations, Appendix B):
- the body is a JSON object with a ``requestMetadata`` object;
- kmsRequestId and kmsOperation are required strings; kmsRequestId is opaque and
  kmsOperation is never checked against a list (KMS adds operations over time);
- awsPrincipalArn is required except for GetHealthStatus, kmsKeyArn for Encrypt and
  Decrypt; unknown fields are accepted and ignored;
- binary fields are standard base64 with padding; IV 12 or 16 bytes, tag 16 bytes,
  ciphertextMetadata at most 20 bytes.
Sizes beyond what the spec requires but above our configured limits get 501
UnsupportedOperationException, as the spec's error table says.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import orjson

from xks_proxy.protocol.aad import MAX_AAD_BYTES, MAX_CIPHERTEXT_METADATA_BYTES
from xks_proxy.protocol.cdiv import SUPPORTED_CDIV_ALGORITHMS
from xks_proxy.protocol.errors import UnsupportedOperationException, ValidationException
from xks_proxy.protocol.models import (
    DecryptRequest,
    EncryptRequest,
    GetHealthStatusRequest,
    GetKeyMetadataRequest,
    RequestMetadata,
    XksOperation,
    XksRequest,
)

SUPPORTED_ENCRYPTION_ALGORITHMS = ("AES_GCM",)
VALID_IV_LENGTHS = (12, 16)
TAG_LENGTH = 16
# Spec minimums every proxy must handle.
SPEC_MIN_PLAINTEXT_BYTES = 4300
SPEC_MIN_AAD_BYTES = 8192

_KNOWN_METADATA_FIELDS = {
    "kmsRequestId": "kms_request_id",
    "kmsOperation": "kms_operation",
    "awsPrincipalArn": "aws_principal_arn",
    "kmsKeyArn": "kms_key_arn",
    "awsSourceVpc": "aws_source_vpc",
    "awsSourceVpce": "aws_source_vpce",
    "kmsViaService": "kms_via_service",
}


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Largest inputs we accept; at least the spec's minimums (checked in config)."""

    max_plaintext_bytes: int = 65536
    max_aad_bytes: int = MAX_AAD_BYTES

    def __post_init__(self) -> None:
        if self.max_plaintext_bytes < SPEC_MIN_PLAINTEXT_BYTES:
            raise ValueError(f"max_plaintext_bytes must be >= {SPEC_MIN_PLAINTEXT_BYTES}")
        if not SPEC_MIN_AAD_BYTES <= self.max_aad_bytes <= MAX_AAD_BYTES:
            raise ValueError(f"max_aad_bytes must be {SPEC_MIN_AAD_BYTES}..{MAX_AAD_BYTES}")


DEFAULT_LIMITS = RequestLimits()


def parse_request(
    operation: XksOperation, body: bytes, limits: RequestLimits = DEFAULT_LIMITS
) -> XksRequest:
    """Parse and validate the JSON body of one XKS API call."""
    document = _load_object(body)
    if operation is XksOperation.GET_HEALTH_STATUS:
        return GetHealthStatusRequest(_metadata(document, principal=False, key_arn=False))
    if operation is XksOperation.GET_KEY_METADATA:
        return GetKeyMetadataRequest(_metadata(document, principal=True, key_arn=False))
    if operation is XksOperation.ENCRYPT:
        return _encrypt(document, limits)
    return _decrypt(document, limits)


LOGGED_ID_CHARS = 128


def request_ids_of(body: bytes) -> dict[str, str]:
    """kmsRequestId and kmsOperation from a body that failed validation, for the log.

    Best effort and never raising: whatever string values requestMetadata holds under
    those names, cut to LOGGED_ID_CHARS. Only for signed requests (the signature
    covers the body, so the values are what KMS sent).
    """
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    metadata = document.get("requestMetadata") if isinstance(document, dict) else None
    if not isinstance(metadata, dict):
        return {}
    ids: dict[str, str] = {}
    for name in ("kmsRequestId", "kmsOperation"):
        value = metadata.get(name)
        if isinstance(value, str) and value:
            ids[name] = value[:LOGGED_ID_CHARS]
    return ids


def _load_object(body: bytes) -> dict[str, Any]:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ValidationException("request body is not valid JSON") from None
    if not isinstance(document, dict):
        raise ValidationException("request body must be a JSON object")
    return document


def _metadata(document: dict[str, Any], *, principal: bool, key_arn: bool) -> RequestMetadata:
    raw = document.get("requestMetadata")
    if raw is None:
        raise ValidationException("requestMetadata is required")
    if not isinstance(raw, dict):
        raise ValidationException("requestMetadata must be a JSON object")
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for name, value in raw.items():
        attribute = _KNOWN_METADATA_FIELDS.get(name)
        if attribute is None:
            extra[name] = value  # future metadata fields are accepted (spec: Appendix B)
            continue
        if not isinstance(value, str):
            raise ValidationException(f"requestMetadata.{name} must be a string")
        values[attribute] = value
    required = ["kmsRequestId", "kmsOperation"]
    if principal:
        required.append("awsPrincipalArn")
    if key_arn:
        required.append("kmsKeyArn")
    for name in required:
        if _KNOWN_METADATA_FIELDS[name] not in values:
            raise ValidationException(f"requestMetadata.{name} is required")
    return RequestMetadata(**values, extra=extra)


def _encryption_algorithm(document: dict[str, Any]) -> None:
    algorithm = _required_string(document, "encryptionAlgorithm")
    if algorithm not in SUPPORTED_ENCRYPTION_ALGORITHMS:
        raise UnsupportedOperationException("encryptionAlgorithm must be AES_GCM")


def _encrypt(document: dict[str, Any], limits: RequestLimits) -> EncryptRequest:
    metadata = _metadata(document, principal=True, key_arn=True)
    _encryption_algorithm(document)
    plaintext = _b64_field(document, "plaintext", required=True)
    assert plaintext is not None
    if len(plaintext) > limits.max_plaintext_bytes:
        raise UnsupportedOperationException(
            f"plaintext longer than {limits.max_plaintext_bytes} bytes is not supported"
        )
    aad = _aad(document, limits)
    cdiv_algorithm = _optional_string(document, "ciphertextDataIntegrityValueAlgorithm")
    if cdiv_algorithm is not None and cdiv_algorithm not in SUPPORTED_CDIV_ALGORITHMS:
        raise UnsupportedOperationException("ciphertextDataIntegrityValueAlgorithm must be SHA_256")
    return EncryptRequest(metadata, plaintext, aad, cdiv_algorithm)


def _decrypt(document: dict[str, Any], limits: RequestLimits) -> DecryptRequest:
    metadata = _metadata(document, principal=True, key_arn=True)
    _encryption_algorithm(document)
    ciphertext = _b64_field(document, "ciphertext", required=True)
    assert ciphertext is not None
    if len(ciphertext) > limits.max_plaintext_bytes:
        raise UnsupportedOperationException(
            f"ciphertext longer than {limits.max_plaintext_bytes} bytes is not supported"
        )
    iv = _b64_field(document, "initializationVector", required=True)
    assert iv is not None
    if len(iv) not in VALID_IV_LENGTHS:
        raise ValidationException("initializationVector must be 12 or 16 bytes")
    tag = _b64_field(document, "authenticationTag", required=True)
    assert tag is not None
    if len(tag) != TAG_LENGTH:
        raise ValidationException("authenticationTag must be 16 bytes")
    aad = _aad(document, limits)
    ciphertext_metadata = _b64_field(document, "ciphertextMetadata", required=False)
    if ciphertext_metadata is not None and len(ciphertext_metadata) > MAX_CIPHERTEXT_METADATA_BYTES:
        raise ValidationException("ciphertextMetadata must not exceed 20 bytes")
    return DecryptRequest(metadata, ciphertext, iv, tag, aad, ciphertext_metadata)


def _aad(document: dict[str, Any], limits: RequestLimits) -> bytes | None:
    aad = _b64_field(document, "additionalAuthenticatedData", required=False)
    if aad is not None and len(aad) > limits.max_aad_bytes:
        raise UnsupportedOperationException(
            f"additionalAuthenticatedData longer than {limits.max_aad_bytes} bytes is not supported"
        )
    return aad


def _required_string(document: dict[str, Any], name: str) -> str:
    value = _optional_string(document, name)
    if value is None:
        raise ValidationException(f"{name} is required")
    return value


def _optional_string(document: dict[str, Any], name: str) -> str | None:
    if name not in document:
        return None
    value = document[name]
    if not isinstance(value, str):
        raise ValidationException(f"{name} must be a string")
    return value


def _b64_field(document: dict[str, Any], name: str, *, required: bool) -> bytes | None:
    value = _optional_string(document, name)
    if value is None:
        if required:
            raise ValidationException(f"{name} is required")
        return None
    return decode_b64(value, name)


def decode_b64(value: str, name: str) -> bytes:
    """Strict standard base64 (RFC 4648 section 4): padded, canonical, no whitespace."""
    if len(value) % 4:
        raise ValidationException(f"{name} is not valid base64")
    try:
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValidationException(f"{name} is not valid base64") from None
    # Reject non-canonical encodings (stray bits in the last character): one
    # ciphertext must have exactly one textual form.
    if value.endswith("=") and base64.b64encode(decoded).decode("ascii") != value:
        raise ValidationException(f"{name} is not valid base64")
    return decoded
