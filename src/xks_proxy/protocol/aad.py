"""The AAD handed to AES-GCM inside the HSM (spec: Encrypt, ciphertextMetadata NOTE).

``u16be(len(AAD)) || AAD || u8(len(metadata)) || metadata``; an absent field counts
as length 0. The explicit lengths stop a caller from moving bytes between the AAD
and the ciphertextMetadata.
"""

from __future__ import annotations

MAX_AAD_BYTES = 0xFFFF  # the length prefix is two bytes
MAX_CIPHERTEXT_METADATA_BYTES = 20


def hsm_aad(aad: bytes | None, ciphertext_metadata: bytes | None) -> bytes:
    """Build the key manager's AAD from the request AAD and the ciphertextMetadata."""
    aad = aad or b""
    metadata = ciphertext_metadata or b""
    if len(aad) > MAX_AAD_BYTES:
        raise ValueError("additionalAuthenticatedData longer than 65535 bytes")
    if len(metadata) > MAX_CIPHERTEXT_METADATA_BYTES:
        raise ValueError("ciphertextMetadata longer than 20 bytes")
    return len(aad).to_bytes(2, "big") + aad + len(metadata).to_bytes(1, "big") + metadata
