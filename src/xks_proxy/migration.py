"""Import the AWS sample proxy's settings TOML (aws-samples/aws-kms-xks-proxy).

:func:`import_sample_settings` turns the sample's ``settings.toml`` into our config
TOML plus a report of everything that has no equivalent or needs the operator's
attention. Every key store comes out in compatibility mode
(``compatibility = "aws-sample"``) so that ciphertexts the sample made keep
decrypting (see :mod:`xks_proxy.protocol.compat` and docs/migration.md).

The sample's settings schema is the serde structs in its ``xks-axum/src/settings.rs``;
its reader ignores unknown keys, so they are reported here, not refused.
"""

from __future__ import annotations

import base64
import binascii
import re
import textwrap
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xks_proxy.config import ACCESS_KEY_ID_RE, REGION_RE, SECRET_ACCESS_KEY_RE
from xks_proxy.protocol.aad import MAX_AAD_BYTES
from xks_proxy.protocol.compat import (
    COMPATIBILITY_AWS_SAMPLE,
    MARKER_V1,
    legacy_metadata_problem,
    operator_metadata_problem,
)
from xks_proxy.protocol.routing import EXTERNAL_KEY_ID_RE, normalize_uri_prefix, uri_path_problem

TOKEN_LABEL_PLACEHOLDER = "SET-ME-token-label"  # noqa: S105 (a token label, not a secret)
DEFAULT_MAX_PLAINTEXT_BYTES = 65536  # config.py default
MAX_PLAINTEXT_BYTES = 1 << 20  # config.py upper bound
DEFAULT_MAX_BODY_BYTES = 262144
MAX_BODY_BYTES = 16 << 20
KMS_CLIENT_NAME_RE = re.compile(r"cks\.kms\.[a-z]{2}(-[a-z]+)+-\d+\.amazonaws\.com")
SAMPLE_PING_PORT_DEFAULT = 80  # settings.rs: ServerConfig::port_http_ping

# Severities, in report order.
ACTION = "ACTION"  # must be done before serving
CHANGED = "CHANGED"  # carried over, but behaves differently
DROPPED = "DROPPED"  # no equivalent; not carried over
NOTE = "NOTE"
_ORDER = {ACTION: 0, CHANGED: 1, DROPPED: 2, NOTE: 3}

# The sample's settings structs (settings.rs), table -> known keys.
_SAMPLE_SCHEMA: dict[str, frozenset[str]] = {
    "": frozenset(
        {
            "server",
            "security",
            "tls",
            "tracing",
            "pkcs11",
            "pkcs11_logger",
            "limits",
            "hsm_capabilities",
            "external_key_stores",
        }
    ),
    "server": frozenset(
        {
            "ip",
            "port",
            "port_http_ping",
            "region",
            "service",
            "ciphertext_metadata_b64",
            "tcp_keepalive",
        }
    ),
    "server.tcp_keepalive": frozenset(
        {"tcp_keepalive_secs", "tcp_keepalive_interval_secs", "tcp_keepalive_retries"}
    ),
    "security": frozenset(
        {"is_sigv4_auth_enabled", "is_tls_enabled", "is_mtls_enabled", "secondary_auth", "oso"}
    ),
    "security.oso": frozenset({"polar_file_path"}),
    "tls": frozenset({"tls_cert_pem", "tls_key_pem", "mtls_client_ca_pem", "mtls_client_dns_name"}),
    "tracing": frozenset(
        {
            "is_stdout_writer_enabled",
            "is_file_writer_enabled",
            "level",
            "directory",
            "file_prefix",
            "rotation_kind",
        }
    ),
    "pkcs11": frozenset(
        {
            "session_pool_max_size",
            "session_pool_timeout_milli",
            "user_pin",
            "session_eager_close",
            "PKCS11_HSM_MODULE",
            "context_read_timeout_milli",
        }
    ),
    "pkcs11_logger": frozenset(
        {"PKCS11_LOGGER_LIBRARY_PATH", "PKCS11_LOGGER_LOG_FILE_PATH", "PKCS11_LOGGER_FLAGS"}
    ),
    "limits": frozenset({"max_plaintext_in_base64", "max_aad_in_base64"}),
    "hsm_capabilities": frozenset({"can_generate_iv", "is_zero_iv_required"}),
    "external_key_stores": frozenset(
        {"uri_path_prefix", "sigv4_access_key_id", "sigv4_secret_access_key", "xks_key_id_set"}
    ),
}


