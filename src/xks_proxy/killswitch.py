"""The kill switch: disable a key, a key store or the whole proxy at runtime.

The customer's ultimate control over its data in AWS is to make its keys unusable.
State lives in ``<state_dir>/killswitch.json`` (persisted across restarts, written
atomically under an exclusive lock); every change is appended to
``<state_dir>/killswitch-events.jsonl`` with who/when/why and logged. Workers poll
the file's change time every :data:`POLL_SECONDS`, so a change is in force on every
worker within a second.

Effects (spec: Error codes, GetKeyMetadata):
- disabled key: GetKeyMetadata answers keyStatus DISABLED; Encrypt/Decrypt answer 400
  InvalidStateException;
- disabled key store or proxy: every call to it (health included) answers 400
  InvalidStateException.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xks_proxy.statefiles import read_json, write_json_atomic

logger = logging.getLogger("xks_proxy.killswitch")

STATE_FILE = "killswitch.json"
EVENTS_FILE = "killswitch-events.jsonl"
LOCK_FILE = ".killswitch.lock"
POLL_SECONDS = 0.25


@dataclass(frozen=True, slots=True)
class KillSwitchState:
    proxy_disabled: bool = False
    disabled_key_stores: frozenset[str] = frozenset()
    disabled_keys: frozenset[tuple[str, str]] = frozenset()  # (key store, external key id)

    @classmethod
    def from_json(cls, document: dict[str, Any] | None) -> KillSwitchState:
        if not document:
            return cls()
        keys = document.get("disabled_keys", [])
        return cls(
            proxy_disabled=bool(document.get("proxy_disabled", False)),
            disabled_key_stores=frozenset(str(s) for s in document.get("disabled_key_stores", [])),
            disabled_keys=frozenset(
                (str(k["key_store"]), str(k["key"])) for k in keys if isinstance(k, dict)
            ),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "proxy_disabled": self.proxy_disabled,
            "disabled_key_stores": sorted(self.disabled_key_stores),
            "disabled_keys": [
                {"key_store": store, "key": key} for store, key in sorted(self.disabled_keys)
            ],
        }

    def key_store_blocked(self, key_store: str) -> bool:
        return self.proxy_disabled or key_store in self.disabled_key_stores

    def key_disabled(self, key_store: str, external_key_id: str) -> bool:
        return (key_store, external_key_id) in self.disabled_keys


class KillSwitchWatcher:
    """A worker's view of the kill switch file, refreshed cheaply by polling."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / STATE_FILE
        self.state = KillSwitchState()
        self._stamp: tuple[int, int] | None = None
        self.refresh()

    def refresh(self) -> None:
        """Re-read the file if it changed; an unreadable file keeps the last state."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            stamp = None
        else:
            stamp = (stat.st_mtime_ns, stat.st_ino)
        if stamp == self._stamp:
            return
        document = read_json(self.path) if stamp is not None else None
        if stamp is not None and document is None:
            logger.error("kill switch file %s is unreadable; keeping the last state", self.path)
            return
        new_state = KillSwitchState.from_json(document)
        if new_state != self.state:
            logger.warning("kill switch now: %s", json.dumps(new_state.to_json()))
        self.state = new_state
        self._stamp = stamp


@contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(state_dir / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def change(
    state_dir: Path,
    *,
    disable: bool,
    key_store: str | None = None,
    key: str | None = None,
    reason: str = "",
) -> KillSwitchState:
    """Disable or enable the proxy (no key_store), a key store, or one key of a store."""
    if key is not None and key_store is None:
        raise ValueError("a key is named within its key store")
    with _locked(state_dir):
        state = KillSwitchState.from_json(read_json(state_dir / STATE_FILE))
        if key_store is None:
            target = "proxy"
            new = KillSwitchState(disable, state.disabled_key_stores, state.disabled_keys)
        elif key is None:
            target = f"key store {key_store}"
            stores = set(state.disabled_key_stores)
            (stores.add if disable else stores.discard)(key_store)
            new = KillSwitchState(state.proxy_disabled, frozenset(stores), state.disabled_keys)
        else:
            target = f"key {key} of key store {key_store}"
            keys = set(state.disabled_keys)
            (keys.add if disable else keys.discard)((key_store, key))
            new = KillSwitchState(state.proxy_disabled, state.disabled_key_stores, frozenset(keys))
        write_json_atomic(state_dir / STATE_FILE, new.to_json())
        event = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "action": "disable" if disable else "enable",
            "target": target,
            "reason": reason[:500],
            "user": _user(),
            "host": socket.gethostname(),
        }
        fd = os.open(state_dir / EVENTS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (json.dumps(event) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    logger.warning("kill switch: %s %s (%s)", event["action"], target, reason or "no reason given")
    return new


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return str(os.getuid())
