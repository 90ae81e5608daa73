"""URI paths of the XKS API (spec: API operations).

``[/<prefix>]/kms/xks/v1/health`` and ``[/<prefix>]/kms/xks/v1/keys/<externalKeyId>/<op>``.
Parsing here only decides the shape; which prefixes exist is the key store table's
business (see :mod:`xks_proxy.keystores`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from xks_proxy.protocol.errors import InvalidUriPathException, ValidationException
from xks_proxy.protocol.models import XksOperation

API_ROOT = "/kms/xks/v1"
MAX_URI_PATH_CHARS = 128  # whole XksProxyUriPath: prefix + /kms/xks/v1
PREFIX_RE = re.compile(r"[A-Za-z0-9/_-]*")
EXTERNAL_KEY_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")

# Greedy (.*) picks the last /kms/xks/v1, so a prefix may itself contain that text.
_PATH_RE = re.compile(
    r"(?P<prefix>.*)/kms/xks/v1/(?:(?P<health>health)|keys/(?P<key>[^/]*)/(?P<op>metadata|encrypt|decrypt))"
)
_KEY_OPERATIONS = {
    "metadata": XksOperation.GET_KEY_METADATA,
    "encrypt": XksOperation.ENCRYPT,
    "decrypt": XksOperation.DECRYPT,
}


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request goes: the key store's URI prefix, the API and the external key."""

    uri_prefix: str  # "" or "/a/b" (leading slash, no trailing slash)
    operation: XksOperation
    external_key_id: str | None


def parse_path(path: str) -> Route:
    """Split a request path into prefix, operation and external key id.

    Raises InvalidUriPathException for anything that is not an XKS API path.
    """
    match = _PATH_RE.fullmatch(path)
    if match is None:
        raise InvalidUriPathException("not an XKS API path")
    prefix = match.group("prefix")
    if prefix and (not prefix.startswith("/") or prefix.endswith("/") or "//" in prefix):
        raise InvalidUriPathException("malformed URI path prefix")
    if match.group("health"):
        return Route(prefix, XksOperation.GET_HEALTH_STATUS, None)
    key = match.group("key")
    # SigV4 canonicalisation removes "." and ".." segments; a key id spelt like one
    # would be signed as a different path than the one routed, so refuse it.
    if key in (".", ".."):
        raise InvalidUriPathException("not an XKS API path")
    return Route(prefix, _KEY_OPERATIONS[match.group("op")], key)


def validate_external_key_id(external_key_id: str) -> None:
    """externalKeyId: 1-128 characters of A-Z a-z 0-9 . - _ (spec: API operations)."""
    if EXTERNAL_KEY_ID_RE.fullmatch(external_key_id) is None:
        raise ValidationException("externalKeyId must be 1-128 characters of A-Z a-z 0-9 . - _")


def normalize_uri_prefix(prefix: str) -> str:
    """Turn a configured prefix ("a/b", "/a/b/", "") into the form parse_path yields."""
    stripped = prefix.strip("/")
    return f"/{stripped}" if stripped else ""


def uri_path_problem(prefix: str) -> str | None:
    """Why a configured prefix cannot be a KMS XksProxyUriPath, or None if it can."""
    normalized = normalize_uri_prefix(prefix)
    if PREFIX_RE.fullmatch(normalized) is None:
        return "may only contain a-z A-Z 0-9 / - _"
    if "//" in normalized:
        return "must not contain empty path segments"
    if len(normalized + API_ROOT) > MAX_URI_PATH_CHARS:
        return f"makes the URI path longer than {MAX_URI_PATH_CHARS} characters"
    return None
