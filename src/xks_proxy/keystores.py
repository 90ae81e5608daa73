"""The table of logical key stores: who may call which URI prefix, with which keys.

The access key id picks the secret (spec: Appendix A) and, because access key ids
are unique across the whole proxy, also the key store. A request is authenticated
before its prefix is looked at, so an unauthenticated caller cannot probe which
prefixes exist: a valid signature on another store's prefix is InvalidUriPath.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from xks_proxy.config import KeyStoreConfig


@dataclass(frozen=True, slots=True)
class KeyStoreTable:
    by_access_key_id: dict[str, tuple[KeyStoreConfig, str]]

    @classmethod
    def build(cls, key_stores: Iterable[KeyStoreConfig]) -> KeyStoreTable:
        table: dict[str, tuple[KeyStoreConfig, str]] = {}
        for store in key_stores:
            for credential in store.credentials:
                table[credential.access_key_id] = (store, credential.secret_access_key)
        return cls(table)

    def secret_for(self, access_key_id: str) -> str | None:
        """The secret of an access key id, or None (SigV4 lookup callback)."""
        entry = self.by_access_key_id.get(access_key_id)
        return entry[1] if entry else None

    def key_store_for(self, access_key_id: str) -> KeyStoreConfig:
        """The key store an (already verified) access key id belongs to."""
        return self.by_access_key_id[access_key_id][0]
