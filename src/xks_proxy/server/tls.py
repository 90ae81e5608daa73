"""HTTPS for the XKS API: server TLS context, mTLS client-name policy, reload, demo PKI.

The XKS spec (Authentication) wants HTTPS with TLS >= 1.2 and, when mTLS is on, the
TLS session ended for a client certificate with another subject name or CA. OpenSSL
checks the CA (and expiry) during the handshake. Python's ``ssl`` has no verify
callback, so the *name* is checked by :class:`MtlsHttpToolsProtocol` the moment the
handshake completes, before a single HTTP byte is parsed. See docs/tls.md.

Wiring (uvicorn 0.54)::

    context = build_server_context(settings)
    PeerNamePolicy.set_allowed(settings.allowed_client_names)
    uvicorn.Config(app, ssl_context_factory=lambda *_: context,
                   http=MtlsHttpToolsProtocol if settings.client_ca_file else "httptools")

Certificate rotation: ``reload_certificates(context, new_settings)`` on the event-loop
thread; new handshakes get the new certificate, open connections keep theirs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import itertools
import logging
import os
import secrets
import ssl
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from xks_proxy.server import handshake_alert
from xks_proxy.server.protocol import XksHttpToolsProtocol

__all__ = [
    "ALPN_PROTOCOLS",
    "EXPIRY_WARNING_DAYS",
    "TLS12_CIPHERS",
    "DemoPki",
    "MtlsHttpToolsProtocol",
    "PeerNamePolicy",
    "TlsConfigError",
    "TlsSettings",
    "build_server_context",
    "certificate_days_to_expiry",
    "certificate_not_after",
    "make_demo_pki",
    "peer_name_allowed",
    "peer_names",
    "reload_certificates",
]

logger = logging.getLogger("xks_proxy.tls")

#: TLS 1.2 suites: ECDHE (forward secrecy) with AES-256-GCM or ChaCha20-Poly1305, for
#: ECDSA and RSA certificates. TLS 1.3 suites are OpenSSL's defaults (the ssl module
#: cannot restrict them); with server preference TLS_AES_256_GCM_SHA384 wins.
TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
ALPN_PROTOCOLS = ("http/1.1",)
#: Warn when the server certificate expires within this many days.
EXPIRY_WARNING_DAYS = 30

_MAX_PEM_BYTES = 1 << 20  # a certificate bundle larger than 1 MiB is a wrong path
_LOG_NAMES = 3
_LOG_NAME_CHARS = 64


class TlsConfigError(Exception):
    """A TLS file is missing, unreadable or unusable; the message names file and problem."""


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """What the API port's TLS needs. mTLS is on when ``client_ca_file`` is set."""

    cert_file: Path  # server certificate followed by its chain, PEM
    key_file: Path  # its private key, PEM (optionally encrypted)
    key_password: str | None = field(default=None, repr=False)
    client_ca_file: Path | None = None  # trust anchors for client certificates (mTLS)
    # Client certificate CN or DNS SAN, case-insensitive exact match
    # (KMS: cks.kms.<region>.amazonaws.com).
    allowed_client_names: tuple[str, ...] = ()


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True, slots=True)
class _Material:
    """Everything read from the TLS files, parsed and cross-checked."""

    chain: tuple[x509.Certificate, ...]
    key: PrivateKeyTypes
    key_kind: str
    client_cas: tuple[x509.Certificate, ...] | None

    @property
    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    @property
    def client_ca_pem(self) -> str | None:
        if self.client_cas is None:
            return None
        return "".join(
            c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in self.client_cas
        )

    @property
    def client_ca_fingerprints(self) -> frozenset[bytes]:
        return frozenset(c.fingerprint(hashes.SHA256()) for c in self.client_cas or ())