class SampleSettingsError(Exception):
    """The sample's settings cannot be imported; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class ImportResult:
    """Our config TOML (secrets inline, as in the sample's file) and the import report."""

    config_toml: str
    report: list[str]


def import_sample_settings(
    path: Path, *, token_label: str | None = None, working_dir: Path | None = None
) -> ImportResult:
    """Convert the sample's settings TOML at ``path`` into our config TOML.

    ``token_label``: the label of the token the sample used (it took the first slot
    of C_GetSlotList, which our config cannot express); without it a placeholder is
    written and the report asks for it. ``working_dir``: the directory the sample ran
    in, to resolve its relative paths (it resolved them against its working
    directory, we resolve them against the config file's directory).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SampleSettingsError(f"cannot read {path}: {exc}") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SampleSettingsError(f"{path}: not valid TOML: {exc}") from None
    return convert_sample_settings(
        document, source=str(path), token_label=token_label, working_dir=working_dir
    )


def convert_sample_settings(
    document: Mapping[str, Any],
    *,
    source: str = "settings.toml",
    token_label: str | None = None,
    working_dir: Path | None = None,
) -> ImportResult:
    """:func:`import_sample_settings` on an already parsed document."""
    return _Converter(document, token_label, working_dir).convert(source)


# --------------------------------------------------------------------------- TOML output


def _toml_string(value: str) -> str:
    """A TOML basic string (escapes quotes, backslashes and every control character)."""
    out = ['"']
    for char in value:
        code = ord(char)
        if char == '"':
            out.append('\\"')
        elif char == "\\":
            out.append("\\\\")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _toml_value(value: str | int | bool | list[str]) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_string(item) for item in value) + "]"
    return _toml_string(value)


_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY_RE.fullmatch(key) else _toml_string(key)


class _Table:
    def __init__(self, header: str) -> None:
        self.header = header
        self.lines: list[str] = []

    def set(self, key: str, value: str | int | bool | list[str], comment: str = "") -> None:
        line = f"{_toml_key(key)} = {_toml_value(value)}"
        self.lines.append(f"{line}  # {comment}" if comment else line)

    def render(self) -> str:
        return "\n".join([self.header, *self.lines])


# --------------------------------------------------------------------------- conversion


class _Converter:
    def __init__(
        self, document: Mapping[str, Any], token_label: str | None, working_dir: Path | None
    ) -> None:
        self.document = document
        self.token_label = token_label
        self.working_dir = working_dir
        self.findings: list[tuple[str, str]] = []
        self.relative_paths: list[str] = []

    # ------------------------------------------------------------------ helpers

    def report(self, severity: str, message: str) -> None:
        self.findings.append((severity, message))

    def table(self, name: str, required: bool = False) -> Mapping[str, Any]:
        node: Any = self.document
        for part in name.split("."):
            if not isinstance(node, Mapping):
                node = None
                break
            node = node.get(part)
        if node is None:
            if required:
                raise SampleSettingsError(f"[{name}]: missing (the sample requires it)")
            return {}
        if not isinstance(node, Mapping):
            raise SampleSettingsError(f"{name}: must be a table")
        return node

    @staticmethod
    def get(
        table: Mapping[str, Any],
        where: str,
        key: str,
        kind: type | tuple[type, ...],
        default: Any = None,
    ) -> Any:
        if key not in table:
            return default
        value = table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise SampleSettingsError(f"{where}.{key}: must be {names}")
        return value

    def path(self, value: str, where: str) -> str:
        if Path(value).is_absolute():
            return value
        if self.working_dir is not None:
            return str(self.working_dir / value)
        self.relative_paths.append(f"{where} = {value!r}")
        return value

    def check_unknown(self) -> None:
        for name, known in _SAMPLE_SCHEMA.items():
            if name == "external_key_stores":
                stores = self.document.get("external_key_stores")
                tables = list(stores) if isinstance(stores, list) else []
                entries = [
                    (f"external_key_stores[{index}]", table) for index, table in enumerate(tables)
                ]
            else:
                entries = [(name or "(top level)", self.table(name) if name else self.document)]
            for where, table in entries:
                if not isinstance(table, Mapping):
                    continue
                for key in sorted(set(table) - known):
                    self.report(
                        NOTE,
                        f"{where}.{key} is not a setting of the sample (it ignored it); "
                        "not carried over",
                    )

    # ------------------------------------------------------------------ sections

    def convert(self, source: str) -> ImportResult:
        self.check_unknown()
        security = self.table("security")
        legacy_metadata = self.legacy_metadata()
        stores = self.key_stores(legacy_metadata)
        server = self.server(security)
        tls = self.tls(security)
        if tls is None:
            server.set(
                "allow_plain_http",
                True,
                "the sample served plain HTTP (security.is_tls_enabled = false)",
            )
        hsm, environment = self.hsm()
        limits = self.limits(server)
        logging_table = self.logging()
        self.security_extras(security)
        self.hsm_capabilities()
        if self.relative_paths:
            self.report(
                ACTION,
                "relative paths kept as written ("
                + "; ".join(self.relative_paths)
                + "): the sample resolved them against its working directory (its systemd "
                "unit sets none, so /), our config resolves them against the config file's "
                "directory. Make them absolute, or re-run the import with the working "
                "directory the sample ran in",
            )
        self.report(
            NOTE,
            f"every key store has compatibility = {COMPATIBILITY_AWS_SAMPLE!r}: ciphertexts "
            "the sample made keep decrypting with its AAD construction; new ones use the "
            f"spec's and carry ciphertextMetadata starting {MARKER_V1.decode()!r} "
            "(docs/migration.md)",
        )
        tables = [server]
        if tls is not None:
            tables.append(tls)
        tables.append(hsm)
        if environment.lines:
            tables.append(environment)
        if limits.lines:
            tables.append(limits)
        tables.append(logging_table)
        for store, credentials in stores:
            tables.extend([store, credentials])
        report = [
            f"{severity}: {message}"
            for severity, message in sorted(self.findings, key=lambda item: _ORDER[item[0]])
        ]
        header = [
            "# xks-proxy configuration imported from the AWS sample proxy's settings",
            f"# source: {source.replace(chr(10), ' ')}",
            "# Check every item of the import report before serving (docs/migration.md):",
        ]
        for line in report:
            wrapped = textwrap.wrap(
                line,
                width=96,
                subsequent_indent="    ",
                break_on_hyphens=False,
                break_long_words=False,
            )
            header.extend(f"#   {part}" for part in wrapped)
        text = "\n".join(header) + "\n\n" + "\n\n".join(t.render() for t in tables) + "\n"
        tomllib.loads(text)  # never hand out a file that is not TOML
        return ImportResult(text, report)

    def server(self, security: Mapping[str, Any]) -> _Table:
        raw = self.table("server")
        table = _Table("[server]")
        host = self.get(raw, "server", "ip", str, None)
        port = self.get(raw, "server", "port", int, None)
        if host is None or port is None:
            raise SampleSettingsError("server.ip and server.port: required by the sample")
        if not 0 <= port <= 65535:
            raise SampleSettingsError("server.port: must be between 0 and 65535")
        table.set("host", host)
        table.set("port", port)
        ping_port = self.get(raw, "server", "port_http_ping", int, SAMPLE_PING_PORT_DEFAULT)
        if ping_port != port and 0 < ping_port <= 65535:
            table.set("health_host", host, "the sample served GET /ping on server.ip")
            table.set("health_port", ping_port, "the sample's port_http_ping")
            self.report(
                CHANGED,
                f"the sample's plain-HTTP GET /ping listener on port {ping_port} is "
                f"server.health_port = {ping_port} (health_host = {host!r}): it also serves "
                "/ready (deep HSM check) and /metrics, so bind it where only the load "
                "balancer reaches it",
            )
        else:
            self.report(
                CHANGED,
                "the sample answered GET /ping on the API port; we do not: set "
                "server.health_port to a port of its own for load-balancer checks",
            )
        if "tcp_keepalive" in raw:
            self.report(
                DROPPED,
                "server.tcp_keepalive: no equivalent (server.keep_alive_seconds is the HTTP "
                "keep-alive idle time, not TCP keepalive probes)",
            )
        service = self.get(raw, "server", "service", str, "kms-xks-proxy")
        if service != "kms-xks-proxy":
            self.report(
                CHANGED,
                f"server.service = {service!r}: we only accept SigV4 scopes for the "
                "service kms-xks-proxy, which is what KMS signs for",
            )
        if not self.get(security, "security", "is_sigv4_auth_enabled", bool, True):
            self.report(
                CHANGED,
                "security.is_sigv4_auth_enabled = false: SigV4 is always required here "
                "(KMS always signs its requests)",
            )
        return table

    def tls(self, security: Mapping[str, Any]) -> _Table | None:
        tls_enabled = self.get(security, "security", "is_tls_enabled", bool, False)
        mtls_enabled = self.get(security, "security", "is_mtls_enabled", bool, False)
        if not tls_enabled:
            self.report(
                ACTION,
                "security.is_tls_enabled = false: written as server.allow_plain_http = true. "
                "KMS only talks HTTPS: if TLS ended at a load balancer in front of the sample "
                "it still can, but terminating TLS (and mTLS) in the proxy is better "
                "(docs/tls.md)",
            )
            if mtls_enabled:
                self.report(
                    DROPPED,
                    "security.is_mtls_enabled = true had no effect without TLS in the sample; "
                    "not carried over",
                )
            return None
        raw = self.table("tls")
        if not raw:
            raise SampleSettingsError("[tls]: missing although security.is_tls_enabled = true")
        table = _Table("[tls]")
        cert = self.get(raw, "tls", "tls_cert_pem", str, "")
        key = self.get(raw, "tls", "tls_key_pem", str, "")
        if not cert or not key:
            raise SampleSettingsError("tls.tls_cert_pem and tls.tls_key_pem: required with TLS")
        table.set("cert_file", self.path(cert, "tls.tls_cert_pem"))
        table.set("key_file", self.path(key, "tls.tls_key_pem"))
        if not mtls_enabled:
            self.report(
                ACTION,
                "mTLS was off in the sample (security.is_mtls_enabled = false): on a public "
                "endpoint turn it on (tls.client_ca_file, tls.client_names; docs/tls.md)",
            )
            return table
        ca = self.get(raw, "tls", "mtls_client_ca_pem", str, "")
        name = self.get(raw, "tls", "mtls_client_dns_name", str, "")
        if not ca or not name:
            raise SampleSettingsError(
                "tls.mtls_client_ca_pem and tls.mtls_client_dns_name: required with mTLS"
            )
        table.set("client_ca_file", self.path(ca, "tls.mtls_client_ca_pem"))
        table.set("client_names", [name])
        if KMS_CLIENT_NAME_RE.fullmatch(name) is None:
            self.report(
                ACTION,
                f"tls.client_names = [{name!r}]: KMS presents CN=cks.kms.<region>.amazonaws.com "
                "(the sample's example name is a pre-release one); check the name your KMS "
                "region presents",
            )
        self.report(
            CHANGED,
            "mTLS: the sample accepted the client name only as a DNS subjectAltName; we "
            "accept it as the certificate's CN or a DNS subjectAltName",
        )
        return table

    def hsm(self) -> tuple[_Table, _Table]:
        raw = self.table("pkcs11", required=True)
        table = _Table("[hsm]")
        environment = _Table("[hsm.environment]")
        module = self.get(raw, "pkcs11", "PKCS11_HSM_MODULE", str, "")
        if not module:
            raise SampleSettingsError("pkcs11.PKCS11_HSM_MODULE: required")
        table.set("module", self.path(module, "pkcs11.PKCS11_HSM_MODULE"))
        self.report(
            NOTE,
            "the sample let the environment variable PKCS11_HSM_MODULE override "
            "pkcs11.PKCS11_HSM_MODULE; we read only hsm.module: if you set the variable, "
            "put its value there",
        )
        if self.token_label is not None:
            table.set("token_label", self.token_label)
        else:
            table.set("token_label", TOKEN_LABEL_PLACEHOLDER, "the sample used the first slot")
            self.report(
                ACTION,
                f'hsm.token_label = "{TOKEN_LABEL_PLACEHOLDER}": the sample used the first '
                "slot C_GetSlotList returned, which a config cannot name; set the label of "
                "that token (or hsm.slot), or re-run the import with the token label",
            )
        pin = self.get(raw, "pkcs11", "user_pin", str, None)
        if pin is None:
            raise SampleSettingsError("pkcs11.user_pin: required")
        table.set("pin", pin)
        table.set("sessions", 1)
        self.report(
            ACTION,
            "hsm.pin and every secret_access_key are inline, as they were in the sample's "
            "settings: keep config.toml at mode 600, or move each secret to a file of its "
            'own (pin_file = "/etc/xks-proxy/hsm-pin", secret_access_key_file = ...; '
            "first line, mode 600) or to an environment variable (pin_env, "
            "secret_access_key_env)",
        )
        self.report(
            ACTION,
            'hsm.health_check_key = "xks-health-check" (default): GetHealthStatus does a real '
            "AES-GCM round trip on that key, the sample only read the token info. Create it "
            "before serving: xks-proxy keys create --config config.toml --health-check",
        )
        dropped = [
            key
            for key in (
                "session_pool_max_size",
                "session_pool_timeout_milli",
                "session_eager_close",
                "context_read_timeout_milli",
            )
            if key in raw
        ]
        if dropped:
            self.report(
                DROPPED,
                "pkcs11."
                + ", pkcs11.".join(dropped)
                + ": no equivalent; hsm.sessions (default 1, measured fastest) sets the "
                "sessions per worker and limits.request_timeout_ms (150) bounds each request",
            )
        logger = self.table("pkcs11_logger")
        for key in ("PKCS11_LOGGER_LIBRARY_PATH", "PKCS11_LOGGER_LOG_FILE_PATH"):
            value = self.get(logger, "pkcs11_logger", key, str, "")
            if value:
                environment.set(key, self.path(value, f"pkcs11_logger.{key}"))
        flags = self.get(logger, "pkcs11_logger", "PKCS11_LOGGER_FLAGS", str, "")
        if flags and environment.lines:
            environment.set("PKCS11_LOGGER_FLAGS", flags)
        if environment.lines:
            self.report(
                CHANGED,
                "[pkcs11_logger] became [hsm.environment] (set before the module loads). "
                "pkcs11-logger records every PKCS#11 call and slows each one: in production "
                "point hsm.module at the real library (PKCS11_LOGGER_LIBRARY_PATH) and "
                "remove [hsm.environment]",
            )
        return table, environment

    def limits(self, server: _Table) -> _Table:
        raw = self.table("limits")
        table = _Table("[limits]")
        plaintext_b64 = self.get(raw, "limits", "max_plaintext_in_base64", int, None)
        if plaintext_b64 is not None:
            plaintext = plaintext_b64 // 4 * 3
            if plaintext > DEFAULT_MAX_PLAINTEXT_BYTES:
                limit = min(plaintext, MAX_PLAINTEXT_BYTES)
                table.set("max_plaintext_bytes", limit, f"sample: {plaintext_b64} base64 chars")
                body = 4 * -(-limit // 3) + 4 * -(-MAX_AAD_BYTES // 3) + 8192
                if body > DEFAULT_MAX_BODY_BYTES:
                    server.set("max_body_bytes", min(body, MAX_BODY_BYTES))
                if limit < plaintext:
                    self.report(
                        CHANGED,
                        f"limits.max_plaintext_in_base64 = {plaintext_b64} ({plaintext} bytes) "
                        f"is above our largest limits.max_plaintext_bytes: {limit}",
                    )
            else:
                self.report(
                    NOTE,
                    f"limits.max_plaintext_in_base64 = {plaintext_b64} ({plaintext} bytes): "
                    f"our default limits.max_plaintext_bytes ({DEFAULT_MAX_PLAINTEXT_BYTES}) "
                    "already accepts everything the sample did",
                )
        aad_b64 = self.get(raw, "limits", "max_aad_in_base64", int, None)
        if aad_b64 is not None:
            self.report(
                NOTE,
                f"limits.max_aad_in_base64 = {aad_b64} ({aad_b64 // 4 * 3} bytes): we accept "
                f"up to {MAX_AAD_BYTES} bytes (limits.max_aad_bytes), the most the AAD length "
                "prefix can hold",
            )
        return table

    def logging(self) -> _Table:
        raw = self.table("tracing")
        table = _Table("[logging]")
        level_raw = self.get(raw, "tracing", "level", str, None)
        levels = {
            "TRACE": "debug",
            "DEBUG": "debug",
            "INFO": "info",
            "WARN": "warning",
            "WARNING": "warning",
            "ERROR": "error",
        }
        level = levels.get((level_raw or "INFO").upper())
        if level is None:
            self.report(CHANGED, f"tracing.level = {level_raw!r} is not a level; using info")
            level = "info"
        elif level_raw is not None and level_raw.upper() in ("TRACE", "DEBUG"):
            self.report(
                CHANGED,
                f"tracing.level = {level_raw!r} became logging.level = {level!r}; use info "
                "in production (the sample's own advice)",
            )
        table.set("level", level)
        file_keys = [
            key
            for key in ("is_file_writer_enabled", "directory", "file_prefix", "rotation_kind")
            if key in raw
        ]
        if file_keys or "is_stdout_writer_enabled" in raw:
            self.report(
                DROPPED,
                "tracing: we always write JSON lines to stderr (one per request, with "
                "kmsRequestId); rotated log files (tracing.directory, file_prefix, "
                "rotation_kind) and the xks-proxy_cleanlogs timer are replaced by journald "
                "or your log shipper",
            )
        return table

    def security_extras(self, security: Mapping[str, Any]) -> None:
        secondary = self.get(security, "security", "secondary_auth", str, None)
        if secondary is not None:
            oso = self.table("security.oso")
            polar = self.get(oso, "security.oso", "polar_file_path", str, "")
            self.report(
                ACTION,
                f"security.secondary_auth = {secondary!r} (polar file {polar!r}) is not "
                "carried over: Oso is not supported; write the same rules as Cedar policies "
                "and list them in key_stores[].policy_files (docs/authorization.md). Until "
                "then there is no secondary authorization",
            )

    def hsm_capabilities(self) -> None:
        raw = self.table("hsm_capabilities")
        can_generate = self.get(raw, "hsm_capabilities", "can_generate_iv", bool, False)
        zero_iv = self.get(raw, "hsm_capabilities", "is_zero_iv_required", bool, False)
        if not can_generate:
            self.report(
                NOTE,
                "hsm_capabilities: the proxy makes each 12-byte IV, as the sample did with "
                "can_generate_iv = false (we draw it from os.urandom, the sample from "
                "C_GenerateRandom)",
            )
            return
        kind = (
            "is_zero_iv_required = true (CloudHSM, nShield: the HSM writes the IV into a "
            "zeroed buffer)"
            if zero_iv
            else "is_zero_iv_required = false (Luna: the HSM appends its IV after the tag)"
        )
        self.report(
            ACTION,
            f"hsm_capabilities.can_generate_iv = true, {kind}: this proxy always supplies a "
            "random 12-byte IV itself. HSMs that insist on making the IV (FIPS mode) will "
            "refuse Encrypt; test Encrypt against your HSM before switching. Decrypt of the "
            "sample's ciphertexts is unaffected (KMS sends the IV back)",
        )

    # ------------------------------------------------------------------ key stores

    def legacy_metadata(self) -> bytes | None:
        raw = self.table("server")
        encoded = self.get(raw, "server", "ciphertext_metadata_b64", str, None)
        if encoded is None:
            return None
        try:
            decoded = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise SampleSettingsError(
                "server.ciphertext_metadata_b64: not valid base64 (the sample would not start)"
            ) from None
        if base64.b64encode(decoded).decode("ascii") != encoded:
            raise SampleSettingsError(
                "server.ciphertext_metadata_b64: not canonical base64 (the sample would not start)"
            )
        problem = legacy_metadata_problem(decoded)
        if problem is not None:
            raise SampleSettingsError(
                f"server.ciphertext_metadata_b64 {problem}: ciphertexts the sample made with "
                "it could not be told from new ones, so compatibility mode cannot serve "
                "them; see docs/migration.md"
            )
        return decoded

    def key_stores(self, legacy_metadata: bytes | None) -> list[tuple[_Table, _Table]]:
        raw_stores = self.document.get("external_key_stores")
        if not isinstance(raw_stores, list) or not raw_stores:
            raise SampleSettingsError("external_key_stores: at least one [[external_key_stores]]")
        server = self.table("server")
        region = self.get(server, "server", "region", str, None)
        if region is not None and REGION_RE.fullmatch(region) is None:
            self.report(DROPPED, f"server.region = {region!r} is not an AWS region name")
            region = None
        if region is not None:
            self.report(
                CHANGED,
                f"server.region = {region!r} became key_stores[].region (it also names the "
                "mTLS client cks.kms.<region>.amazonaws.com); the sample refused SigV4 "
                "signatures for other regions, we accept any region in the scope",
            )
        operator_metadata: str | None = None
        if legacy_metadata:
            problem = operator_metadata_problem(legacy_metadata)
            if problem is None:
                operator_metadata = legacy_metadata.decode("ascii")
                self.report(
                    CHANGED,
                    f"server.ciphertext_metadata_b64 ({operator_metadata!r}) became each key "
                    f"store's ciphertext_metadata: new ciphertexts carry "
                    f"{(MARKER_V1 + legacy_metadata).decode()!r}, the sample's keep "
                    f"{operator_metadata!r}",
                )
            else:
                self.report(
                    DROPPED,
                    f"server.ciphertext_metadata_b64 {problem.replace('must', 'would have to')}"
                    f" to follow the {MARKER_V1.decode()!r} marker: new ciphertexts carry the "
                    "marker only; the sample's ciphertexts still decrypt (KMS sends their "
                    "metadata back)",
                )
        result: list[tuple[_Table, _Table]] = []
        names: set[str] = set()
        prefixes: dict[str, int] = {}
        akids: dict[str, int] = {}
        for index, raw in enumerate(raw_stores):
            where = f"external_key_stores[{index}]"
            if not isinstance(raw, Mapping):
                raise SampleSettingsError(f"{where}: must be a table")
            prefix_raw = self.get(raw, where, "uri_path_prefix", str, "")
            problem = uri_path_problem(prefix_raw)
            if problem is not None:
                raise SampleSettingsError(f"{where}.uri_path_prefix {prefix_raw!r}: {problem}")
            prefix = normalize_uri_prefix(prefix_raw)
            if prefix in prefixes:
                raise SampleSettingsError(
                    f"{where}.uri_path_prefix: same as external_key_stores[{prefixes[prefix]}]"
                )
            prefixes[prefix] = index
            akid = self.get(raw, where, "sigv4_access_key_id", str, "")
            secret = self.get(raw, where, "sigv4_secret_access_key", str, "")
            if ACCESS_KEY_ID_RE.fullmatch(akid) is None or (
                SECRET_ACCESS_KEY_RE.fullmatch(secret) is None
            ):
                self.report(
                    DROPPED,
                    f"{where} (uri_path_prefix {prefix_raw!r}) skipped: its access key id or "
                    "secret is empty or has a shape KMS never accepts (20-30 of A-Z 2-7; "
                    "43-64 of A-Z a-z 0-9 / + =), so KMS cannot have used it. Make a "
                    "credential with xks-proxy credentials new if you need this key store",
                )
                continue
            if akid in akids:
                raise SampleSettingsError(
                    f"{where}.sigv4_access_key_id is also used by "
                    f"external_key_stores[{akids[akid]}]: here the access key id picks the "
                    "key store, so each needs its own. Give one of them a new credential "
                    "(xks-proxy credentials new; UpdateCustomKeyStore in KMS) and import again"
                )
            akids[akid] = index
            key_ids_raw = self.get(raw, where, "xks_key_id_set", list, [])
            key_ids: list[str] = []
            for key_id in key_ids_raw:
                if isinstance(key_id, str) and EXTERNAL_KEY_ID_RE.fullmatch(key_id):
                    key_ids.append(key_id)
                else:
                    self.report(
                        DROPPED,
                        f"{where}.xks_key_id_set entry {key_id!r}: not a valid external key "
                        "id (1-128 of A-Z a-z 0-9 . - _), KMS cannot have used it",
                    )
            name = _store_name(prefix, names)
            names.add(name)
            store = _Table("[[key_stores]]")
            store.set("name", name)
            store.set("uri_prefix", prefix.lstrip("/"))
            if region is not None:
                store.set("region", region)
            store.set(
                "compatibility", COMPATIBILITY_AWS_SAMPLE, "decrypts the sample's ciphertexts"
            )
            store.set("external_key_ids", sorted(set(key_ids)))
            if operator_metadata is not None:
                store.set(
                    "ciphertext_metadata",
                    operator_metadata,
                    f"ciphertextMetadata = {MARKER_V1.decode()} || this",
                )
            credentials = _Table("[[key_stores.credentials]]")
            credentials.set("access_key_id", akid)
            credentials.set("secret_access_key", secret)
            result.append((store, credentials))
        if not result:
            raise SampleSettingsError(
                "no key store has a usable credential (every sigv4_access_key_id / "
                "sigv4_secret_access_key is empty or malformed)"
            )
        if len(raw_stores) > 1:
            self.report(
                NOTE,
                "the sample's key stores are named after their URI prefixes "
                f"({', '.join(sorted(names))}); the names only appear in logs, metrics and "
                "kill-switch commands",
            )
        return result


def _store_name(prefix: str, taken: set[str]) -> str:
    base = prefix.strip("/").replace("/", "-") or "default"
    name, counter = base, 2
    while name in taken:
        name, counter = f"{base}-{counter}", counter + 1
    return name
