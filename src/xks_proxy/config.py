"""Configuration: a TOML file -> frozen, fully validated dataclasses.

Every problem is reported with the key path that holds it (``key_stores[0].credentials[1]
.secret_access_key: ...``) so an operator can fix the file without guessing. Secrets can
live in the file, in an environment variable (``*_env``) or in a separate file
(``*_file``); a secret-holding file readable by group or others draws a warning.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xks_proxy.protocol.compat import (
    COMPATIBILITY_AWS_SAMPLE,
    compat_ciphertext_metadata,
    operator_metadata_problem,
)
from xks_proxy.protocol.routing import EXTERNAL_KEY_ID_RE, normalize_uri_prefix, uri_path_problem
from xks_proxy.protocol.validate import RequestLimits

logger = logging.getLogger("xks_proxy.config")

ACCESS_KEY_ID_RE = re.compile(r"[A-Z2-7]{20,30}")
SECRET_ACCESS_KEY_RE = re.compile(r"[A-Za-z0-9/+=]{43,64}")
REGION_RE = re.compile(r"[a-z]{2}(-[a-z]+)+-\d+")


class ConfigError(Exception):
    """The configuration is invalid; the message names the key path."""


@dataclass(frozen=True, slots=True)
class Credential:
    """One SigV4 credential of a key store (spec: Authentication, credential rotation)."""

    access_key_id: str
    secret_access_key: str = field(repr=False)

    def __repr__(self) -> str:
        return f"Credential(access_key_id={self.access_key_id!r}, secret_access_key=<redacted>)"


@dataclass(frozen=True, slots=True)
class KeyStoreConfig:
    """One logical key store: a URI prefix with its own credentials and keys."""

    name: str
    uri_prefix: str  # normalized: "" or "/a/b"
    credentials: tuple[Credential, ...]
    external_key_ids: frozenset[str] | None  # None: any key on the HSM
    ciphertext_metadata: bytes | None = None
    region: str | None = None  # AWS region of the KMS key store (mTLS client name default)
    requests_per_second: float | None = None  # quota (429 beyond it); None: unlimited
    burst: float | None = None
    # Cedar policy files as (path, text), read and validated at load so the supervisor
    # and every worker decide with exactly the same text. Empty: no secondary authz.
    policy_sources: tuple[tuple[str, str], ...] = ()
    # "aws-sample": also decrypt ciphertexts the AWS sample proxy made (docs/migration.md)
    compatibility: str | None = None

    @property
    def encrypt_metadata(self) -> bytes | None:
        """The ciphertextMetadata Encrypt returns (with the spec marker in compat mode)."""
        if self.compatibility == COMPATIBILITY_AWS_SAMPLE:
            return compat_ciphertext_metadata(self.ciphertext_metadata)
        return self.ciphertext_metadata

    @property
    def uri_path(self) -> str:
        """The XksProxyUriPath KMS is configured with."""
        return f"{self.uri_prefix}/kms/xks/v1"


@dataclass(frozen=True, slots=True)
class HsmConfig:
    name: str
    module: str
    token_label: str | None
    slot: int | None
    pin: str = field(repr=False)
    health_check_key_label: str
    sessions: int
    environment: Mapping[str, str]
    # Recovery pace (seconds): first retry of a module re-initialisation or token
    # re-discovery, doubling while it fails up to the maximum; and the longest wait
    # for a pooled session or the module lock.
    recovery_interval: float = 1.0
    recovery_max_interval: float = 30.0
    acquire_timeout: float = 1.0

    def __repr__(self) -> str:
        return (
            f"HsmConfig(name={self.name!r}, module={self.module!r}, "
            f"token_label={self.token_label!r}, "
            f"slot={self.slot!r}, pin=<redacted>, sessions={self.sessions})"
        )


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str
    port: int
    workers: int
    max_body_bytes: int
    allow_plain_http: bool
    state_dir: Path
    health_host: str
    health_port: int | None  # plain-HTTP load-balancer health listener (GET /ping, /ready)
    keep_alive_seconds: int
    graceful_shutdown_seconds: int
    # SIGTERM: seconds of /ready 503 and Connection: close before workers stop (0: none)
    drain_seconds: int = 0


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """HTTPS for the API port; mTLS when client_ca_file is set."""

    cert_file: Path
    key_file: Path
    key_password: str | None = field(repr=False)
    client_ca_file: Path | None
    client_names: tuple[str, ...]  # allowed client certificate CN / DNS SAN (mTLS)

    def __repr__(self) -> str:
        return (
            f"TlsConfig(cert_file={str(self.cert_file)!r}, key_file={str(self.key_file)!r}, "
            f"client_ca_file={self.client_ca_file and str(self.client_ca_file)!r}, "
            f"client_names={self.client_names!r})"
        )


@dataclass(frozen=True, slots=True)
class RuntimeLimits:
    """Time budget and load shedding (per worker)."""

    request_timeout_ms: int = 150  # KMS gives up at 250 ms, network included
    max_in_flight: int = 256


@dataclass(frozen=True, slots=True)
class HealthConfig:
    interval_seconds: float = 10.0  # background deep health check period
    degraded_latency_ms: float = 50.0  # a health round trip slower than this is DEGRADED
    probation_seconds: float = 30.0  # an HSM that failed stays DEGRADED this long after


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """The tamper-evident audit log (docs/audit.md)."""

    path: Path
    fsync: bool = True
    rotate_bytes: int | None = 64 << 20
    rotate_seconds: float | None = None
    chain_key: bytes | None = field(default=None, repr=False)  # HMAC chain key


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    server: ServerConfig
    tls: TlsConfig | None
    hsms: tuple[HsmConfig, ...]  # 1-10 HSMs holding the same keys (failover)
    key_stores: tuple[KeyStoreConfig, ...]
    limits: RequestLimits
    fleet_size: int
    vendor: str
    log_level: str
    runtime: RuntimeLimits = RuntimeLimits()
    health: HealthConfig = HealthConfig()
    audit: AuditConfig | None = None  # None: audit log switched off
    source: Path | None = None

    @property
    def hsm(self) -> HsmConfig:
        """The first (with one HSM, the only) HSM."""
        return self.hsms[0]


# --------------------------------------------------------------------------- reading


class _Reader:
    """Typed access to one TOML table, remembering its key path for error messages."""

    def __init__(self, table: Mapping[str, Any], path: str, base_dir: Path) -> None:
        self.table = table
        self.path = path
        self.base_dir = base_dir
        self.used: set[str] = set()

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where(key)}: {message}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        self.used.add(key)
        if key not in self.table:
            if default is ...:
                raise self.fail(key, "is required")
            return default
        value = self.table[key]
        # bool is an int in Python; never accept true for a number.
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.fail(key, f"must be {_kind_name(kind)}")
        if not isinstance(value, kind):
            raise self.fail(key, f"must be {_kind_name(kind)}")
        return value

    def int_in(self, key: str, low: int, high: int, default: int) -> int:
        value: int = self.get(key, int, default)
        if not low <= value <= high:
            raise self.fail(key, f"must be between {low} and {high}")
        return value

    def sub(self, key: str, required: bool = False) -> _Reader:
        value = self.get(key, dict, ... if required else {})
        return _Reader(value, self.where(key), self.base_dir)

    def items(self, key: str) -> list[_Reader]:
        values = self.get(key, list, [])
        readers = []
        for index, item in enumerate(values):
            if not isinstance(item, dict):
                raise ConfigError(f"{self.where(key)}[{index}]: must be a table")
            readers.append(_Reader(item, f"{self.where(key)}[{index}]", self.base_dir))
        return readers

    def secret(self, key: str) -> str:
        """A secret given inline, as ``key_env`` (variable name) or ``key_file`` (path)."""
        sources = [k for k in (key, f"{key}_env", f"{key}_file") if k in self.table]
        self.used.update((key, f"{key}_env", f"{key}_file"))
        if len(sources) != 1:
            raise self.fail(key, f"give exactly one of {key}, {key}_env, {key}_file")
        source = sources[0]
        if source == key:
            return str(self.get(key, str))
        if source.endswith("_env"):
            name = self.get(source, str)
            value = os.environ.get(name)
            if value is None:
                raise self.fail(source, f"environment variable {name} is not set")
            return value
        path = self.path_value(source)
        try:
            warn_if_readable_by_others(path, self.where(source))
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise self.fail(source, f"cannot read {path}: {exc.strerror}") from None

    def path_value(self, key: str) -> Path:
        path = Path(self.get(key, str)).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    def check_unknown(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise self.fail(unknown[0], "unknown setting (misspelt?)")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an integer",
        bool: "true or false",
        dict: "a table",
        list: "a list",
    }
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def warn_if_readable_by_others(path: Path, where: str) -> None:
    """Log a warning when a file holding secrets is readable by group or others."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning(
            "%s: %s holds secrets and is accessible by group/others (mode %o); chmod 600 it",
            where,
            path,
            stat.S_IMODE(mode),
        )