def _read(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_PEM_BYTES + 1)
    except FileNotFoundError:
        raise TlsConfigError(f"{what} {path}: not found") from None
    except IsADirectoryError:
        raise TlsConfigError(f"{what} {path}: is a directory, not a file") from None
    except PermissionError:
        raise TlsConfigError(f"{what} {path}: cannot be read (permission denied)") from None
    except OSError as exc:
        raise TlsConfigError(f"{what} {path}: cannot be read ({exc.strerror})") from None
    if len(data) > _MAX_PEM_BYTES:
        raise TlsConfigError(f"{what} {path}: larger than 1 MiB, not a PEM file")
    return data


def _certificates(data: bytes, path: Path, what: str) -> tuple[x509.Certificate, ...]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsConfigError(
            f"{what} {path}: no certificate in it (expected PEM "
            "'-----BEGIN CERTIFICATE-----' blocks)"
        ) from None
    return tuple(certs)


def _key_kind(key: PrivateKeyTypes) -> str:
    """The OpenSSL certificate slot a key goes into (one certificate per slot)."""
    if isinstance(key, rsa.RSAPrivateKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "EC"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PrivateKey):
        return "Ed448"
    if isinstance(key, dsa.DSAPrivateKey):
        return "DSA"
    return type(key).__name__


def _private_key(data: bytes, password: str | None, path: Path) -> PrivateKeyTypes:
    what = "TLS private key file"
    secret = password.encode("utf-8") if password is not None else None
    try:
        return serialization.load_pem_private_key(data, secret)
    except TypeError:
        if secret is None:
            raise TlsConfigError(
                f"{what} {path}: the key is encrypted and no key password is configured"
            ) from None
        # A password was configured but the key is not encrypted: that is fine.
        return _private_key(data, None, path)
    except UnsupportedAlgorithm:
        raise TlsConfigError(f"{what} {path}: unsupported key type") from None
    except ValueError:
        if secret is not None and b"ENCRYPTED" in data:
            raise TlsConfigError(
                f"{what} {path}: wrong key password (or the encrypted key is corrupt)"
            ) from None
        raise TlsConfigError(
            f"{what} {path}: no usable PEM private key in it (missing, corrupt or unsupported)"
        ) from None


def _public_der(key: Any) -> bytes:
    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _load_material(settings: TlsSettings) -> _Material:
    chain = _certificates(
        _read(settings.cert_file, "TLS certificate file"),
        settings.cert_file,
        "TLS certificate file",
    )
    key = _private_key(
        _read(settings.key_file, "TLS private key file"), settings.key_password, settings.key_file
    )
    if _public_der(chain[0].public_key()) != _public_der(key.public_key()):
        raise TlsConfigError(
            f"TLS private key file {settings.key_file} does not match the certificate "
            f"(the first one in {settings.cert_file})"
        )
    _check_chain_order(chain, settings.cert_file)
    client_cas = None
    if settings.client_ca_file is not None:
        what = "TLS client CA file"
        client_cas = _certificates(
            _read(settings.client_ca_file, what), settings.client_ca_file, what
        )
        for ca in client_cas:
            if not _is_ca(ca):
                logger.warning(
                    "%s %s: %s is not a CA certificate (basicConstraints CA:FALSE or absent)",
                    what,
                    settings.client_ca_file,
                    ca.subject.rfc4514_string(),
                )
    return _Material(chain, key, _key_kind(key), client_cas)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _check_chain_order(chain: Sequence[x509.Certificate], path: Path) -> None:
    for child, parent in itertools.pairwise(chain):
        if child.issuer != parent.subject:
            logger.warning(
                "TLS certificate file %s: certificate %r is not issued by the next one %r; "
                "put the server certificate first, then each issuer in order",
                path,
                child.subject.rfc4514_string(),
                parent.subject.rfc4514_string(),
            )
            return


