"""SigV4 credentials for KMS: generation and the KMS console's configuration file.

Access key id: 20-30 characters of A-Z and 2-7; secret: 43-64 characters of
A-Z a-z 0-9 / + = with at least 256 bits of entropy (spec: Appendix A).
"""

from __future__ import annotations

import base64
import secrets
import time
from pathlib import Path
from typing import Any

from xks_proxy.config import Credential, KeyStoreConfig, ProxyConfig
from xks_proxy.statefiles import read_json, write_json_atomic

SEEN_FILE = "credentials-seen.json"


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


def track_credential_ages(state_dir: Path, config: ProxyConfig) -> dict[tuple[str, str], float]:
    """When each configured credential was first seen (for XksProxyCredentialAge).

    Kept in ``<state_dir>/credentials-seen.json``; credentials no longer configured
    are forgotten, so re-adding one starts its age again.
    """
    path = state_dir / SEEN_FILE
    stored = read_json(path) or {}
    now = time.time()
    seen: dict[str, float] = {}
    for store in config.key_stores:
        for credential in store.credentials:
            name = f"{store.name}/{credential.access_key_id}"
            value = stored.get(name)
            seen[name] = float(value) if isinstance(value, int | float) else now
    if seen != stored:
        write_json_atomic(path, dict(seen))
    ages: dict[tuple[str, str], float] = {}
    for name, when in seen.items():
        key_store, _, access_key_id = name.partition("/")
        ages[(key_store, access_key_id)] = when
    return ages
