"""The XKS service: route -> authenticate -> validate -> one key-manager call -> response.

Transport-free: the server adapter hands in method, path, headers and body and gets
back an :class:`Outcome` (status, JSON body bytes, log fields). Key-manager calls are
blocking and run on a bounded thread pool so the event loop never stalls on the HSM.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

from xks_proxy import PRODUCT_NAME, __version__, sigv4
from xks_proxy.config import KeyStoreConfig, ProxyConfig
from xks_proxy.keymanager.base import EkmInfo, KeyManager
from xks_proxy.keystores import KeyStoreTable
from xks_proxy.protocol.aad import hsm_aad
from xks_proxy.protocol.cdiv import ciphertext_data_integrity_value
from xks_proxy.protocol.errors import (
    InternalException,
    InvalidUriPathException,
    KeyNotFoundException,
    MethodNotAllowed,
    XksError,
)
from xks_proxy.protocol.models import (
    DecryptRequest,
    DecryptResponse,
    EkmFleetMember,
    EncryptRequest,
    EncryptResponse,
    GetHealthStatusResponse,
    GetKeyMetadataResponse,
    HealthStatus,
    RequestMetadata,
    XksOperation,
    XksRequest,
    XksResponse,
)
from xks_proxy.protocol.routing import Route, parse_path, validate_external_key_id
from xks_proxy.protocol.validate import parse_request

logger = logging.getLogger("xks_proxy.service")
T = TypeVar("T")

JSON_HEADERS: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]
ALLOW_POST_HEADERS: list[tuple[bytes, bytes]] = [*JSON_HEADERS, (b"allow", b"POST")]


@dataclass(frozen=True, slots=True)
class _ServiceState:
    config: ProxyConfig
    key_stores: KeyStoreTable


@dataclass(slots=True)
class Outcome:
    """What to answer, and what to log about it."""

    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]]
    log: dict[str, Any] = field(default_factory=dict)


def error_body(error: XksError) -> bytes:
    """Single-line JSON error body in the spec's shape (spec: Error codes)."""
    return orjson.dumps({"errorName": error.error_name, "errorMessage": error.error_message})


def error_outcome(
    error: XksError, headers: list[tuple[bytes, bytes]], log: dict[str, Any] | None = None
) -> Outcome:
    """The answer for an error, with its status and errorName recorded for the log."""
    log = {} if log is None else log
    log["status"] = error.status
    log["errorName"] = error.error_name
    log["errorMessage"] = error.error_message
    return Outcome(error.status, error_body(error), headers, log)


