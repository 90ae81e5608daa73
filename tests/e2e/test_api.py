"""The four XKS APIs end to end: a real server process, a real SoftHSMv2 token, requests
signed by botocore's SigV4 signer. Each test names the spec section it checks."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from e2e.conftest import (
    CREDENTIAL,
    OTHER_CREDENTIAL,
    OTHER_PREFIX,
    SECOND_CREDENTIAL,
    Proxy,
)

pytestmark = [pytest.mark.e2e, pytest.mark.hsm]

PRINCIPAL = "arn:aws:iam::123456789012:user/Alice"
KEY_ARN = "arn:aws:kms:us-east-2:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def metadata(operation: str = "Encrypt", **extra: str) -> dict[str, str]:
    return {
        "awsPrincipalArn": PRINCIPAL,
        "kmsKeyArn": KEY_ARN,
        "kmsOperation": operation,
        "kmsRequestId": str(uuid.uuid4()),
        **extra,
    }


def encrypt_body(plaintext: bytes, aad: bytes | None = None, cdiv: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "requestMetadata": metadata("GenerateDataKey"),
        "plaintext": b64(plaintext),
        "encryptionAlgorithm": "AES_GCM",
    }
    if aad is not None:
        body["additionalAuthenticatedData"] = b64(aad)
    if cdiv:
        body["ciphertextDataIntegrityValueAlgorithm"] = "SHA_256"
    return body


def decrypt_body(
    encrypted: dict[str, Any], aad: bytes | None = None, **override: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "requestMetadata": metadata("Decrypt"),
        "ciphertext": encrypted["ciphertext"],
        "initializationVector": encrypted["initializationVector"],
        "authenticationTag": encrypted["authenticationTag"],
        "encryptionAlgorithm": "AES_GCM",
    }
    if "ciphertextMetadata" in encrypted:
        body["ciphertextMetadata"] = encrypted["ciphertextMetadata"]
    if aad is not None:
        body["additionalAuthenticatedData"] = b64(aad)
    body.update(override)
    return {k: v for k, v in body.items() if v is not None}


def assert_error(response: Any, status: int, name: str) -> None:
    assert response.status == status, response.body
    assert b"\n" not in response.body  # the compliance client reads the last line
    body = response.json
    assert body["errorName"] == name
    assert 0 < len(body["errorMessage"]) < 512
    assert response.headers["content-type"] == "application/json"


# ---------------------------------------------------------------- GetHealthStatus


def test_health_status_shape(proxy: Proxy) -> None:
    """Spec: GetHealthStatus response payload."""
    response = proxy.call(
        "health", {"requestMetadata": {"kmsRequestId": "h1", "kmsOperation": "KmsHealthCheck"}}
    )
    assert response.status == 200, response.body
    body = response.json
    assert body["xksProxyFleetSize"] == 3
    assert body["xksProxyVendor"] and body["ekmVendor"]
    assert body["xksProxyModel"].startswith("xks-proxy ")
    assert 1 <= len(body["ekmFleetDetails"]) <= 10
    member = body["ekmFleetDetails"][0]
    assert member["healthStatus"] == "ACTIVE" and member["id"] and member["model"]
    assert b'"healthStatus":' in response.body


@pytest.mark.parametrize("body", [b"{}", b'{"requestMetadata": {}}', b"not json"])
def test_health_bad_input_is_validation_exception(proxy: Proxy, body: bytes) -> None:
    """The official compliance client expects ValidationException for health with bad metadata."""
    assert_error(proxy.call("health", body), 400, "ValidationException")


# ---------------------------------------------------------------- GetKeyMetadata


@pytest.mark.parametrize(
    ("key", "usage"),
    [
        ("foo", ["ENCRYPT", "DECRYPT"]),
        ("encrypt_only_key", ["ENCRYPT"]),
        ("decrypt_only_key", ["DECRYPT"]),
        ("impotent_key", []),
    ],
)
def test_key_metadata(proxy: Proxy, key: str, usage: list[str]) -> None:
    """Spec: GetKeyMetadata — keySpec AES_256, keyUsage from the HSM, keyStatus."""
    body = {
        "requestMetadata": {
            "awsPrincipalArn": PRINCIPAL,
            "kmsOperation": "CreateKey",
            "kmsRequestId": "m",
        }
    }
    response = proxy.call(f"keys/{key}/metadata", body)
    assert response.status == 200, response.body
    assert response.json == {"keySpec": "AES_256", "keyUsage": usage, "keyStatus": "ENABLED"}


def test_unknown_keys_are_key_not_found(proxy: Proxy) -> None:
    """Spec: Error codes — KeyNotFoundException for a missing external key."""
    body = {"requestMetadata": metadata("DescribeKey")}
    # Allowed by the key store but absent from the HSM:
    assert_error(proxy.call("keys/not_on_the_hsm/metadata", body), 404, "KeyNotFoundException")
    # Present on the HSM but not in this key store's external_key_ids:
    assert_error(proxy.call("keys/xks-health-check/metadata", body), 404, "KeyNotFoundException")
    assert_error(
        proxy.call("keys/non_existing_key/encrypt", encrypt_body(b"x")), 404, "KeyNotFoundException"
    )


# ---------------------------------------------------------------- Encrypt / Decrypt


def test_round_trip_with_aad_and_cdiv(proxy: Proxy) -> None:
    """Spec: Encrypt/Decrypt and Appendix C — CDIV recomputed independently here."""
    plaintext, aad = b"data key " * 4, b"project=nile,department=marketing"
    response = proxy.call("keys/foo/encrypt", encrypt_body(plaintext, aad, cdiv=True))
    assert response.status == 200, response.body
    encrypted = response.json
    ciphertext = base64.b64decode(encrypted["ciphertext"])
    iv = base64.b64decode(encrypted["initializationVector"])
    tag = base64.b64decode(encrypted["authenticationTag"])
    assert len(ciphertext) == len(plaintext) and len(iv) == 12 and len(tag) == 16
    assert "ciphertextMetadata" not in encrypted
    expected_cdiv = hashlib.sha256(aad + iv + ciphertext + tag).digest()
    assert base64.b64decode(encrypted["ciphertextDataIntegrityValue"]) == expected_cdiv
    decrypted = proxy.call("keys/foo/decrypt", decrypt_body(encrypted, aad))
    assert decrypted.status == 200, decrypted.body
    assert decrypted.json == {"plaintext": b64(plaintext)}


def test_no_cdiv_unless_asked(proxy: Proxy) -> None:
    response = proxy.call("keys/foo/encrypt", encrypt_body(b"abc"))
    assert response.status == 200
    assert "ciphertextDataIntegrityValue" not in response.json


def test_spec_minimum_sizes(proxy: Proxy) -> None:
    """Spec: 4300 bytes of plaintext/ciphertext and 8192 bytes of AAD MUST work."""
    plaintext, aad = bytes(range(256)) * 16 + b"x" * 204, b"a" * 8192
    assert len(plaintext) == 4300
    encrypted = proxy.call("keys/foo/encrypt", encrypt_body(plaintext, aad, cdiv=True))
    assert encrypted.status == 200, encrypted.body
    decrypted = proxy.call("keys/foo/decrypt", decrypt_body(encrypted.json, aad))
    assert base64.b64decode(decrypted.json["plaintext"]) == plaintext


def test_empty_plaintext(proxy: Proxy) -> None:
    encrypted = proxy.call("keys/foo/encrypt", encrypt_body(b""))
    assert encrypted.status == 200, encrypted.body
    assert encrypted.json["ciphertext"] == ""
    assert proxy.call("keys/foo/decrypt", decrypt_body(encrypted.json)).json == {"plaintext": ""}


def flip(value: str) -> str:
    raw = bytearray(base64.b64decode(value))
    raw[0] ^= 1
    return b64(bytes(raw))


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda e: ({"additionalAuthenticatedData": None}, None), id="missing-aad"),
        pytest.param(lambda e: ({}, b"other aad"), id="different-aad"),
        pytest.param(
            lambda e: ({"authenticationTag": flip(e["authenticationTag"])}, b"aad"), id="tag"
        ),
        pytest.param(lambda e: ({"ciphertext": flip(e["ciphertext"])}, b"aad"), id="ciphertext"),
        pytest.param(
            lambda e: ({"initializationVector": flip(e["initializationVector"])}, b"aad"), id="iv"
        ),
        pytest.param(
            lambda e: ({"initializationVector": b64(b"\0" * 16)}, b"aad"), id="16-byte-iv"
        ),
        pytest.param(lambda e: ({"ciphertextMetadata": b64(b"v1")}, b"aad"), id="added-metadata"),
    ],
)
def test_tampering_is_invalid_ciphertext(proxy: Proxy, tamper: Any) -> None:
    """Spec: Decrypt — InvalidCiphertextException for anything altered."""
    encrypted = proxy.call("keys/foo/encrypt", encrypt_body(b"secret data", b"aad")).json
    override, aad = tamper(encrypted)
    body = decrypt_body(encrypted, aad if aad is not None else None, **override)
    if aad is None:
        body.pop("additionalAuthenticatedData", None)
    assert_error(proxy.call("keys/foo/decrypt", body), 400, "InvalidCiphertextException")


def test_metadata_is_bound_to_the_ciphertext(proxy: Proxy) -> None:
    """Spec: ciphertextMetadata NOTE — moving metadata into the AAD must fail."""
    other = proxy.process
    path = f"/{OTHER_PREFIX}/kms/xks/v1/keys/foo/"
    encrypted = other.request(
        "POST", path + "encrypt", encrypt_body(b"k" * 32), credential=OTHER_CREDENTIAL
    )
    assert encrypted.status == 200, encrypted.body
    assert base64.b64decode(encrypted.json["ciphertextMetadata"]) == b"xks:v1"
    ok = other.request(
        "POST", path + "decrypt", decrypt_body(encrypted.json), credential=OTHER_CREDENTIAL
    )
    assert ok.json == {"plaintext": b64(b"k" * 32)}
    moved = decrypt_body(encrypted.json, b"xks:v1", ciphertextMetadata=None)
    assert_error(
        other.request("POST", path + "decrypt", moved, credential=OTHER_CREDENTIAL),
        400,
        "InvalidCiphertextException",
    )
    changed = decrypt_body(encrypted.json, ciphertextMetadata=b64(b"xks:v2"))
    assert_error(
        other.request("POST", path + "decrypt", changed, credential=OTHER_CREDENTIAL),
        400,
        "InvalidCiphertextException",
    )


def test_key_usage_is_enforced(proxy: Proxy) -> None:
    """Spec: Error codes — InvalidKeyUsageException (compliance client's key set)."""
    encrypted = proxy.call("keys/encrypt_only_key/encrypt", encrypt_body(b"x"))
    assert encrypted.status == 200
    assert_error(
        proxy.call("keys/encrypt_only_key/decrypt", decrypt_body(encrypted.json)),
        400,
        "InvalidKeyUsageException",
    )
    # CDIV needs a verifying decrypt, which an encrypt-only key cannot do.
    assert_error(
        proxy.call("keys/encrypt_only_key/encrypt", encrypt_body(b"x", cdiv=True)),
        400,
        "InvalidKeyUsageException",
    )
    for key in ("decrypt_only_key", "impotent_key"):
        assert_error(
            proxy.call(f"keys/{key}/encrypt", encrypt_body(b"x")), 400, "InvalidKeyUsageException"
        )
    foo = proxy.call("keys/foo/encrypt", encrypt_body(b"x")).json
    assert_error(
        proxy.call("keys/impotent_key/decrypt", decrypt_body(foo)), 400, "InvalidKeyUsageException"
    )
    # A decrypt-only key decrypts, but not what another key encrypted.
    assert_error(
        proxy.call("keys/decrypt_only_key/decrypt", decrypt_body(foo)),
        400,
        "InvalidCiphertextException",
    )


# ---------------------------------------------------------------- validation and limits


def test_validation_errors(proxy: Proxy) -> None:
    """Spec: Error codes — ValidationException for bad input."""
    missing_plaintext = encrypt_body(b"x")
    del missing_plaintext["plaintext"]
    assert_error(proxy.call("keys/foo/encrypt", missing_plaintext), 400, "ValidationException")
    assert_error(proxy.call("keys/foo/metadata", b"{}"), 400, "ValidationException")
    bad_b64 = encrypt_body(b"x")
    bad_b64["plaintext"] = "not base64!"
    assert_error(proxy.call("keys/foo/encrypt", bad_b64), 400, "ValidationException")
    short_tag = decrypt_body(
        proxy.call("keys/foo/encrypt", encrypt_body(b"x")).json, authenticationTag=b64(b"t" * 8)
    )
    assert_error(proxy.call("keys/foo/decrypt", short_tag), 400, "ValidationException")
    bad_key_id = "k" * 129
    assert_error(
        proxy.call(f"keys/{bad_key_id}/metadata", {"requestMetadata": metadata()}),
        400,
        "ValidationException",
    )


def test_unknown_kms_operation_and_fields_are_accepted(proxy: Proxy) -> None:
    """Spec: MUST NOT reject an unknown kmsOperation; Appendix B: new metadata fields."""
    body = encrypt_body(b"x")
    body["requestMetadata"]["kmsOperation"] = "BulkEncrypt"
    body["requestMetadata"]["kmsRecipientAttestationImageSha384"] = "abc"
    body["futureField"] = {"nested": True}
    assert proxy.call("keys/foo/encrypt", body).status == 200


def test_oversized_inputs_get_clean_errors(proxy: Proxy) -> None:
    """AAD over the configured limit (the AWS sample panics past 65,535) and bodies over
    the cap answer 501."""
    encrypted = proxy.call("keys/foo/encrypt", encrypt_body(b"x")).json
    assert_error(
        proxy.call("keys/foo/decrypt", decrypt_body(encrypted, b"a" * 40000)),
        501,
        "UnsupportedOperationException",
    )
    # Over max_body_bytes (64 KiB here): refused before the body is read or authenticated.
    response = proxy.call("keys/foo/decrypt", b"{" + b" " * 70000 + b"}")
    assert_error(response, 501, "UnsupportedOperationException")
    # And the proxy is still fine afterwards.
    assert proxy.call("keys/foo/encrypt", encrypt_body(b"x")).status == 200


# ---------------------------------------------------------------- authentication and paths


def test_second_credential_works(proxy: Proxy) -> None:
    """Spec: SigV4 credentials rotation — two live credentials per key store."""
    assert (
        proxy.call("keys/foo/encrypt", encrypt_body(b"x"), credential=SECOND_CREDENTIAL).status
        == 200
    )


@pytest.mark.parametrize(
    "credential",
    [
        ("Invalid" + CREDENTIAL[0], CREDENTIAL[1]),
        (CREDENTIAL[0], "Invalid" + CREDENTIAL[1]),
        (SECOND_CREDENTIAL[0], CREDENTIAL[1]),
    ],
    ids=["unknown-access-key", "wrong-secret", "mixed-credentials"],
)
def test_bad_signatures_are_authentication_failed(
    proxy: Proxy, credential: tuple[str, str]
) -> None:
    """Spec: Authentication — 401 AuthenticationFailedException."""
    for tail, body in (
        ("health", {"requestMetadata": metadata()}),
        ("keys/foo/encrypt", encrypt_body(b"x")),
    ):
        assert_error(
            proxy.call(tail, body, credential=credential), 401, "AuthenticationFailedException"
        )


def test_unsigned_and_stale_requests_are_rejected(proxy: Proxy) -> None:
    """Spec: Appendix A Task 4 — requests more than 5 minutes old or ahead fail."""
    assert_error(
        proxy.process.request("POST", proxy.path("health"), {"requestMetadata": metadata()}),
        401,
        "AuthenticationFailedException",
    )
    for skew in (-330, 330):
        response = proxy.call("keys/foo/encrypt", encrypt_body(b"x"), timestamp=time.time() + skew)
        assert_error(response, 401, "AuthenticationFailedException")
    assert (
        proxy.call("keys/foo/encrypt", encrypt_body(b"x"), timestamp=time.time() - 200).status
        == 200
    )


def test_body_is_covered_by_the_signature(proxy: Proxy) -> None:
    from e2e.proxy import sign

    data = json.dumps(encrypt_body(b"x")).encode()
    url = proxy.process.base_url + proxy.path("keys/foo/encrypt")
    headers = sign("POST", url, data, CREDENTIAL, {"Content-Type": "application/json"})
    tampered = data.replace(b'"eA=="', b'"eQ=="')
    assert tampered != data
    response = proxy.process.request(
        "POST", proxy.path("keys/foo/encrypt"), tampered, headers=headers
    )
    assert_error(response, 401, "AuthenticationFailedException")


def test_uri_paths(proxy: Proxy) -> None:
    """Spec: Error codes — InvalidUriPathException for a bad path or prefix."""
    body = {"requestMetadata": metadata()}
    wrong_prefix = proxy.path("health", "/example/uri/path/prefix/invalid")
    assert_error(
        proxy.process.request("POST", wrong_prefix, body, credential=CREDENTIAL),
        404,
        "InvalidUriPathException",
    )
    # A valid credential of another key store does not open this prefix.
    assert_error(
        proxy.process.request("POST", proxy.path("health"), body, credential=OTHER_CREDENTIAL),
        404,
        "InvalidUriPathException",
    )
    for path in ("/", "/kms/xks/v1/health", proxy.path("keys/foo"), proxy.path("keys/foo/sign")):
        response = proxy.process.request("POST", path, body, credential=CREDENTIAL)
        assert_error(response, 404, "InvalidUriPathException")


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_other_methods_are_405(proxy: Proxy, method: str) -> None:
    """Spec: API operations — a GET on an API URI MUST be rejected with 405."""
    for tail in ("health", "keys/foo/encrypt", "keys/foo/metadata"):
        response = proxy.process.request(method, proxy.path(tail))
        assert response.status == 405
        assert response.headers["allow"] == "POST"
        assert response.json["errorName"]


# ---------------------------------------------------------------- concurrency and logging


def test_concurrent_requests(proxy: Proxy) -> None:
    """Many clients at once: every answer right, none lost."""

    def one(index: int) -> bool:
        plaintext = index.to_bytes(4, "big") * 8
        encrypted = proxy.call("keys/foo/encrypt", encrypt_body(plaintext, b"ctx", cdiv=True))
        if encrypted.status != 200:
            return False
        decrypted = proxy.call("keys/foo/decrypt", decrypt_body(encrypted.json, b"ctx"))
        return (
            decrypted.status == 200 and base64.b64decode(decrypted.json["plaintext"]) == plaintext
        )

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(one, range(300)))
    assert all(results)


