"""Start the proxy: validate config, open the HSM, then serve with uvicorn.

The HSM is opened (library loaded, token found, PIN checked, health round trip done)
before the first request can arrive, so a wrong module path or PIN stops start-up with
a clear message. With several workers each worker opens its own PKCS#11 session pool
after it has been spawned; the supervisor's own check is closed before any worker
starts (uvicorn spawns workers with fork+exec, never a bare fork).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import uvicorn

from xks_proxy.config import HsmConfig, ProxyConfig, load_config
from xks_proxy.keymanager.base import KeyManager
from xks_proxy.keymanager.pkcs11 import Pkcs11KeyManager, Pkcs11Settings
from xks_proxy.server.asgi import XksApp
from xks_proxy.service import XksService

logger = logging.getLogger("xks_proxy.server")

CONFIG_ENV = "XKS_PROXY_CONFIG"


class StartupError(Exception):
    """The proxy cannot start; the message says why."""


def open_key_manager(hsm: HsmConfig) -> KeyManager:
    """Open the configured PKCS#11 token and prove it can do a GCM round trip."""
    settings = Pkcs11Settings(
        module_path=hsm.module,
        token_label=hsm.token_label,
        slot=hsm.slot,
        pin=hsm.pin,
        health_check_key_label=hsm.health_check_key_label,
        sessions=hsm.sessions,
        environment=dict(hsm.environment),
    )
    key_manager = Pkcs11KeyManager.open(settings)
    try:
        key_manager.health_check()
    except Exception as exc:
        key_manager.close()
        raise StartupError(f"HSM health check failed: {exc}") from None
    return key_manager


def build_service(config: ProxyConfig) -> XksService:
    return XksService(config, open_key_manager(config.hsm))


def app_from_environment() -> XksApp:
    """uvicorn factory for spawned workers: config path from $XKS_PROXY_CONFIG."""
    path = Path(os.environ[CONFIG_ENV])
    return XksApp(service_factory=lambda: build_service(load_config(path)))


def uvicorn_options(config: ProxyConfig) -> dict[str, object]:
    return {
        "host": config.server.host,
        "port": config.server.port,
        "http": "httptools",
        "loop": "uvloop",
        "lifespan": "on",
        "access_log": False,
        "server_header": False,
        "log_config": None,
        # KMS reuses connections; a short idle timeout would cost it TLS handshakes.
        "timeout_keep_alive": 60,
        "timeout_graceful_shutdown": 10,
    }


def serve(config: ProxyConfig) -> None:
    """Run the proxy until interrupted."""
    if not config.server.allow_plain_http:
        raise StartupError(
            "TLS is not configured: set server.allow_plain_http = true to serve plain HTTP "
            "(only for loopback testing)"
        )
    logger.warning("serving plain HTTP: KMS requires HTTPS; use this only for local testing")
    key_manager = open_key_manager(config.hsm)
    info = key_manager.info()
    logger.info(
        "HSM ready: %s %s (%s); serving %d key store(s) on %s:%d with %d worker(s)",
        info.vendor,
        info.model,
        info.id,
        len(config.key_stores),
        config.server.host,
        config.server.port,
        config.server.workers,
    )
    options = uvicorn_options(config)
    if config.server.workers == 1:
        service = XksService(config, key_manager)
        uvicorn.run(XksApp(service), **options)  # type: ignore[arg-type]
        return
    key_manager.close()
    if config.source is None:
        raise StartupError("several workers need the configuration to come from a file")
    os.environ[CONFIG_ENV] = str(config.source.resolve())
    uvicorn.run(
        "xks_proxy.server.runner:app_from_environment",
        factory=True,
        workers=config.server.workers,
        **options,  # type: ignore[arg-type]
    )
