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
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

from xks_proxy import PRODUCT_NAME, __version__, authz, sigv4
from xks_proxy.authz import Authorizer
from xks_proxy.config import KeyStoreConfig, ProxyConfig
from xks_proxy.health import HealthMonitor
from xks_proxy.hsmcalls import HsmCalls
from xks_proxy.keymanager.base import EkmInfo, KeyManager
from xks_proxy.keystores import KeyStoreTable
from xks_proxy.killswitch import POLL_SECONDS, KillSwitchWatcher
from xks_proxy.observability.audit import AuditLog, worker_log_path
from xks_proxy.observability.audit_sink import AuditSink, audit_record
from xks_proxy.protocol.aad import hsm_aad
from xks_proxy.protocol.cdiv import ciphertext_data_integrity_value
from xks_proxy.protocol.compat import (
    COMPATIBILITY_AWS_SAMPLE,
    construction_aad,
    decrypt_constructions,
)
from xks_proxy.protocol.errors import (
    AccessDeniedException,
    DependencyTimeoutException,
    InternalException,
    InvalidCiphertextException,
    InvalidStateException,
    InvalidUriPathException,
    KeyNotFoundException,
    MethodNotAllowed,
    ThrottlingException,
    XksError,
)
from xks_proxy.protocol.models import (
    DecryptRequest,
    DecryptResponse,
    EncryptRequest,
    EncryptResponse,
    GetHealthStatusResponse,
    GetKeyMetadataResponse,
    RequestMetadata,
    XksOperation,
    XksRequest,
    XksResponse,
)
from xks_proxy.protocol.routing import Route, parse_path, validate_external_key_id
from xks_proxy.protocol.validate import parse_request, request_ids_of
from xks_proxy.throttle import InFlightLimit, KeyStoreQuotas

logger = logging.getLogger("xks_proxy.service")
T = TypeVar("T")

JSON_HEADERS: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]
ALLOW_POST_HEADERS: list[tuple[bytes, bytes]] = [*JSON_HEADERS, (b"allow", b"POST")]
BACKGROUND_CALL_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class _ServiceState:
    config: ProxyConfig
    key_stores: KeyStoreTable
    quotas: KeyStoreQuotas
    authorizers: dict[str, Authorizer]  # key stores with Cedar policies

    @classmethod
    def build(cls, config: ProxyConfig) -> _ServiceState:
        quotas = {
            store.name: (store.requests_per_second, store.burst or store.requests_per_second)
            for store in config.key_stores
            if store.requests_per_second
        }
        return cls(
            config,
            KeyStoreTable.build(config.key_stores),
            KeyStoreQuotas(quotas, config.server.workers),
            {
                store.name: Authorizer.from_sources(store.policy_sources)
                for store in config.key_stores
                if store.policy_sources
            },
        )


