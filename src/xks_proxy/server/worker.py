"""One worker process: uvicorn serving the XKS app on the supervisor's socket.

The worker opens its own PKCS#11 sessions once it runs (never inherited across a
fork) and builds its TLS context. It never reads the config file: the supervisor
hands it the last validated configuration at start and sends new ones over a pipe,
which the worker applies in place — key stores, credentials, limits, TLS certificate
and allowed mTLS client names change without dropping a connection.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import uvicorn

from xks_proxy.config import ConfigError, ProxyConfig, TlsConfig
from xks_proxy.observability.logging import configure_logging
from xks_proxy.server import reload as reload_files
from xks_proxy.server.asgi import XksApp
from xks_proxy.server.runner import build_service, restart_needed_for, uvicorn_options
from xks_proxy.service import XksService

if TYPE_CHECKING:
    from xks_proxy.server.tls import TlsSettings

logger = logging.getLogger("xks_proxy.worker")

GIL_SWITCH_INTERVAL_SECONDS = 0.0005
GC_THRESHOLDS = (20_000, 20, 20)

DRAIN = "drain"  # supervisor -> worker: answer with Connection: close from now on


def tls_settings(tls: TlsConfig) -> TlsSettings:
    """The TLS module's settings from the config (imported lazily: plain HTTP needs none)."""
    from xks_proxy.server.tls import TlsSettings

    return TlsSettings(
        cert_file=tls.cert_file,
        key_file=tls.key_file,
        key_password=tls.key_password,
        client_ca_file=tls.client_ca_file,
        allowed_client_names=tls.client_names,
    )


class Worker:
    """The state of one worker process and its reload logic."""

    def __init__(self, config: ProxyConfig, index: int, control: Connection) -> None:
        self.config = config
        self.index = index
        self.control = control
        self.service: XksService | None = None
        self.draining = False
        self.tls_context: ssl.SSLContext | None = None
        if config.tls is not None:
            from xks_proxy.server.tls import PeerNamePolicy, build_server_context

            self.tls_context = build_server_context(tls_settings(config.tls))
            PeerNamePolicy.set_allowed(config.tls.client_names)

    def uvicorn_config(self) -> uvicorn.Config:
        app = CloseWhenDraining(
            XksApp(lambda: build_service(self.config, self.index), on_started=self._started),
            lambda: self.draining,
        )
        options: dict[str, Any] = uvicorn_options(self.config)
        if self.tls_context is not None:
            context = self.tls_context
            factory: Callable[..., ssl.SSLContext] = lambda *_: context  # noqa: E731
            options["ssl_context_factory"] = factory
            if self.config.tls is not None and self.config.tls.client_ca_file is not None:
                from xks_proxy.server.tls import MtlsHttpToolsProtocol

                options["http"] = MtlsHttpToolsProtocol
        return uvicorn.Config(app, **options)

    def _started(self, service: XksService) -> None:
        self.service = service
        # Reloads asked for while we were starting wait in the pipe until now.
        asyncio.get_running_loop().add_reader(self.control.fileno(), self._on_control)
        # Everything built so far lives as long as the worker: keep it out of the
        # garbage collector's scans, and collect the young generation less often
        # (requests make few reference cycles), so collections stop showing up as
        # latency spikes. Measured in docs/performance.md.
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        logger.info("worker %d ready", self.index)

    def _on_control(self) -> None:
        try:
            message = self.control.recv()
        except (EOFError, OSError):
            # The supervisor is gone: stop serving rather than run unsupervised.
            asyncio.get_running_loop().remove_reader(self.control.fileno())
            logger.error("worker %d lost its supervisor; exiting", self.index)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if message == DRAIN:
            self.draining = True
            logger.info("worker %d draining: responses close their connections", self.index)
            return
        generation, new_config = message
        self.control.send(self.apply(generation, new_config))

    def apply(self, generation: int, new_config: ProxyConfig) -> reload_files.ReloadResult:
        """Apply a configuration the supervisor validated; keep the old one on failure."""
        try:
            restart_needed = restart_needed_for(self.config, new_config)
            tls_mode_changed = any(item.startswith("tls") for item in restart_needed)
            if self.tls_context is not None and new_config.tls is not None and not tls_mode_changed:
                from xks_proxy.server.tls import PeerNamePolicy, reload_certificates

                reload_certificates(self.tls_context, tls_settings(new_config.tls))
                PeerNamePolicy.set_allowed(new_config.tls.client_names)
            for setting in restart_needed:
                logger.warning("reload: %s changed; it takes effect after a restart", setting)
            if self.service is not None:
                self.service.apply_config(new_config)
            self.config = new_config
        except Exception as exc:
            message = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
            logger.error("reload failed, keeping the running configuration: %s", message)
            return reload_files.ReloadResult(generation, False, message)
        logger.info("configuration reloaded (generation %d)", generation)
        return reload_files.ReloadResult(generation, True)


class CloseWhenDraining:
    """ASGI wrapper: while draining, every response carries ``Connection: close``.

    uvicorn then closes the connection right after that response, and the client,
    having read the header, opens its next connection through the load balancer (to
    an instance still in rotation) instead of reusing this one. So no idle keep-alive
    connection is left for the final shutdown to close under a request in flight.
    """

    def __init__(self, app: XksApp, draining: Callable[[], bool]) -> None:
        self.app = app
        self.draining = draining

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.draining():
            await self.app(scope, receive, send)
            return

        async def send_closing(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", ()), (b"connection", b"close")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_closing)


def run_worker(
    config: ProxyConfig, index: int, control: Connection, sockets: list[socket.socket]
) -> None:
    """Entry point of a spawned worker process."""
    # HSM calls (and audit writes with fsync) run on their own threads; a thread waiting for the GIL
    # would otherwise wait up to the default 5 ms switch interval while the event loop
    # is busy, which showed up as milliseconds of latency per request.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_SECONDS)
    configure_logging(config.log_level)
    try:
        worker = Worker(config, index, control)
    except Exception as exc:
        logger.error("worker %d cannot start: %s", index, exc)
        raise SystemExit(3) from None
    server = uvicorn.Server(worker.uvicorn_config())
    server.run(sockets=sockets)
    if not server.started:
        raise SystemExit(3)
