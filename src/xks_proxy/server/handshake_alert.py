"""Answer every refused client certificate with the TLS alert ``handshake_failure`` (40).

OpenSSL picks the alert for a failed client-certificate check from a fixed table
(expired -> certificate_expired, unknown issuer -> unknown_ca, ...). KMS and the
official XKS compliance client expect ``handshake_failure``, the alert the AWS sample
proxy sends. Only a verify callback can change the alert: a callback that rejects
with ``X509_V_ERR_APPLICATION_VERIFICATION`` makes OpenSSL send handshake_failure.
Python's ``ssl`` module exposes no verify callback, so this module installs one on
the context's ``SSL_CTX`` through ctypes.

Safety: the callback only ever turns "reject" into "reject" (it never accepts what
OpenSSL refused), it logs the real reason first, and it is installed only after
checks prove we are talking to the right ``SSL_CTX`` of the right libssl; if any
check fails, nothing is installed and OpenSSL's own alert stays (the handshake is
refused either way).
"""

from __future__ import annotations

import ctypes
import logging
import re
import ssl
from pathlib import Path

logger = logging.getLogger("xks_proxy.tls")

X509_V_ERR_APPLICATION_VERIFICATION = 50
SSL_VERIFY_PEER = 0x01
SSL_VERIFY_FAIL_IF_NO_PEER_CERT = 0x02
# PyObject_HEAD (refcount + type pointer) precedes ``SSL_CTX *ctx`` in CPython's
# PySSLContext: stable from 3.7 through 3.13 on 64-bit builds; verified below.
_CTX_OFFSET = 2 * ctypes.sizeof(ctypes.c_void_p)

_VERIFY_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)


class _LibSsl:
    def __init__(self, path: str) -> None:
        self.ssl = ctypes.CDLL(path)
        crypto_path = path.replace("libssl", "libcrypto")
        self.crypto = ctypes.CDLL(crypto_path)
        self.ssl.SSL_CTX_get_verify_mode.argtypes = [ctypes.c_void_p]
        self.ssl.SSL_CTX_get_verify_mode.restype = ctypes.c_int
        self.ssl.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        self.ssl.SSL_CTX_get_options.restype = ctypes.c_uint64
        self.ssl.SSL_CTX_set_verify.argtypes = [ctypes.c_void_p, ctypes.c_int, _VERIFY_CALLBACK]
        self.ssl.SSL_CTX_set_verify.restype = None
        self.crypto.X509_STORE_CTX_get_error.argtypes = [ctypes.c_void_p]
        self.crypto.X509_STORE_CTX_get_error.restype = ctypes.c_int
        self.crypto.X509_STORE_CTX_set_error.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self.crypto.X509_STORE_CTX_set_error.restype = None
        self.crypto.X509_verify_cert_error_string.argtypes = [ctypes.c_long]
        self.crypto.X509_verify_cert_error_string.restype = ctypes.c_char_p


def _loaded_libssl() -> str | None:
    """Path of the libssl the ``_ssl`` module is linked against (already mapped)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    paths = sorted(set(re.findall(r"(/\S*/libssl\.so[.\d]*)$", maps, re.MULTILINE)))
    return paths[0] if len(paths) == 1 else None


_lib: _LibSsl | None = None


def _reject_with_handshake_failure(preverify_ok: int, store_ctx: int | None) -> int:
    if preverify_ok:
        return 1
    if _lib is not None and store_ctx:
        try:
            error = _lib.crypto.X509_STORE_CTX_get_error(store_ctx)
            reason = _lib.crypto.X509_verify_cert_error_string(error) or b"unknown"
            logger.warning(
                "mTLS: client certificate refused in the TLS handshake: %s",
                reason.decode("ascii", "replace"),
            )
            _lib.crypto.X509_STORE_CTX_set_error(store_ctx, X509_V_ERR_APPLICATION_VERIFICATION)
        except Exception:  # noqa: S110 - never let logging break the refusal
            pass
    return 0


_callback = _VERIFY_CALLBACK(_reject_with_handshake_failure)


def install(context: ssl.SSLContext) -> bool:
    """Install the callback on a server context that requires client certificates.

    Returns whether it was installed; when it was not, OpenSSL's own alert is sent.
    """
    global _lib
    if context.verify_mode != ssl.CERT_REQUIRED:
        return False
    try:
        if _lib is None:
            path = _loaded_libssl()
            if path is None or ssl.OPENSSL_VERSION_INFO[0] < 3:
                logger.info("TLS: keeping OpenSSL's own client-certificate alerts")
                return False
            _lib = _LibSsl(path)
        pointer = ctypes.c_void_p.from_address(id(context) + _CTX_OFFSET).value
        if not pointer:
            return False
        # Prove the pointer is this context's SSL_CTX before writing through it.
        expected_mode = SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT
        if _lib.ssl.SSL_CTX_get_verify_mode(pointer) != expected_mode:
            return False
        if _lib.ssl.SSL_CTX_get_options(pointer) != int(context.options):
            return False
        _lib.ssl.SSL_CTX_set_verify(pointer, expected_mode, _callback)
    except (OSError, AttributeError, ValueError) as exc:
        logger.info("TLS: keeping OpenSSL's own client-certificate alerts (%s)", exc)
        return False
    return True
