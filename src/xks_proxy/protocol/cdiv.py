"""Ciphertext Data Integrity Value (spec: Appendix C).

CDIV = SHA-256(AAD || ciphertextMetadata || IV || ciphertext || tag) over the raw
(decoded) bytes, absent fields as empty. Computed from the encrypt output *before*
the verifying decrypt, so corruption after that point cannot go unnoticed.
"""

from __future__ import annotations

import hashlib

SUPPORTED_CDIV_ALGORITHMS = ("SHA_256",)


def ciphertext_data_integrity_value(
    aad: bytes | None,
    ciphertext_metadata: bytes | None,
    iv: bytes,
    ciphertext: bytes,
    tag: bytes,
) -> bytes:
    """Return the raw SHA-256 CDIV digest (base64-encode it for the response)."""
    digest = hashlib.sha256()
    if aad:
        digest.update(aad)
    if ciphertext_metadata:
        digest.update(ciphertext_metadata)
    digest.update(iv)
    digest.update(ciphertext)
    digest.update(tag)
    return digest.digest()