class XksService:
    """The four XKS APIs over one key manager and a table of key stores."""

    def __init__(
        self,
        config: ProxyConfig,
        key_manager: KeyManager,
        executor: Executor | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._state = _ServiceState(config, KeyStoreTable.build(config.key_stores))
        self.key_manager = key_manager
        # One thread per HSM session: more threads would only queue for a session.
        self.executor = executor or ThreadPoolExecutor(
            max_workers=config.hsm.sessions, thread_name_prefix="xks-hsm"
        )
        self.clock = clock
        self.ekm_info: EkmInfo = key_manager.info()

    @property
    def config(self) -> ProxyConfig:
        """The configuration in force."""
        return self._state.config

    def apply_config(self, config: ProxyConfig) -> None:
        """Swap in a new (already validated) configuration in one step.

        Requests already running keep the state they started with; the next request
        sees the new key stores, credentials and limits. HSM settings need a restart.
        """
        self._state = _ServiceState(config, KeyStoreTable.build(config.key_stores))

    def close(self) -> None:
        """Stop the HSM thread pool and release the key manager."""
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.key_manager.close()

    async def handle(
        self,
        method: str,
        raw_path: bytes,
        query_string: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
    ) -> Outcome:
        """Answer one HTTP request; never raises."""
        log: dict[str, Any] = {}
        try:
            response = await self._dispatch(method, raw_path, query_string, headers, body, log)
        except MethodNotAllowed as error:
            return error_outcome(error, ALLOW_POST_HEADERS, log)
        except XksError as error:
            return error_outcome(error, JSON_HEADERS, log)
        except Exception:
            logger.exception("unexpected error while handling a request")
            return error_outcome(InternalException(), JSON_HEADERS, log)
        log["status"] = 200
        return Outcome(200, orjson.dumps(response.to_json()), JSON_HEADERS, log)

    async def _dispatch(
        self,
        method: str,
        raw_path: bytes,
        query_string: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        log: dict[str, Any],
    ) -> XksResponse:
        state = self._state  # one request sees one configuration, even across a reload
        route = _route(raw_path)
        log["operation"] = route.operation.value
        if route.external_key_id is not None:
            log["externalKeyId"] = route.external_key_id[:128]
        if method != "POST":
            raise MethodNotAllowed()
        identity = sigv4.verify_request(
            method=method,
            raw_path=raw_path,
            query_string=query_string,
            headers=headers,
            body=body,
            lookup_secret=state.key_stores.secret_for,
            now=self.clock(),
        )
        log["accessKeyId"] = identity.access_key_id
        key_store = state.key_stores.key_store_for(identity.access_key_id)
        log["keyStore"] = key_store.name
        if key_store.uri_prefix != route.uri_prefix:
            raise InvalidUriPathException("no key store at this URI path for these credentials")
        request = parse_request(route.operation, body, state.config.limits)
        _log_metadata(log, request.metadata)
        if route.operation is XksOperation.GET_HEALTH_STATUS:
            return await self.get_health_status()
        assert route.external_key_id is not None
        external_key_id = route.external_key_id
        validate_external_key_id(external_key_id)
        if (
            key_store.external_key_ids is not None
            and external_key_id not in key_store.external_key_ids
        ):
            raise KeyNotFoundException()
        return await self._key_operation(key_store, external_key_id, request)

    async def _key_operation(
        self, key_store: KeyStoreConfig, external_key_id: str, request: XksRequest
    ) -> XksResponse:
        if isinstance(request, EncryptRequest):
            return await self.encrypt(key_store, external_key_id, request)
        if isinstance(request, DecryptRequest):
            return await self.decrypt(external_key_id, request)
        return await self.get_key_metadata(external_key_id)

    # ------------------------------------------------------------------ the APIs

    async def get_key_metadata(self, external_key_id: str) -> GetKeyMetadataResponse:
        """GetKeyMetadata (spec: GetKeyMetadata)."""
        description = await self._hsm(self.key_manager.describe_key, external_key_id)
        status = "ENABLED" if description.enabled else "DISABLED"
        return GetKeyMetadataResponse(description.key_spec, description.key_usage, status)

    async def encrypt(
        self, key_store: KeyStoreConfig, external_key_id: str, request: EncryptRequest
    ) -> EncryptResponse:
        """Encrypt (spec: Encrypt), with the CDIV procedure of Appendix C when asked."""
        metadata = key_store.ciphertext_metadata
        aad_for_hsm = hsm_aad(request.aad, metadata)
        output = await self._hsm(
            self.key_manager.encrypt, external_key_id, request.plaintext, aad_for_hsm
        )
        if request.cdiv_algorithm is None:
            return EncryptResponse(output.ciphertext, output.iv, output.tag, metadata, None)
        # Appendix C: hash the output first, then prove it decrypts to the input.
        cdiv = ciphertext_data_integrity_value(
            request.aad, metadata, output.iv, output.ciphertext, output.tag
        )
        plaintext = await self._hsm(
            self.key_manager.decrypt,
            external_key_id,
            output.ciphertext,
            output.iv,
            output.tag,
            aad_for_hsm,
        )
        if not hmac.compare_digest(plaintext, request.plaintext):
            raise InternalException("the verifying decrypt did not return the plaintext")
        return EncryptResponse(output.ciphertext, output.iv, output.tag, metadata, cdiv)

    async def decrypt(self, external_key_id: str, request: DecryptRequest) -> DecryptResponse:
        """Decrypt (spec: Decrypt); the tag also covers AAD and ciphertextMetadata."""
        plaintext = await self._hsm(
            self.key_manager.decrypt,
            external_key_id,
            request.ciphertext,
            request.iv,
            request.tag,
            hsm_aad(request.aad, request.ciphertext_metadata),
        )
        return DecryptResponse(plaintext)

    async def get_health_status(self) -> GetHealthStatusResponse:
        """GetHealthStatus (spec: GetHealthStatus): a real round trip on the health key.

        If no key manager can do crypto the answer is 500 InternalException, since the
        spec reserves 200 for a proxy that can serve encrypt/decrypt right away.
        """
        try:
            await self._hsm(self.key_manager.health_check)
            status = HealthStatus.ACTIVE
        except XksError as error:
            logger.warning("health check failed: %s", error.error_message)
            status = HealthStatus.UNAVAILABLE
        if status is HealthStatus.UNAVAILABLE:
            raise InternalException("no external key manager is available")
        info = self.ekm_info
        return GetHealthStatusResponse(
            xks_proxy_fleet_size=self.config.fleet_size,
            xks_proxy_vendor=self.config.vendor,
            xks_proxy_model=f"{PRODUCT_NAME} {__version__}",
            ekm_vendor=info.vendor,
            ekm_fleet_details=(EkmFleetMember(info.id, info.model, status),),
        )

    async def _hsm(self, function: Callable[..., T], *args: Any) -> T:
        """Run a blocking key-manager call on the HSM thread pool."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.executor, function, *args)
        except XksError:
            raise
        except Exception:
            logger.exception("key manager call failed unexpectedly")
            raise InternalException("the external key manager failed") from None


def _route(raw_path: bytes) -> Route:
    try:
        path = raw_path.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidUriPathException("not an XKS API path") from None
    return parse_path(path)


def _log_metadata(log: dict[str, Any], metadata: RequestMetadata) -> None:
    log["kmsRequestId"] = metadata.kms_request_id
    log["kmsOperation"] = metadata.kms_operation
    for name, value in (
        ("awsPrincipalArn", metadata.aws_principal_arn),
        ("kmsKeyArn", metadata.kms_key_arn),
        ("kmsViaService", metadata.kms_via_service),
        ("awsSourceVpc", metadata.aws_source_vpc),
        ("awsSourceVpce", metadata.aws_source_vpce),
    ):
        if value is not None:
            log[name] = value
