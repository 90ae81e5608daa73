"""Compatibility with ciphertexts made by the AWS sample proxy (aws-samples/aws-kms-xks-proxy).

The sample gives the HSM a different AES-GCM AAD than the spec's construction
(:func:`xks_proxy.protocol.aad.hsm_aad`)::

    sample:  u16be(len(AAD)) || [SHA-256(AAD)] || u8(len(metadata)) || metadata
    spec:    u16be(len(AAD)) ||  AAD           || u8(len(metadata)) || metadata

The digest is there whenever the request *has* the AAD field, even when it is empty;
an absent AAD contributes only its zero length. See docs/migration.md for the source
lines this was read from.

A key store in compatibility mode (``compatibility = "aws-sample"``) never encrypts the
sample's way. New ciphertexts use the spec construction and carry a marker in
ciphertextMetadata (spec: Encrypt, the NOTE on ciphertextMetadata: "encode the new
behavior in the ciphertextMetadata")::

    ciphertextMetadata = b"~XK1" || operator metadata (0-16 bytes of printable ASCII)

On decrypt the metadata alone picks exactly one construction, before the HSM is
called (:func:`decrypt_constructions`):

- starts with ``~XK1`` and is printable ASCII      -> the spec construction
- contains ``~XK`` anywhere else (or another version) -> none: InvalidCiphertext
- anything else (absent, empty, the sample's own)  -> the sample construction

With these rules no byte string the HSM receives on one route can be produced on the
other (proof in docs/migration.md), so moving bytes between AAD and metadata can
never make a ciphertext decrypt under the construction it was not made with.
"""

from __future__ import annotations

import enum
import hashlib

from xks_proxy.protocol.aad import MAX_AAD_BYTES, MAX_CIPHERTEXT_METADATA_BYTES, hsm_aad

COMPATIBILITY_AWS_SAMPLE = "aws-sample"  # the key store setting's value

MARKER_FAMILY = b"~XK"  # reserved: every marker version starts with it
MARKER_V1 = MARKER_FAMILY + b"1"  # v1: the spec construction (raw AAD, both lengths)
MAX_OPERATOR_METADATA_BYTES = MAX_CIPHERTEXT_METADATA_BYTES - len(MARKER_V1)  # 16

_PRINTABLE_LOW = 0x20
_PRINTABLE_HIGH = 0x7E


class Construction(enum.Enum):
    """How the AAD given to the HSM is built from the request's AAD and metadata."""

    SPEC = "spec"  # xks_proxy.protocol.aad.hsm_aad
    AWS_SAMPLE = "aws-sample"  # sample_hsm_aad


def sample_hsm_aad(aad: bytes | None, ciphertext_metadata: bytes | None) -> bytes:
    """The AAD the AWS sample proxy gave the HSM, byte for byte.

    ``aad`` None means the request had no additionalAuthenticatedData field; ``b""``
    means it had an empty one (the sample then still hashes it). An absent and an
    empty ciphertextMetadata are the same to the sample (length byte 0, no bytes).
    """
    metadata = ciphertext_metadata or b""
    if len(metadata) > MAX_CIPHERTEXT_METADATA_BYTES:
        raise ValueError("ciphertextMetadata longer than 20 bytes")
    if aad is None:
        head = b"\x00\x00"
    else:
        if len(aad) > MAX_AAD_BYTES:  # the sample panics here; no such ciphertext exists
            raise ValueError("additionalAuthenticatedData longer than 65535 bytes")
        head = len(aad).to_bytes(2, "big") + hashlib.sha256(aad).digest()
    return head + len(metadata).to_bytes(1, "big") + metadata


def construction_aad(
    construction: Construction, aad: bytes | None, ciphertext_metadata: bytes | None
) -> bytes:
    """The HSM's AAD under ``construction``."""
    if construction is Construction.AWS_SAMPLE:
        return sample_hsm_aad(aad, ciphertext_metadata)
    return hsm_aad(aad, ciphertext_metadata)


def _printable(data: bytes) -> bool:
    return all(_PRINTABLE_LOW <= byte <= _PRINTABLE_HIGH for byte in data)


def operator_metadata_problem(operator_metadata: bytes | None) -> str | None:
    """Why a key store's own ciphertext_metadata cannot follow the marker, or None."""
    if not operator_metadata:
        return None
    if len(operator_metadata) > MAX_OPERATOR_METADATA_BYTES:
        return (
            f"must be at most {MAX_OPERATOR_METADATA_BYTES} bytes in compatibility mode "
            f"(the {len(MARKER_V1)}-byte marker {MARKER_V1.decode()} comes first)"
        )
    if not _printable(operator_metadata):
        return "must be printable ASCII in compatibility mode"
    return None


def compat_ciphertext_metadata(operator_metadata: bytes | None) -> bytes:
    """The ciphertextMetadata a compatibility-mode key store returns from Encrypt.

    ``MARKER_V1 || operator_metadata``; raises ValueError when the operator's part is
    too long or not printable ASCII (check it at config load with
    :func:`operator_metadata_problem`).
    """
    problem = operator_metadata_problem(operator_metadata)
    if problem is not None:
        raise ValueError(f"ciphertext_metadata {problem}")
    return MARKER_V1 + (operator_metadata or b"")


def is_marked(ciphertext_metadata: bytes | None) -> bool:
    """True if the metadata is a well-formed v1 marker (made by a compat-mode Encrypt)."""
    metadata = ciphertext_metadata or b""
    return (
        metadata.startswith(MARKER_V1)
        and len(metadata) <= MAX_CIPHERTEXT_METADATA_BYTES
        and _printable(metadata)
    )


def legacy_metadata_problem(ciphertext_metadata: bytes | None) -> str | None:
    """Why ciphertexts the sample made with this metadata could not be routed, or None.

    Used on the sample's ``ciphertext_metadata_b64`` when importing its settings.
    """
    metadata = ciphertext_metadata or b""
    if len(metadata) > MAX_CIPHERTEXT_METADATA_BYTES:
        return "is longer than 20 bytes"
    if MARKER_FAMILY in metadata:
        return f"contains {MARKER_FAMILY.decode()!r}, which compatibility mode reserves"
    return None


def decrypt_constructions(ciphertext_metadata: bytes | None) -> list[Construction]:
    """Which AAD construction to use for a Decrypt in a compatibility-mode key store.

    Never more than one: ``[SPEC]`` for a v1 marker, ``[AWS_SAMPLE]`` for metadata
    without any ``~XK``, and ``[]`` (answer InvalidCiphertextException without calling
    the HSM) for everything else. Never try a second construction after a failure.
    """
    metadata = ciphertext_metadata or b""
    if len(metadata) > MAX_CIPHERTEXT_METADATA_BYTES:
        return []
    if is_marked(metadata):
        return [Construction.SPEC]
    if MARKER_FAMILY in metadata:
        return []  # malformed or unknown marker version, or a marker moved inside
    return [Construction.AWS_SAMPLE]
