"""Requests and responses of the four XKS APIs, as typed values (spec: API operations)."""

from __future__ import annotations

import base64
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class XksOperation(enum.Enum):
    """The four XKS APIs; the value is the name used in logs, metrics and policies."""

    GET_KEY_METADATA = "GetKeyMetadata"
    ENCRYPT = "Encrypt"
    DECRYPT = "Decrypt"
    GET_HEALTH_STATUS = "GetHealthStatus"


@dataclass(frozen=True, slots=True)
class RequestMetadata:
    """requestMetadata (spec: Appendix B). Unknown fields are kept in ``extra``."""

    kms_request_id: str
    kms_operation: str
    aws_principal_arn: str | None = None
    kms_key_arn: str | None = None
    aws_source_vpc: str | None = None
    aws_source_vpce: str | None = None
    kms_via_service: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GetKeyMetadataRequest:
    metadata: RequestMetadata


@dataclass(frozen=True, slots=True)
class EncryptRequest:
    metadata: RequestMetadata
    plaintext: bytes = field(repr=False)
    aad: bytes | None = field(repr=False)
    cdiv_algorithm: str | None


@dataclass(frozen=True, slots=True)
class DecryptRequest:
    metadata: RequestMetadata
    ciphertext: bytes = field(repr=False)
    iv: bytes
    tag: bytes
    aad: bytes | None = field(repr=False)
    ciphertext_metadata: bytes | None


@dataclass(frozen=True, slots=True)
class GetHealthStatusRequest:
    metadata: RequestMetadata


XksRequest = GetKeyMetadataRequest | EncryptRequest | DecryptRequest | GetHealthStatusRequest


def b64(data: bytes) -> str:
    """Standard base64 with padding, as every binary field of the spec uses."""
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True, slots=True)
class GetKeyMetadataResponse:
    key_spec: str
    key_usage: tuple[str, ...]
    key_status: str

    def to_json(self) -> dict[str, Any]:
        return {
            "keySpec": self.key_spec,
            "keyUsage": list(self.key_usage),
            "keyStatus": self.key_status,
        }


@dataclass(frozen=True, slots=True)
class EncryptResponse:
    ciphertext: bytes
    iv: bytes
    tag: bytes
    ciphertext_metadata: bytes | None
    cdiv: bytes | None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "ciphertext": b64(self.ciphertext),
            "initializationVector": b64(self.iv),
            "authenticationTag": b64(self.tag),
        }
        if self.ciphertext_metadata:
            body["ciphertextMetadata"] = b64(self.ciphertext_metadata)
        if self.cdiv is not None:
            body["ciphertextDataIntegrityValue"] = b64(self.cdiv)
        return body


@dataclass(frozen=True, slots=True)
class DecryptResponse:
    plaintext: bytes = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"plaintext": b64(self.plaintext)}


class HealthStatus(enum.Enum):
    ACTIVE = "ACTIVE"
    DEGRADED = "DEGRADED"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True, slots=True)
class EkmFleetMember:
    id: str
    model: str
    health_status: HealthStatus


@dataclass(frozen=True, slots=True)
class GetHealthStatusResponse:
    xks_proxy_fleet_size: int
    xks_proxy_vendor: str
    xks_proxy_model: str
    ekm_vendor: str
    ekm_fleet_details: tuple[EkmFleetMember, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "xksProxyFleetSize": self.xks_proxy_fleet_size,
            "xksProxyVendor": self.xks_proxy_vendor,
            "xksProxyModel": self.xks_proxy_model,
            "ekmVendor": self.ekm_vendor,
            "ekmFleetDetails": [
                {"id": m.id, "model": m.model, "healthStatus": m.health_status.value}
                for m in self.ekm_fleet_details
            ],
        }


XksResponse = GetKeyMetadataResponse | EncryptResponse | DecryptResponse | GetHealthStatusResponse