def test_request_log_has_metadata_and_never_secrets(proxy: Proxy) -> None:
    """Spec: Logging — log requestMetadata and latency; never plaintext, AAD or secrets."""
    marker = b"PLAINTEXT-MARKER-5f1d"
    aad_marker = b"AAD-MARKER-77aa"
    body = encrypt_body(marker, aad_marker, cdiv=True)
    request_id = body["requestMetadata"]["kmsRequestId"]
    encrypted = proxy.call("keys/foo/encrypt", body)
    assert encrypted.status == 200
    decrypt = decrypt_body(encrypted.json, aad_marker)
    proxy.call("keys/foo/decrypt", decrypt)
    proxy.call("keys/foo/decrypt", decrypt_body(encrypted.json, b"wrong"))
    time.sleep(0.3)
    log = proxy.process.log_text()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("kmsRequestId") == request_id]
    assert len(mine) == 1
    record = mine[0]
    assert record["operation"] == "Encrypt" and record["status"] == 200
    assert record["keyStore"] == "main" and record["externalKeyId"] == "foo"
    assert record["awsPrincipalArn"] == PRINCIPAL and record["kmsOperation"] == "GenerateDataKey"
    assert isinstance(record["latencyMs"], float)
    assert any(line.get("errorName") == "InvalidCiphertextException" for line in lines)
    for secret in (
        marker,
        b64(marker).encode(),
        aad_marker,
        b64(aad_marker).encode(),
        CREDENTIAL[1].encode(),
        SECOND_CREDENTIAL[1].encode(),
        OTHER_CREDENTIAL[1].encode(),
    ):
        assert secret.decode() not in log


def test_refused_signed_requests_still_log_their_kms_request_id(proxy: Proxy) -> None:
    """Spec: Logging — kmsRequestId is in the log line of a request refused for its
    content (400 ValidationException), not only of requests that succeed."""
    body = encrypt_body(b"x" * 16)
    body["plaintext"] = "not base64 at all!"
    request_id = body["requestMetadata"]["kmsRequestId"]
    refused = proxy.call("keys/foo/encrypt", body)
    assert refused.status == 400 and refused.json["errorName"] == "ValidationException"
    time.sleep(0.3)
    lines = [
        json.loads(line) for line in proxy.process.log_text().splitlines() if line.startswith("{")
    ]
    mine = [line for line in lines if line.get("kmsRequestId") == request_id]
    assert len(mine) == 1, "the refused request's line lacks its kmsRequestId"
    assert mine[0]["errorName"] == "ValidationException"
    assert mine[0]["kmsOperation"] == "GenerateDataKey"