# --------------------------------------------------------------------------- parsing


def load_config(path: Path) -> ProxyConfig:
    """Read and validate a TOML config file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if _mentions_inline_secret(document):
        warn_if_readable_by_others(path, str(path))
    return parse_config(document, base_dir=path.parent.resolve(), source=path)


def state_dir_of(path: Path) -> Path:
    """The state directory a config file names, even if the rest of it is invalid."""
    base_dir = path.parent.resolve()
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
        value = document.get("server", {}).get("state_dir")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, AttributeError):
        value = None
    if isinstance(value, str):
        state = Path(value).expanduser()
        return state if state.is_absolute() else base_dir / state
    return base_dir / "state"


def _mentions_inline_secret(document: Mapping[str, Any]) -> bool:
    hsm = document.get("hsm", {})
    if isinstance(hsm, dict) and "pin" in hsm:
        return True
    for store in document.get("key_stores", []) or []:
        if isinstance(store, dict):
            for credential in store.get("credentials", []) or []:
                if isinstance(credential, dict) and "secret_access_key" in credential:
                    return True
    return False


def parse_config(
    document: Mapping[str, Any], *, base_dir: Path, source: Path | None = None
) -> ProxyConfig:
    """Validate a parsed TOML document into a ProxyConfig."""
    root = _Reader(document, "", base_dir)
    server = _server(root.sub("server"))
    tls_table = root.sub("tls")
    hsms = _hsms(root)
    proxy = root.sub("proxy")
    fleet_size = proxy.int_in("fleet_size", 1, 10_000, 1)
    vendor = proxy.get("vendor", str, "xks-proxy project")
    proxy.check_unknown()
    limits_table = root.sub("limits")
    try:
        limits = RequestLimits(
            max_plaintext_bytes=limits_table.int_in("max_plaintext_bytes", 1, 1 << 20, 65536),
            max_aad_bytes=limits_table.int_in("max_aad_bytes", 1, 0xFFFF, 0xFFFF),
        )
    except ValueError as exc:
        raise ConfigError(f"limits: {exc}") from None
    runtime = RuntimeLimits(
        request_timeout_ms=limits_table.int_in("request_timeout_ms", 10, 60_000, 150),
        max_in_flight=limits_table.int_in("max_in_flight", 1, 100_000, 256),
    )
    limits_table.check_unknown()
    health_table = root.sub("health")
    health = HealthConfig(
        interval_seconds=_number_in(health_table, "interval_seconds", 1, 30, 10.0),
        degraded_latency_ms=_number_in(health_table, "degraded_latency_ms", 1, 10_000, 50.0),
        probation_seconds=_number_in(health_table, "probation_seconds", 0, 3600, 30.0),
    )
    health_table.check_unknown()
    audit = _audit(root.sub("audit"), server)
    logging_table = root.sub("logging")
    log_level = logging_table.get("level", str, "info").lower()
    if log_level not in ("debug", "info", "warning", "error"):
        raise logging_table.fail("level", "must be debug, info, warning or error")
    logging_table.check_unknown()
    key_stores = _key_stores(root)
    tls = _tls(tls_table, key_stores) if tls_table.table else None
    if tls is None and not server.allow_plain_http:
        raise ConfigError(
            "tls: required (KMS only talks HTTPS); for loopback testing set "
            "server.allow_plain_http = true instead"
        )
    root.check_unknown()
    needed = 2 * limits.max_plaintext_bytes + 2 * limits.max_aad_bytes
    if server.max_body_bytes < min(needed, 32768):
        raise ConfigError(
            "server.max_body_bytes: too small for the spec's minimum request sizes (use >= 32768)"
        )
    return ProxyConfig(
        server=server,
        tls=tls,
        hsms=hsms,
        key_stores=key_stores,
        limits=limits,
        fleet_size=fleet_size,
        vendor=vendor,
        log_level=log_level,
        runtime=runtime,
        health=health,
        audit=audit,
        source=source,
    )


def _policy_sources(store: _Reader) -> tuple[tuple[str, str], ...]:
    """Read and validate a key store's Cedar policy files (spec: Authorization)."""
    paths = store.get("policy_files", list, [])
    if not paths:
        return ()
    sources = []
    for index, raw in enumerate(paths):
        if not isinstance(raw, str):
            raise ConfigError(f"{store.where('policy_files')}[{index}]: must be a path")
        path = Path(raw).expanduser()
        path = path if path.is_absolute() else store.base_dir / path
        try:
            sources.append((str(path), path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"{store.where('policy_files')}[{index}]: cannot read {path}: {exc}"
            ) from None
    from xks_proxy.authz import Authorizer, PolicyError

    try:
        Authorizer.from_sources(sources, cache_size=0)
    except PolicyError as exc:
        raise store.fail("policy_files", f"invalid policy: {exc}") from None
    return tuple(sources)


def _audit(table: _Reader, server: ServerConfig) -> AuditConfig | None:
    enabled = table.get("enabled", bool, True)
    path = (
        table.path_value("path")
        if "path" in table.table
        else server.state_dir / "audit" / "audit.jsonl"
    )
    rotate_mb = table.get("rotate_megabytes", (int, float), 64)
    if rotate_mb is not None and not 0.01 <= rotate_mb <= 1 << 20:
        raise table.fail("rotate_megabytes", "must be between 0.01 and 1048576")
    rotate_seconds = table.get("rotate_seconds", (int, float), None)
    if rotate_seconds is not None and rotate_seconds < 1:
        raise table.fail("rotate_seconds", "must be at least 1")
    chain_key = None
    if "chain_key_file" in table.table:
        key_path = table.path_value("chain_key_file")
        from xks_proxy.observability.audit import load_chain_key

        try:
            warn_if_readable_by_others(key_path, table.where("chain_key_file"))
            chain_key = load_chain_key(key_path)
        except (OSError, ValueError) as exc:
            raise table.fail("chain_key_file", f"cannot use {key_path}: {exc}") from None
    config = AuditConfig(
        path=path,
        fsync=table.get("fsync", bool, False),
        rotate_bytes=int(rotate_mb * (1 << 20)),
        rotate_seconds=float(rotate_seconds) if rotate_seconds is not None else None,
        chain_key=chain_key,
    )
    table.check_unknown()
    return config if enabled else None


def _number_in(table: _Reader, key: str, low: float, high: float, default: float) -> float:
    value = float(table.get(key, (int, float), default))
    if not low <= value <= high:
        raise table.fail(key, f"must be between {low:g} and {high:g}")
    return value


def _server(table: _Reader) -> ServerConfig:
    port = table.int_in("port", 0, 65535, 8000)
    health_port = table.get("health_port", int, None)
    if health_port is not None and not 0 < health_port <= 65535:
        raise table.fail("health_port", "must be between 1 and 65535")
    if health_port is not None and health_port == port:
        raise table.fail("health_port", "must differ from server.port")
    config = ServerConfig(
        host=table.get("host", str, "127.0.0.1"),
        port=port,
        workers=table.int_in("workers", 1, 64, 1),
        max_body_bytes=table.int_in("max_body_bytes", 1024, 16 << 20, 262144),
        allow_plain_http=table.get("allow_plain_http", bool, False),
        state_dir=table.path_value("state_dir")
        if "state_dir" in table.table
        else table.base_dir / "state",
        health_host=table.get("health_host", str, "127.0.0.1"),
        health_port=health_port,
        keep_alive_seconds=table.int_in("keep_alive_seconds", 1, 3600, 60),
        graceful_shutdown_seconds=table.int_in("graceful_shutdown_seconds", 1, 600, 10),
        drain_seconds=table.int_in("drain_seconds", 0, 600, 0),
    )
    table.check_unknown()
    return config


def _tls(table: _Reader, key_stores: tuple[KeyStoreConfig, ...]) -> TlsConfig:
    cert_file = table.path_value("cert_file")
    key_file = table.path_value("key_file")
    password = None
    if any(k in table.table for k in ("key_password", "key_password_env", "key_password_file")):
        password = table.secret("key_password")
    client_ca_file = table.path_value("client_ca_file") if "client_ca_file" in table.table else None
    names_raw = table.get("client_names", list, None)
    if names_raw is not None:
        if client_ca_file is None:
            raise table.fail("client_names", "needs tls.client_ca_file (mTLS)")
        if not names_raw or not all(isinstance(n, str) and n for n in names_raw):
            raise table.fail("client_names", "must be a non-empty list of names")
        client_names = tuple(names_raw)
    else:
        # KMS presents CN=cks.kms.<region>.amazonaws.com (spec: Authentication).
        client_names = tuple(
            sorted({f"cks.kms.{s.region}.amazonaws.com" for s in key_stores if s.region})
        )
        if client_ca_file is not None and not client_names:
            raise table.fail(
                "client_names",
                "mTLS needs the allowed client names: set tls.client_names or key_stores[].region",
            )
    for key, path in (
        ("cert_file", cert_file),
        ("key_file", key_file),
        ("client_ca_file", client_ca_file),
    ):
        if path is not None and not path.is_file():
            raise table.fail(key, f"{path} does not exist")
    config = TlsConfig(cert_file, key_file, password, client_ca_file, client_names)
    table.check_unknown()
    return config


MAX_HSMS = 10  # spec: ekmFleetDetails has 1 to 10 entries


def _hsms(root: _Reader) -> tuple[HsmConfig, ...]:
    """``[hsm]`` (one HSM) or ``[[hsm]]`` (1-10 HSMs holding the same keys)."""
    value = root.table.get("hsm")
    if isinstance(value, list):
        tables = root.items("hsm")
        if not 1 <= len(tables) <= MAX_HSMS:
            raise root.fail("hsm", f"give 1 to {MAX_HSMS} [[hsm]] tables")
    else:
        tables = [root.sub("hsm", required=True)]
    hsms = tuple(_hsm(table, index) for index, table in enumerate(tables))
    names = [h.name for h in hsms]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise ConfigError(f"hsm[{index}].name: {name!r} is used twice")
    return hsms


def _hsm(table: _Reader, index: int = 0) -> HsmConfig:
    module = str(table.path_value("module"))
    token_label = table.get("token_label", str, None)
    slot = table.get("slot", int, None)
    if (token_label is None) == (slot is None):
        raise table.fail("token_label", "give exactly one of token_label or slot")
    environment_table = table.sub("environment")
    environment: dict[str, str] = {}
    for name in environment_table.table:
        environment[name] = str(environment_table.get(name, str))
    config = HsmConfig(
        name=table.get("name", str, f"hsm-{index + 1}"),
        module=module,
        token_label=token_label,
        slot=slot,
        pin=table.secret("pin"),
        health_check_key_label=table.get("health_check_key", str, "xks-health-check"),
        # python-pkcs11 serialises every call per module (docs/decisions), so one
        # session per worker is fastest; more only help a module that is thread-safe.
        sessions=table.int_in("sessions", 1, 256, 1),
        environment=environment,
        recovery_interval=_number_in(table, "recovery_interval_seconds", 0.1, 3600, 1.0),
        recovery_max_interval=_number_in(table, "recovery_max_interval_seconds", 0.1, 3600, 30.0),
        acquire_timeout=_number_in(table, "acquire_timeout_seconds", 0.01, 60, 1.0),
    )
    if config.recovery_max_interval < config.recovery_interval:
        raise table.fail(
            "recovery_max_interval_seconds", "must be at least recovery_interval_seconds"
        )
    table.check_unknown()
    return config


def _key_stores(root: _Reader) -> tuple[KeyStoreConfig, ...]:
    stores = root.items("key_stores")
    if not stores:
        raise root.fail("key_stores", "at least one [[key_stores]] table is required")
    result: list[KeyStoreConfig] = []
    seen_prefixes: dict[str, str] = {}
    seen_akids: dict[str, str] = {}
    for store in stores:
        name = store.get("name", str)
        prefix_raw = store.get("uri_prefix", str, "")
        problem = uri_path_problem(prefix_raw)
        if problem:
            raise store.fail("uri_prefix", problem)
        prefix = normalize_uri_prefix(prefix_raw)
        if prefix in seen_prefixes:
            raise store.fail("uri_prefix", f"already used by key store {seen_prefixes[prefix]!r}")
        seen_prefixes[prefix] = name
        credentials = []
        for entry in store.items("credentials"):
            akid = entry.get("access_key_id", str)
            if ACCESS_KEY_ID_RE.fullmatch(akid) is None:
                raise entry.fail("access_key_id", "must be 20-30 characters of A-Z and 2-7")
            if akid in seen_akids:
                raise entry.fail("access_key_id", f"already used by key store {seen_akids[akid]!r}")
            seen_akids[akid] = name
            secret = entry.secret("secret_access_key")
            if SECRET_ACCESS_KEY_RE.fullmatch(secret) is None:
                raise entry.fail(
                    "secret_access_key", "must be 43-64 characters of A-Z a-z 0-9 / + ="
                )
            entry.check_unknown()
            credentials.append(Credential(akid, secret))
        if not credentials:
            raise store.fail("credentials", "at least one credential is required")
        key_ids = store.get("external_key_ids", list, None)
        external_key_ids = None
        if key_ids is not None:
            for index, key_id in enumerate(key_ids):
                if not isinstance(key_id, str) or EXTERNAL_KEY_ID_RE.fullmatch(key_id) is None:
                    raise ConfigError(
                        f"{store.where('external_key_ids')}[{index}]: must be 1-128 characters "
                        "of A-Z a-z 0-9 . - _"
                    )
            external_key_ids = frozenset(key_ids)
        rate = None
        burst = None
        if "requests_per_second" in store.table:
            rate = _number_in(store, "requests_per_second", 0.001, 1e7, 1800.0)
            burst = _number_in(store, "burst", 1, 1e7, max(1.0, rate))
        elif "burst" in store.table:
            raise store.fail("burst", "needs requests_per_second")
        policy_sources = _policy_sources(store)
        region = store.get("region", str, None)
        if region is not None and REGION_RE.fullmatch(region) is None:
            raise store.fail("region", "must be an AWS region name such as us-east-1")
        metadata_text = store.get("ciphertext_metadata", str, None)
        metadata = None
        if metadata_text is not None:
            metadata = metadata_text.encode("utf-8")
            if not 1 <= len(metadata) <= 20:
                raise store.fail("ciphertext_metadata", "must be 1-20 bytes")
        compatibility = store.get("compatibility", str, None)
        if compatibility is not None:
            if compatibility != COMPATIBILITY_AWS_SAMPLE:
                raise store.fail("compatibility", f"must be {COMPATIBILITY_AWS_SAMPLE!r}")
            problem = operator_metadata_problem(metadata)
            if problem is not None:
                raise store.fail("ciphertext_metadata", problem)
        store.check_unknown()
        result.append(
            KeyStoreConfig(
                name,
                prefix,
                tuple(credentials),
                external_key_ids,
                metadata,
                region,
                rate,
                burst,
                policy_sources,
                compatibility,
            )
        )
    return tuple(result)
