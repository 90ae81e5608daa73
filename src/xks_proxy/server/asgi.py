"""The HTTP edge as a bare ASGI application (no framework: one route table, four APIs).

Its jobs: cap the body before reading it in full (and before authentication), hand
the request to the service, write the single-line JSON answer, and log the request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from xks_proxy.observability.logging import flush_request_log, log_request
from xks_proxy.observability.looplag import LoopLagMonitor
from xks_proxy.observability.metrics import FLUSH_SECONDS, MULTIPROC_ENV, RequestMetrics
from xks_proxy.protocol.errors import InternalException, UnsupportedOperationException
from xks_proxy.service import JSON_HEADERS, XksService, error_body, error_outcome

logger = logging.getLogger("xks_proxy.server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CLOSE_HEADERS = [*JSON_HEADERS, (b"connection", b"close")]


class BodyTooLarge(Exception):
    """The request body exceeds the configured cap."""


class XksApp:
    """ASGI app serving the XKS API.

    The service is built at lifespan start-up by ``service_factory``, inside the
    worker process itself: PKCS#11 is never initialised before a process is spawned.
    ``on_started`` runs right after (the worker installs its reload handler there).
    """

    def __init__(
        self,
        service_factory: Callable[[], XksService],
        *,
        on_started: Callable[[XksService], None] | None = None,
    ) -> None:
        self.service: XksService | None = None
        self.service_factory = service_factory
        self.on_started = on_started
        self.metrics: RequestMetrics | None = None
        self.loop_lag: LoopLagMonitor | None = None
        if os.environ.get(MULTIPROC_ENV):
            self.metrics = RequestMetrics()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self.service = self.service_factory()
                    self.service.start()
                    self.loop_lag = LoopLagMonitor(
                        self.metrics.observe_loop_lag if self.metrics is not None else None
                    )
                    self.loop_lag.start()
                    if self.metrics is not None:
                        self._flush_metrics_later()
                    if self.on_started is not None:
                        self.on_started(self.service)
                except Exception as exc:
                    logger.error("worker start-up failed: %s", exc)
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.loop_lag is not None:
                    self.loop_lag.stop()
                if self.metrics is not None:
                    try:
                        self.metrics.flush()
                    except Exception as exc:  # never in the way of closing the HSM
                        logger.error("metrics flush at shutdown failed: %s", exc)
                if self.service is not None:
                    self.service.close()
                flush_request_log()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _flush_metrics_later(self) -> None:
        asyncio.get_running_loop().call_later(FLUSH_SECONDS, self._flush_metrics)

    def _flush_metrics(self) -> None:
        assert self.metrics is not None
        try:
            self.metrics.flush()
        except Exception as exc:  # metrics must never take the worker down
            logger.error("metrics flush failed: %s", exc)
        self._flush_metrics_later()

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        service = self.service
        if service is None:  # lifespan disabled and no service: refuse rather than crash
            not_started = InternalException("proxy not started")
            await _respond(send, not_started.status, error_body(not_started), CLOSE_HEADERS)
            return
        max_body_bytes = service.config.server.max_body_bytes
        peer = scope.get("client")
        client: str | None = peer[0] if peer else None
        try:
            body = await _read_body(scope, receive, max_body_bytes)
        except BodyTooLarge:
            too_large = UnsupportedOperationException(
                f"request body larger than {max_body_bytes} bytes is not supported"
            )
            outcome = await service.refused(error_outcome(too_large, CLOSE_HEADERS), client=client)
        else:
            raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8", "replace")
            outcome = await service.handle(
                scope["method"],
                raw_path.split(b"?", 1)[0],
                scope["query_string"],
                scope["headers"],
                body,
                client=client,
            )
        await _respond(send, outcome.status, outcome.body, outcome.headers)
        elapsed = time.perf_counter() - started
        outcome.log["latencyMs"] = round(elapsed * 1000, 3)
        if self.metrics is not None:
            self.metrics.observe(outcome.log, elapsed)
        log_request(outcome.log)


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                if int(value) > limit:
                    raise BodyTooLarge()
            except ValueError:
                pass  # the HTTP parser already rejects malformed lengths
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge()
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode("ascii"))],
        }
    )
    await send({"type": "http.response.body", "body": body})
