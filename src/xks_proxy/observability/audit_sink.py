"""The service's side of the audit log: group commit off the event loop.

Every API decision is written to the tamper-evident audit log *before* the answer
goes out, so no answered request lacks its record even if the process crashes right
after (and, with fsync, if the machine loses power). Records from concurrent
requests are batched: one lock and one fsync serve all records waiting at that
moment, so durability costs one disk sync per batch, not per request, and never
blocks the event loop. If the log cannot be written the request fails (fail closed).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Mapping
from typing import Any

from xks_proxy.observability.audit import AuditLog

logger = logging.getLogger("xks_proxy.audit")

MAX_BATCH = 256
AUDIT_FIELDS = (
    "kmsRequestId",
    "operation",
    "kmsOperation",
    "keyStore",
    "externalKeyId",
    "accessKeyId",
    "awsPrincipalArn",
    "kmsKeyArn",
    "kmsViaService",
    "awsSourceVpc",
    "awsSourceVpce",
    "status",
    "errorName",
    "latencyMs",
    "hsm",
    "authzDecision",
    "authzPolicyIds",
    "client",
)

_Item = tuple[dict[str, Any], asyncio.Future[None], asyncio.AbstractEventLoop]


def audit_record(log: Mapping[str, Any]) -> dict[str, Any]:
    """The audit fields of a request-log record (never plaintext, AAD or secrets)."""
    return {name: log[name] for name in AUDIT_FIELDS if name in log}


class AuditSink:
    def __init__(self, audit_log: AuditLog) -> None:
        self.audit_log = audit_log
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="xks-audit", daemon=True)
        self._thread.start()

    async def record(self, fields: dict[str, Any]) -> None:
        """Append one record; returns once it is durably written."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._queue.put((fields, future, loop))
        await future

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < MAX_BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(more)
            error: BaseException | None = None
            try:
                self.audit_log.append_many([fields for fields, _, _ in batch])
            except Exception as exc:  # reported to every waiting request
                logger.error("audit log write failed: %s", exc)
                error = exc
            for _, future, loop in batch:
                try:
                    loop.call_soon_threadsafe(_settle, future, error)
                except RuntimeError:
                    pass  # loop closed while shutting down

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(5)
        self.audit_log.close()


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
