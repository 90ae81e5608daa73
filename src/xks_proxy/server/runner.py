"""Start the proxy: validate config, open the HSM, then hand over to the supervisor.

The HSM is opened (library loaded, token found, PIN checked, health round trip done)
before the first request can arrive, so a wrong module path or PIN stops start-up with
a clear message. Workers are spawned with fork+exec and open their own sessions.
"""

from __future__ import annotations

import logging
from typing import Any

from xks_proxy.config import HsmConfig, ProxyConfig
from xks_proxy.keymanager.base import KeyManager
from xks_proxy.keymanager.pkcs11 import Pkcs11KeyManager, Pkcs11Settings
from xks_proxy.service import XksService

logger = logging.getLogger("xks_proxy.server")


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


def uvicorn_options(config: ProxyConfig) -> dict[str, Any]:
    return {
        "http": "httptools",
        "loop": "uvloop",
        "lifespan": "on",
        "access_log": False,
        "server_header": False,
        "log_config": None,
        # KMS reuses connections; a short idle timeout would cost it TLS handshakes.
        "timeout_keep_alive": config.server.keep_alive_seconds,
        "timeout_graceful_shutdown": config.server.graceful_shutdown_seconds,
    }


def restart_needed_for(old: ProxyConfig, new: ProxyConfig) -> list[str]:
    """Settings a reload cannot apply in place (they need a restart)."""
    changed = []
    for name in ("host", "port", "workers", "state_dir", "health_host", "health_port"):
        if getattr(old.server, name) != getattr(new.server, name):
            changed.append(f"server.{name}")
    if old.hsm != new.hsm:
        changed.append("hsm")
    if (old.tls is None) != (new.tls is None) or (
        old.tls is not None
        and new.tls is not None
        and (old.tls.client_ca_file is None) != (new.tls.client_ca_file is None)
    ):
        changed.append("tls (turning TLS or mTLS on or off)")
    return changed


def serve(config: ProxyConfig) -> int:
    """Run the proxy until SIGTERM/SIGINT; SIGHUP reloads the configuration."""
    from xks_proxy.server.supervisor import Supervisor
    from xks_proxy.server.worker import tls_settings

    if config.tls is None:
        logger.warning("serving plain HTTP: KMS requires HTTPS; use this only for local testing")
    else:
        from xks_proxy.server.tls import TlsConfigError, build_server_context

        try:
            build_server_context(tls_settings(config.tls))
        except TlsConfigError as exc:
            raise StartupError(f"TLS: {exc}") from None
    key_manager = open_key_manager(config.hsm)
    info = key_manager.info()
    logger.info(
        "HSM ready: %s %s (%s); serving %d key store(s) on %s://%s:%d with %d worker(s)",
        info.vendor,
        info.model,
        info.id,
        len(config.key_stores),
        "https" if config.tls else "http",
        config.server.host,
        config.server.port,
        config.server.workers,
    )
    if config.server.health_port is None:
        key_manager.close()  # only the workers talk to the HSM from here on
    try:
        return Supervisor(config, key_manager).run()
    except OSError as exc:
        raise StartupError(str(exc)) from None
    finally:
        key_manager.close()