def _log_expiry(leaf: x509.Certificate, path: Path, now: dt.datetime | None = None) -> None:
    days = _days_left(leaf, now)
    if days <= 0:
        logger.error(
            "TLS certificate %s expired %.1f days ago; clients will refuse it", path, -days
        )
    elif days <= EXPIRY_WARNING_DAYS:
        logger.warning("TLS certificate %s expires in %.1f days; renew it", path, days)
    if leaf.not_valid_before_utc > _utc(now):
        logger.warning("TLS certificate %s is not valid yet (clock skew?)", path)


# --------------------------------------------------------------------------- context


class _AlertSendingSSLObject(ssl.SSLObject):
    """Makes asyncio/uvloop send the TLS alert of a failed server handshake.

    Both event loops' SSL protocols close the socket as soon as ``do_handshake`` raises,
    dropping the alert OpenSSL has just written into the outgoing memory BIO: the client
    sees a reset instead of "certificate expired" / "unknown CA". Here a fatal handshake
    error with an alert pending is reported once as "want read" — on which the loop
    flushes the outgoing BIO to the socket — and raised on the next call (the client's
    next bytes or its close, at the latest the loop's SSL handshake timeout).
    """

    _outgoing_bio: ssl.MemoryBIO | None = None
    _deferred_error: ssl.SSLError | None = None

    def do_handshake(self) -> None:
        if self._deferred_error is not None:
            raise self._deferred_error
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            if not self.server_side:
                raise
            _log_handshake_failure(exc)
            outgoing = self._outgoing_bio
            if outgoing is None or outgoing.pending == 0:
                raise
            self._deferred_error = exc
            raise ssl.SSLWantReadError("TLS alert queued; the handshake has failed") from exc


