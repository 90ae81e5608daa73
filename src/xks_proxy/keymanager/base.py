"""The key-manager port: what the protocol core needs from an external key manager.

Adapters (PKCS#11 today) implement :class:`KeyManager`. Methods are synchronous and
may block; the service layer runs them off the event loop. Adapters raise only
:mod:`xks_proxy.protocol.errors` exceptions, mapped in one place per adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

GCM_TAG_BYTES = 16
GCM_IV_BYTES = 12

# Usage names as GetKeyMetadata reports them (spec: GetKeyMetadata, keyUsage).
USAGE_ORDER: tuple[str, ...] = ("ENCRYPT", "DECRYPT", "SIGN", "VERIFY", "WRAP", "UNWRAP", "DERIVE")


@dataclass(frozen=True, slots=True)
class KeyDescription:
    """What the key manager knows about one external key."""

    key_spec: str  # "AES_256" for every key XKS can use
    key_usage: tuple[str, ...]  # subset of USAGE_ORDER, in that order
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class GcmCiphertext:
    """The output of one AES-GCM encryption inside the key manager."""

    iv: bytes
    ciphertext: bytes
    tag: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class EkmInfo:
    """Identity of one external key manager, for GetHealthStatus."""

    vendor: str
    id: str
    model: str


class KeyManager(Protocol):
    """An external key manager holding AES-256 keys addressed by external key id."""

    def describe_key(self, external_key_id: str) -> KeyDescription:
        """Key spec, usages and status; KeyNotFoundException if absent."""
        ...

    def encrypt(self, external_key_id: str, plaintext: bytes, hsm_aad: bytes) -> GcmCiphertext:
        """AES-256-GCM encrypt with a fresh IV; the tag is split from the ciphertext."""
        ...

    def decrypt(
        self, external_key_id: str, ciphertext: bytes, iv: bytes, tag: bytes, hsm_aad: bytes
    ) -> bytes:
        """AES-256-GCM decrypt; InvalidCiphertextException when the tag does not verify."""
        ...

    def health_check(self) -> None:
        """One encrypt+decrypt round trip on the dedicated health-check key; raises on failure."""
        ...

    def info(self) -> EkmInfo:
        """Vendor, id and model of the key manager (token info for PKCS#11)."""
        ...

    def close(self) -> None:
        """Release sessions and the library."""
        ...
