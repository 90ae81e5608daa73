"""SigV4 credentials for KMS: generation and the KMS console's configuration file.

Access key id: 20-30 characters of A-Z and 2-7; secret: 43-64 characters of
A-Z a-z 0-9 / + = with at least 256 bits of entropy (spec: Appendix A).
"""

from __future__ import annotations

import base64
import secrets
from typing import Any

from xks_proxy.config import Credential, KeyStoreConfig


def new_credential() -> Credential:
    """A fresh random credential: 130-bit access key id, 256-bit secret."""
    access_key_id = base64.b32encode(secrets.token_bytes(16)).decode("ascii").rstrip("=")
    secret = base64.b64encode(secrets.token_bytes(32)).decode("ascii")
    return Credential(access_key_id, secret)


def kms_console_config(key_store: KeyStoreConfig, credential: Credential) -> dict[str, Any]:
    """The JSON file the KMS console accepts (spec: XKS proxy configuration in AWS KMS console)."""
    return {
        "XksProxyUriPath": key_store.uri_path,
        "XksProxyAuthenticationCredential": {
            "AccessKeyId": credential.access_key_id,
            "RawSecretAccessKey": credential.secret_access_key,
        },
    }
