"""The XKS error vocabulary: one exception type per row of the spec's error table.

Spec section "Error codes": every error is answered with an HTTP status and a
JSON body ``{"errorName": ..., "errorMessage": ...}``; the message is optional,
shorter than 512 characters and printable ASCII (0x20-0x7e) only.
"""

from __future__ import annotations

MAX_ERROR_MESSAGE_CHARS = 511


def clean_error_message(message: str) -> str:
    """Make a message safe for the errorMessage field: printable ASCII, < 512 chars."""
    cleaned = "".join(ch if " " <= ch <= "~" else "?" for ch in message)
    if len(cleaned) > MAX_ERROR_MESSAGE_CHARS:
        cleaned = cleaned[: MAX_ERROR_MESSAGE_CHARS - 3] + "..."
    return cleaned


class XksError(Exception):
    """Base of every error the proxy answers with; carries the spec's status and errorName."""

    status: int = 500
    error_name: str = "InternalException"
    default_message: str = "internal error"

    def __init__(self, message: str | None = None) -> None:
        self.error_message = clean_error_message(message or self.default_message)
        super().__init__(self.error_message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.error_message!r})"


class ValidationException(XksError):
    status = 400
    error_name = "ValidationException"
    default_message = "one or more input parameters is invalid"


class InvalidStateException(XksError):
    status = 400
    error_name = "InvalidStateException"
    default_message = "the external key or key store is disabled"


class InvalidCiphertextException(XksError):
    status = 400
    error_name = "InvalidCiphertextException"
    default_message = (
        "the ciphertext, initialization vector, additional authenticated data, "
        "ciphertext metadata or authentication tag is corrupted, missing or otherwise invalid"
    )


class InvalidKeyUsageException(XksError):
    status = 400
    error_name = "InvalidKeyUsageException"
    default_message = "the external key does not support the requested operation"


class AuthenticationFailedException(XksError):
    status = 401
    error_name = "AuthenticationFailedException"
    default_message = "the request signature could not be verified"


class AccessDeniedException(XksError):
    status = 403
    error_name = "AccessDeniedException"
    default_message = "the operation is not authorized for this request"


class KeyNotFoundException(XksError):
    status = 404
    error_name = "KeyNotFoundException"
    default_message = "the external key was not found"


class InvalidUriPathException(XksError):
    status = 404
    error_name = "InvalidUriPathException"
    default_message = "the URI path is not valid"


class ThrottlingException(XksError):
    status = 429
    error_name = "ThrottlingException"
    default_message = "the request rate is too high"


class UnsupportedOperationException(XksError):
    status = 501
    error_name = "UnsupportedOperationException"
    default_message = "the operation or parameter size is not supported"


class DependencyTimeoutException(XksError):
    status = 503
    error_name = "DependencyTimeoutException"
    default_message = "the external key manager did not answer in time"


class InternalException(XksError):
    status = 500
    error_name = "InternalException"
    default_message = "internal error in the proxy or the external key manager"


class MethodNotAllowed(XksError):
    """HTTP 405 for any method but POST on an API URI (spec: "API operations").

    Not an errorName of the spec's table; the body still follows its shape so a
    client always gets JSON.
    """

    status = 405
    error_name = "MethodNotAllowedException"
    default_message = "only POST is allowed on this URI"


ALL_ERRORS: tuple[type[XksError], ...] = (
    ValidationException,
    InvalidStateException,
    InvalidCiphertextException,
    InvalidKeyUsageException,
    AuthenticationFailedException,
    AccessDeniedException,
    KeyNotFoundException,
    InvalidUriPathException,
    ThrottlingException,
    UnsupportedOperationException,
    DependencyTimeoutException,
    InternalException,
)