def _log_handshake_failure(exc: ssl.SSLError) -> None:
    """Client-certificate failures are worth a warning (mTLS set-up); the rest is noise."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code == handshake_alert.X509_V_ERR_APPLICATION_VERIFICATION:
            return  # handshake_alert's callback logged the real reason already
        logger.warning(
            "mTLS: client certificate refused in the TLS handshake: %s", exc.verify_message
        )
    elif exc.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        logger.warning("mTLS: client sent no certificate; TLS handshake refused")
    else:
        logger.debug("TLS handshake failed: %s", exc.reason or exc)


@dataclass(frozen=True, slots=True)
class _Loaded:
    """What is loaded into a server context (checked by reload_certificates)."""

    key_kind: str
    mtls: bool
    client_ca_fingerprints: frozenset[bytes]
    client_ca_subjects: dict[bytes, str]


class _ServerContext(ssl.SSLContext):
    """The server context: remembers what was loaded and lets handshake alerts out."""

    sslobject_class = _AlertSendingSSLObject
    _xks_loaded: _Loaded | None = None
    _xks_lock: ClassVar[threading.Lock] = threading.Lock()

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        obj = super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        if isinstance(obj, _AlertSendingSSLObject):
            obj._outgoing_bio = outgoing
        return obj


def _new_context(mtls: bool) -> _ServerContext:
    context = _ServerContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    context.options |= (
        ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    )
    context.set_ciphers(TLS12_CIPHERS)
    context.set_alpn_protocols(list(ALPN_PROTOCOLS))
    if mtls:
        context.verify_mode = ssl.CERT_REQUIRED
        context.verify_flags |= ssl.VERIFY_X509_STRICT
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


@contextmanager
def _private_files(*blobs: bytes) -> Iterator[list[str]]:
    """Paths of private copies of ``blobs`` (OpenSSL's cert/key loaders take only paths).

    Linux: anonymous memory files (memfd), never on a disk. Elsewhere: a 0700
    temporary directory, deleted on exit.
    """
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fds: list[int] = []
        try:
            for blob in blobs:
                fd = os.memfd_create("xks-tls", os.MFD_CLOEXEC)
                fds.append(fd)
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view) :]
            yield [f"/proc/self/fd/{fd}" for fd in fds]
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="xks-tls-") as directory:
        paths = []
        for index, blob in enumerate(blobs):
            path = os.path.join(directory, str(index))
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(blob)
            paths.append(path)
        yield paths


def _load_into(context: ssl.SSLContext, material: _Material, settings: TlsSettings) -> None:
    """Load the certificate chain, key and client CAs (all already validated) into context."""
    # The key goes to OpenSSL re-encrypted under a one-time password, so the decrypted
    # key never lands in a file even on the temporary-directory fallback.
    one_time = secrets.token_urlsafe(24)
    key_pem = material.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(one_time.encode("ascii")),
    )
    try:
        with _private_files(material.chain_pem, key_pem) as (chain_path, key_path):
            context.load_cert_chain(chain_path, key_path, password=one_time)
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(
            f"TLS certificate file {settings.cert_file} / key file {settings.key_file}: "
            f"OpenSSL refused them ({_ssl_reason(exc)})"
        ) from None
    ca_pem = material.client_ca_pem
    if ca_pem is not None:
        try:
            context.load_verify_locations(cadata=ca_pem)
        except (ssl.SSLError, OSError) as exc:
            raise TlsConfigError(
                f"TLS client CA file {settings.client_ca_file}: OpenSSL refused it "
                f"({_ssl_reason(exc)})"
            ) from None


def _ssl_reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason) if reason else str(exc)


def _loaded(material: _Material) -> _Loaded:
    return _Loaded(
        key_kind=material.key_kind,
        mtls=material.client_cas is not None,
        client_ca_fingerprints=material.client_ca_fingerprints,
        client_ca_subjects={
            c.fingerprint(hashes.SHA256()): c.subject.rfc4514_string()
            for c in material.client_cas or ()
        },
    )


def build_server_context(settings: TlsSettings) -> ssl.SSLContext:
    """A server SSLContext for the XKS API port; TlsConfigError names any bad file.

    TLS 1.2 minimum (1.0/1.1 refused), TLS 1.3 on; TLS 1.2 suites :data:`TLS12_CIPHERS`;
    no compression, no renegotiation, server cipher preference, ALPN http/1.1. With
    ``client_ca_file``: client certificate required, verified (X509 strict) against
    that bundle only — no system CAs. Building has no side effects beyond the context
    (the supervisor may call it just to validate files).
    """
    material = _load_material(settings)
    context = _new_context(mtls=material.client_cas is not None)
    _load_into(context, material, settings)
    context._xks_loaded = _loaded(material)
    _log_expiry(material.chain[0], settings.cert_file)
    if material.client_cas is not None:
        # KMS and the compliance client expect alert 40 for any refused certificate.
        handshake_alert.install(context)
    if material.client_cas is not None and not settings.allowed_client_names:
        logger.warning(
            "mTLS is on but no allowed client names are configured: "
            "MtlsHttpToolsProtocol will refuse every client"
        )
    return context


def reload_certificates(context: ssl.SSLContext, settings: TlsSettings) -> None:
    """Load new certificate/key (and client CAs) into the running ``context``.

    New handshakes use the new certificate at once; open connections keep the one they
    were made with. Everything is read, parsed and loaded into a scratch context first:
    if anything is wrong this raises TlsConfigError and ``context`` keeps serving the
    old files. Changes OpenSSL cannot apply to a live context also raise (restart
    instead): switching the key type (RSA <-> EC: the old certificate would stay in
    its slot and still be served), removing a client CA (a trust store only grows),
    and turning mTLS on or off. Call it on the event-loop thread.
    """
    if not isinstance(context, _ServerContext) or context._xks_loaded is None:
        raise TlsConfigError("this SSLContext was not made by build_server_context")
    with _ServerContext._xks_lock:
        old = context._xks_loaded
        material = _load_material(settings)
        new = _loaded(material)
        if new.mtls != old.mtls:
            raise TlsConfigError(
                "turning mTLS on or off (tls.client_ca_file) needs a restart of the proxy"
            )
        if new.key_kind != old.key_kind:
            raise TlsConfigError(
                f"TLS private key file {settings.key_file}: key type changes from "
                f"{old.key_kind} to {new.key_kind}; a running TLS context would keep serving "
                f"the old {old.key_kind} certificate too: restart the proxy to switch"
            )
        removed = old.client_ca_fingerprints - new.client_ca_fingerprints
        if removed:
            names = sorted(old.client_ca_subjects.get(f, "?") for f in removed)
            raise TlsConfigError(
                f"TLS client CA file {settings.client_ca_file}: {len(removed)} CA "
                f"certificate(s) removed ({'; '.join(names)}); a running TLS context cannot "
                "forget a trusted CA: restart the proxy to remove it"
            )
        _load_into(_new_context(new.mtls), material, settings)  # proves OpenSSL takes them
        _load_into(context, material, settings)
        context._xks_loaded = new
    _log_expiry(material.chain[0], settings.cert_file)
    logger.info(
        "TLS certificate reloaded: serial %x, expires %s",
        material.chain[0].serial_number,
        material.chain[0].not_valid_after_utc.isoformat(),
    )


# --------------------------------------------------------------------------- names


def peer_names(peercert: dict[str, Any] | None) -> list[str]:
    """Subject CNs then DNS SANs of a ``getpeercert()`` dict, without duplicates."""
    if not peercert:
        return []
    names: list[str] = []
    for rdn in peercert.get("subject", ()):
        for attribute in rdn:
            if len(attribute) == 2 and attribute[0] == "commonName":
                names.append(str(attribute[1]))
    for kind, value in peercert.get("subjectAltName", ()):
        if kind == "DNS":
            names.append(str(value))
    return list(dict.fromkeys(names))


def peer_name_allowed(peercert: dict[str, Any] | None, allowed: Sequence[str]) -> bool:
    """True if a CN or DNS SAN equals an allowed name (ASCII case-insensitive, exact).

    No certificate, or no allowed names, means False: nothing is allowed by default.
    """
    wanted = {name.lower() for name in allowed}
    return any(name.lower() in wanted for name in peer_names(peercert))


def _describe(names: Sequence[str]) -> str:
    if not names:
        return "none"
    shown = []
    for name in names[:_LOG_NAMES]:
        text = name if len(name) <= _LOG_NAME_CHARS else name[: _LOG_NAME_CHARS - 3] + "..."
        shown.append(ascii(text))
    more = len(names) - _LOG_NAMES
    return ", ".join(shown) + (f" (+{more} more)" if more > 0 else "")


class PeerNamePolicy:
    """The client-certificate names accepted by :class:`MtlsHttpToolsProtocol`.

    Process-wide and swappable at runtime (config reload): ``set_allowed`` replaces the
    whole tuple in one assignment, and the next connection sees it. Until it is called
    the tuple is empty and every client is refused (fail closed). A subclass has its
    own names once ``set_allowed`` is called on it (used by tests to run two servers).
    """

    allowed: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def set_allowed(cls, names: Iterable[str]) -> None:
        if isinstance(names, str | bytes):
            raise TypeError("set_allowed takes a sequence of names, not a single string")
        normalized: list[str] = []
        for name in names:
            if not isinstance(name, str) or not name or not name.isprintable() or " " in name:
                raise ValueError(f"invalid client certificate name: {name!r}")
            normalized.append(name.lower())
        cls.allowed = tuple(dict.fromkeys(normalized))

    @classmethod
    def permits(cls, peercert: dict[str, Any] | None) -> bool:
        return peer_name_allowed(peercert, cls.allowed)


class MtlsHttpToolsProtocol(XksHttpToolsProtocol):
    """Our httptools protocol (one write per response), first checking the client
    certificate's name.

    asyncio and uvloop call ``connection_made`` only after the TLS handshake has
    completed (and, with CERT_REQUIRED, the client certificate has been verified
    against the client CA). If no CN/DNS SAN of that certificate is in
    :attr:`policy`'s allowed names the transport is aborted there: no request byte is
    ever parsed, no response sent. Select it with ``uvicorn.Config(http=...)``.
    """

    policy: ClassVar[type[PeerNamePolicy]] = PeerNamePolicy
    alpn_protocols: ClassVar[list[str]] = list(ALPN_PROTOCOLS)
    _peer_rejected: bool = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        peercert = ssl_object.getpeercert() if ssl_object is not None else None
        if self.policy.permits(peercert):
            return
        self._peer_rejected = True
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "unknown client"
        if ssl_object is None:
            logger.warning("mTLS: refused %s: the connection is not TLS", client)
        elif not self.policy.allowed:
            logger.warning(
                "mTLS: refused %s: no client names are allowed (PeerNamePolicy.set_allowed "
                "was not called)",
                client,
            )
        else:
            logger.warning(
                "mTLS: refused %s: client certificate names %s are not allowed",
                client,
                _describe(peer_names(peercert)),
            )
        transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._peer_rejected:
            return
        super().data_received(data)


# --------------------------------------------------------------------------- expiry


def _utc(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    return now if now.tzinfo is not None else now.replace(tzinfo=dt.UTC)


def _days_left(cert: x509.Certificate, now: dt.datetime | None) -> float:
    return (cert.not_valid_after_utc - _utc(now)).total_seconds() / 86400.0


def _first_certificate(cert_file: Path) -> x509.Certificate:
    what = "TLS certificate file"
    return _certificates(_read(cert_file, what), cert_file, what)[0]


def certificate_not_after(cert_file: Path) -> dt.datetime:
    """notAfter (UTC, timezone-aware) of the first certificate in ``cert_file``."""
    return _first_certificate(cert_file).not_valid_after_utc


def certificate_days_to_expiry(cert_file: Path, now: dt.datetime | None = None) -> float:
    """Days until the first certificate in ``cert_file`` expires (negative: expired).

    For the XksProxyCertificateDaysToExpire metric; a naive ``now`` is taken as UTC.
    """
    return _days_left(_first_certificate(cert_file), now)


# --------------------------------------------------------------------------- demo PKI

_CA_DAYS = 3650
_LEAF_DAYS = 365
_BACKDATE = dt.timedelta(hours=1)
_MIN_REMAINING = dt.timedelta(days=EXPIRY_WARNING_DAYS)


@dataclass(frozen=True, slots=True)
class DemoPki:
    """A local CA, a server certificate and a client certificate (for demos and tests)."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path  # leaf + CA
    server_key: Path
    client_cert: Path
    client_key: Path
    client_cn: str

    def tls_settings(self, *, mtls: bool = True) -> TlsSettings:
        """Server settings: this server certificate; with mtls, this CA and client CN."""
        if not mtls:
            return TlsSettings(cert_file=self.server_cert, key_file=self.server_key)
        return TlsSettings(
            cert_file=self.server_cert,
            key_file=self.server_key,
            client_ca_file=self.ca_cert,
            allowed_client_names=(self.client_cn,),
        )


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write atomically (temp file + rename) with ``mode`` from the start."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _general_names(names: Sequence[str]) -> list[x509.GeneralName]:
    result: list[x509.GeneralName] = []
    for name in names:
        try:
            result.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            result.append(x509.DNSName(name))
    return result


def _try_load_pair(
    cert_path: Path, key_path: Path
) -> tuple[list[x509.Certificate], ec.EllipticCurvePrivateKey] | None:
    try:
        certs = x509.load_pem_x509_certificates(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    if _public_der(certs[0].public_key()) != _public_der(key.public_key()):
        return None
    return certs, key


def _still_valid(cert: x509.Certificate, now: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= now and cert.not_valid_after_utc - now > _MIN_REMAINING


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _san_set(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    names = {str(v).lower() for v in san.get_values_for_type(x509.DNSName)}
    names |= {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    return names


def _wanted_san_set(names: Sequence[str]) -> set[str]:
    result = set()
    for name in names:
        try:
            result.add(str(ipaddress.ip_address(name)))
        except ValueError:
            result.add(name.lower())
    return result


def _common_name(cert: x509.Certificate) -> str | None:
    values = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else None


def _build_ca(now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "xks-proxy demo"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"xks-proxy demo CA {secrets.token_hex(4)}"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _build_leaf(
    ca: x509.Certificate,
    ca_key: CertificateIssuerPrivateKeyTypes,
    common_name: str,
    names: Sequence[str],
    usage: x509.ObjectIdentifier,
    now: dt.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "xks-proxy demo"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=_LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_general_names(names)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def make_demo_pki(
    directory: Path,
    *,
    server_names: Sequence[str] = ("localhost", "127.0.0.1"),
    client_cn: str = "cks.kms.us-east-1.amazonaws.com",
    now: dt.datetime | None = None,
) -> DemoPki:
    """Create (or re-use) a demo CA, server and client certificate under ``directory``.

    Files: ca.pem, ca-key.pem, server.pem (leaf + CA), server-key.pem, client.pem,
    client-key.pem; keys mode 0600, ECDSA P-256. CA valid 10 years, leaves 1 year.
    Existing files are kept while they load, match, chain to the CA, carry the asked
    names and stay valid for more than 30 days; otherwise that part is re-issued (a
    new CA re-issues both leaves).
    """
    if not server_names:
        raise ValueError("make_demo_pki needs at least one server name")
    moment = _utc(now)
    directory.mkdir(parents=True, exist_ok=True)
    pki = DemoPki(
        directory=directory,
        ca_cert=directory / "ca.pem",
        ca_key=directory / "ca-key.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client-key.pem",
        client_cn=client_cn,
    )

    ca_pair = _try_load_pair(pki.ca_cert, pki.ca_key)
    renew_leaves = False
    if (
        ca_pair is None
        or len(ca_pair[0]) != 1
        or not _is_ca(ca_pair[0][0])
        or not _still_valid(ca_pair[0][0], moment)
    ):
        ca, ca_key = _build_ca(moment)
        _write_file(pki.ca_key, _key_pem(ca_key), 0o600)
        _write_file(pki.ca_cert, _pem(ca), 0o644)
        renew_leaves = True
        logger.info("demo PKI: new CA in %s", pki.ca_cert)
    else:
        ca, ca_key = ca_pair[0][0], ca_pair[1]

    wanted_server = _wanted_san_set(server_names)
    server_pair = None if renew_leaves else _try_load_pair(pki.server_cert, pki.server_key)
    if (
        server_pair is None
        or not _still_valid(server_pair[0][0], moment)
        or not _issued_by(server_pair[0][0], ca)
        or _san_set(server_pair[0][0]) != wanted_server
    ):
        cert, key = _build_leaf(
            ca, ca_key, server_names[0], server_names, ExtendedKeyUsageOID.SERVER_AUTH, moment
        )
        _write_file(pki.server_key, _key_pem(key), 0o600)
        _write_file(pki.server_cert, _pem(cert) + _pem(ca), 0o644)
        logger.info("demo PKI: new server certificate for %s", ", ".join(server_names))

    client_pair = None if renew_leaves else _try_load_pair(pki.client_cert, pki.client_key)
    if (
        client_pair is None
        or not _still_valid(client_pair[0][0], moment)
        or not _issued_by(client_pair[0][0], ca)
        or _common_name(client_pair[0][0]) != client_cn
    ):
        cert, key = _build_leaf(
            ca, ca_key, client_cn, (client_cn,), ExtendedKeyUsageOID.CLIENT_AUTH, moment
        )
        _write_file(pki.client_key, _key_pem(key), 0o600)
        _write_file(pki.client_cert, _pem(cert), 0o644)
        logger.info("demo PKI: new client certificate CN=%s", client_cn)

    for key_path in (pki.ca_key, pki.server_key, pki.client_key):
        os.chmod(key_path, 0o600)
    return pki