@dataclass(slots=True)
class _Call:
    """One request in progress: its time budget and its log fields."""

    deadline: float  # time.monotonic()
    timeout_ms: int
    log: dict[str, Any]


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
    """The four XKS APIs over one key manager and a table of key stores.

    ``worker``: the worker slot this service runs in; it names the audit chain.
    """

    def __init__(
        self,
        config: ProxyConfig,
        key_manager: KeyManager,
        *,
        clock: Callable[[], float] = time.time,
        worker: int = 0,
    ) -> None:
        self._state = _ServiceState.build(config)
        self.key_manager = key_manager
        # One thread per HSM session: more threads would only queue for a session. A
        # hung HSM call holds its thread; later calls wait in the queue and give up at
        # their deadline, and the in-flight cap bounds that queue.
        self.hsm_calls = HsmCalls(sum(hsm.sessions for hsm in config.hsms))
        self.clock = clock
        self.ekm_info: EkmInfo = key_manager.info()
        self.in_flight = InFlightLimit(config.runtime.max_in_flight)
        self.killswitch = KillSwitchWatcher(config.server.state_dir)
        self.health = HealthMonitor(key_manager, self.ekm_info, config.health, self._run_untimed)
        self._tasks: list[asyncio.Task[None]] = []
        self.audit: AuditSink | None = None
        if config.audit is not None:
            audit = config.audit
            audit.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # One chain per worker slot: workers never contend for one log's lock,
            # and a respawned worker continues its slot's chain.
            self.audit = AuditSink(
                AuditLog(
                    worker_log_path(audit.path, worker),
                    rotate_bytes=audit.rotate_bytes,
                    rotate_seconds=audit.rotate_seconds,
                    fsync=audit.fsync,
                    chain_key=audit.chain_key,
                ),
                group_commit=audit.fsync,
            )

    def start(self) -> None:
        """Start the background work (health checks, kill switch polling); needs a loop."""
        self.health.start()
        self._tasks.append(asyncio.get_running_loop().create_task(self._poll_killswitch()))

    async def _poll_killswitch(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            self.killswitch.refresh()

    @property
    def config(self) -> ProxyConfig:
        """The configuration in force."""
        return self._state.config

    def apply_config(self, config: ProxyConfig) -> None:
        """Swap in a new (already validated) configuration in one step.

        Requests already running keep the state they started with; the next request
        sees the new key stores, credentials and limits. HSM settings need a restart.
        """
        self._state = _ServiceState.build(config)
        self.health.config = config.health
        self.in_flight.limit = config.runtime.max_in_flight

    def close(self) -> None:
        """Stop the HSM thread pool and release the key manager."""
        self.health.stop()
        for task in self._tasks:
            task.cancel()
        self.hsm_calls.shutdown()
        if self.audit is not None:
            self.audit.close()
        self.key_manager.close()

    async def handle(
        self,
        method: str,
        raw_path: bytes,
        query_string: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        *,
        client: str | None = None,
    ) -> Outcome:
        """Answer one HTTP request; never raises. The audit record is written first.

        ``client``: the peer's address, for the request log and the audit record.
        """
        started = time.perf_counter()
        outcome = await self._answer(method, raw_path, query_string, headers, body)
        return await self._audited(outcome, started, client)

    async def refused(self, outcome: Outcome, *, client: str | None = None) -> Outcome:
        """An answer the HTTP edge decided itself (a body over the size limit), audited
        like every other answer before it goes out."""
        return await self._audited(outcome, time.perf_counter(), client)

    async def _audited(self, outcome: Outcome, started: float, client: str | None) -> Outcome:
        if client is not None:
            outcome.log["client"] = client
        if self.audit is not None:
            record = audit_record(outcome.log)
            record["latencyMs"] = round((time.perf_counter() - started) * 1000, 3)
            try:
                await self.audit.record(record)
            except Exception:
                # Fail closed: no answer goes out without its audit record.
                return error_outcome(
                    InternalException("the audit log cannot be written"), JSON_HEADERS, outcome.log
                )
        return outcome

    async def _answer(
        self,
        method: str,
        raw_path: bytes,
        query_string: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
    ) -> Outcome:
        log: dict[str, Any] = {}
        if not self.in_flight.try_enter():
            # Shed load at once: a fast 429 beats a timeout KMS would wait 250 ms for.
            return error_outcome(
                ThrottlingException("the proxy is at its limit of requests in flight"),
                JSON_HEADERS,
                log,
            )
        timeout_ms = self._state.config.runtime.request_timeout_ms
        call = _Call(time.monotonic() + timeout_ms / 1000, timeout_ms, log)
        try:
            response = await self._dispatch(method, raw_path, query_string, headers, body, call)
        except MethodNotAllowed as error:
            return error_outcome(error, ALLOW_POST_HEADERS, log)
        except XksError as error:
            if "accessKeyId" in log and "kmsRequestId" not in log:
                # Signed, but refused before its metadata was read (key store, kill
                # switch, quota) or invalid: KMS's request id still belongs in the log.
                log.update(request_ids_of(body))
            return error_outcome(error, JSON_HEADERS, log)
        except Exception:
            logger.exception("unexpected error while handling a request")
            return error_outcome(InternalException(), JSON_HEADERS, log)
        finally:
            self.in_flight.leave()
        log["status"] = 200
        return Outcome(200, orjson.dumps(response.to_json()), JSON_HEADERS, log)

    async def _dispatch(
        self,
        method: str,
        raw_path: bytes,
        query_string: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        call: _Call,
    ) -> XksResponse:
        log = call.log
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
        kill = self.killswitch.state
        if kill.proxy_disabled:
            raise InvalidStateException("the proxy is disabled by its operator")
        if key_store.name in kill.disabled_key_stores:
            raise InvalidStateException("the key store is disabled by its operator")
        if not state.quotas.admit(key_store.name, time.monotonic()):
            raise ThrottlingException("the key store's request quota is exceeded")
        request = parse_request(route.operation, body, state.config.limits)
        _log_metadata(log, request.metadata)
        if route.operation is XksOperation.GET_HEALTH_STATUS:
            return await self.get_health_status(call)
        assert route.external_key_id is not None
        external_key_id = route.external_key_id
        validate_external_key_id(external_key_id)
        if (
            key_store.external_key_ids is not None
            and external_key_id not in key_store.external_key_ids
        ):
            raise KeyNotFoundException()
        authorizer = state.authorizers.get(key_store.name)
        if authorizer is not None:
            # Secondary authorization (spec: Authorization); never for GetHealthStatus.
            decision = authorizer.authorize(
                route.operation, key_store.name, external_key_id, request.metadata
            )
            log.update(authz.log_fields(decision))
            if not decision.allowed:
                raise AccessDeniedException()
        disabled = kill.key_disabled(key_store.name, external_key_id)
        return await self._key_operation(call, key_store, external_key_id, request, disabled)

    async def _key_operation(
        self,
        call: _Call,
        key_store: KeyStoreConfig,
        external_key_id: str,
        request: XksRequest,
        disabled: bool,
    ) -> XksResponse:
        if not isinstance(request, EncryptRequest | DecryptRequest):
            return await self.get_key_metadata(call, external_key_id, disabled)
        if disabled:
            raise InvalidStateException("the external key is disabled by its operator")
        if isinstance(request, EncryptRequest):
            return await self.encrypt(call, key_store, external_key_id, request)
        return await self.decrypt(call, key_store, external_key_id, request)

    # ------------------------------------------------------------------ the APIs

    async def get_key_metadata(
        self, call: _Call, external_key_id: str, disabled: bool = False
    ) -> GetKeyMetadataResponse:
        """GetKeyMetadata (spec: GetKeyMetadata); a kill-switched key reports DISABLED."""
        description = await self._hsm(call, self.key_manager.describe_key, external_key_id)
        status = "ENABLED" if description.enabled and not disabled else "DISABLED"
        return GetKeyMetadataResponse(description.key_spec, description.key_usage, status)

    async def encrypt(
        self, call: _Call, key_store: KeyStoreConfig, external_key_id: str, request: EncryptRequest
    ) -> EncryptResponse:
        """Encrypt (spec: Encrypt), with the CDIV procedure of Appendix C when asked."""
        metadata = key_store.encrypt_metadata
        aad_for_hsm = hsm_aad(request.aad, metadata)
        output = await self._hsm(
            call, self.key_manager.encrypt, external_key_id, request.plaintext, aad_for_hsm
        )
        if request.cdiv_algorithm is None:
            return EncryptResponse(output.ciphertext, output.iv, output.tag, metadata, None)
        # Appendix C: hash the output first, then prove it decrypts to the input.
        cdiv = ciphertext_data_integrity_value(
            request.aad, metadata, output.iv, output.ciphertext, output.tag
        )
        plaintext = await self._hsm(
            call,
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

    async def decrypt(
        self, call: _Call, key_store: KeyStoreConfig, external_key_id: str, request: DecryptRequest
    ) -> DecryptResponse:
        """Decrypt (spec: Decrypt); the tag also covers AAD and ciphertextMetadata.

        In AWS-sample compatibility mode the metadata marker picks exactly one AAD
        construction; the other is never tried (docs/migration.md explains why).
        """
        aad_for_hsm = hsm_aad(request.aad, request.ciphertext_metadata)
        if key_store.compatibility == COMPATIBILITY_AWS_SAMPLE:
            constructions = decrypt_constructions(request.ciphertext_metadata)
            if not constructions:
                raise InvalidCiphertextException(
                    "ciphertextMetadata was not made by this key store"
                )
            call.log["aadConstruction"] = constructions[0].value
            aad_for_hsm = construction_aad(
                constructions[0], request.aad, request.ciphertext_metadata
            )
        plaintext = await self._hsm(
            call,
            self.key_manager.decrypt,
            external_key_id,
            request.ciphertext,
            request.iv,
            request.tag,
            aad_for_hsm,
        )
        return DecryptResponse(plaintext)

    async def get_health_status(self, call: _Call) -> GetHealthStatusResponse:
        """GetHealthStatus (spec: GetHealthStatus), from the background deep check.

        If no key manager can do crypto the answer is 500 InternalException, since the
        spec reserves 200 for a proxy that can serve encrypt/decrypt right away.
        """
        report = self.health.fresh_report()
        if report is None:
            remaining = call.deadline - time.monotonic()
            try:
                report = await asyncio.wait_for(self.health.check(), max(remaining, 0.001))
            except TimeoutError:
                raise DependencyTimeoutException(
                    f"the health check did not finish within {call.timeout_ms} ms"
                ) from None
        if not report.usable:
            raise InternalException("no external key manager is available")
        config = self.config
        return GetHealthStatusResponse(
            xks_proxy_fleet_size=config.fleet_size,
            xks_proxy_vendor=config.vendor,
            xks_proxy_model=f"{PRODUCT_NAME} {__version__}",
            ekm_vendor=self.ekm_info.vendor,
            ekm_fleet_details=report.members,
        )

    async def _hsm(self, call: _Call, function: Callable[..., T], *args: Any) -> T:
        """Run a blocking key-manager call on an HSM thread, within the request's deadline."""
        try:
            result = await self.hsm_calls.call(
                call.deadline, _timeout_message(call), function, *args, log=call.log
            )
        except XksError:
            raise
        except Exception:
            logger.exception("key manager call failed unexpectedly")
            raise InternalException("the external key manager failed") from None
        call.log.setdefault("hsm", self.ekm_info.id)  # with one HSM, it is the one
        return result

    async def _run_untimed(self, function: Callable[[], None]) -> None:
        """Background work (the health round trip), bounded generously."""
        deadline = time.monotonic() + BACKGROUND_CALL_SECONDS
        await self.hsm_calls.call(deadline, "the health check did not finish", function)


def _timeout_message(call: _Call) -> str:
    return f"the external key manager did not answer within {call.timeout_ms} ms"


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
