"""Start the proxy: validate config, open the HSM, then hand over to the supervisor.

The HSM is opened (library loaded, token found, PIN checked, health round trip done)
before the first request can arrive, so a wrong module path or PIN stops start-up with
a clear message. Workers are spawned with fork+exec and open their own sessions.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from xks_proxy.config import HsmConfig, ProxyConfig
from xks_proxy.keymanager.base import KeyManager
from xks_proxy.keymanager.failover import FailoverKeyManager
from xks_proxy.keymanager.pkcs11 import KeyManagerStartupError, Pkcs11KeyManager, Pkcs11Settings
from xks_proxy.server.protocol import XksHttpToolsProtocol
from xks_proxy.service import XksService

logger = logging.getLogger("xks_proxy.server")


class StartupError(Exception):
    """The proxy cannot start; the message says why."""


def pkcs11_settings(hsm: HsmConfig) -> Pkcs11Settings:
    return Pkcs11Settings(
        module_path=hsm.module,
        token_label=hsm.token_label,
        slot=hsm.slot,
        pin=hsm.pin,
        health_check_key_label=hsm.health_check_key_label,
        sessions=hsm.sessions,
        environment=dict(hsm.environment),
        acquire_timeout=hsm.acquire_timeout,
        recovery_interval=hsm.recovery_interval,
        recovery_max_interval=hsm.recovery_max_interval,
    )


def open_key_manager(config: ProxyConfig) -> KeyManager:
    """Open the configured HSM(s) and prove a GCM round trip works.

    With several HSMs every one is opened and checked at start-up (a wrong PIN on any
    of them stops the start), then a FailoverKeyManager spreads calls across them.
    """
    opened: list[tuple[str, KeyManager]] = []
    try:
        for hsm in config.hsms:
            try:
                key_manager = Pkcs11KeyManager.open(pkcs11_settings(hsm))
            except KeyManagerStartupError as exc:
                raise StartupError(f"HSM {hsm.name!r}: {exc}") from None
            opened.append((hsm.name, key_manager))
            try:
                key_manager.health_check()
            except Exception as exc:
                raise StartupError(f"HSM {hsm.name!r}: health check failed: {exc}") from None
    except BaseException:
        for _, opened_manager in opened:
            opened_manager.close()
        raise
    if len(opened) == 1:
        return opened[0][1]
    failover = FailoverKeyManager(
        opened,
        degraded_latency_ms=config.health.degraded_latency_ms,
        recovery_seconds=config.health.probation_seconds,
    )
    failover.start_probing(config.health.interval_seconds)
    return failover


def build_service(config: ProxyConfig, worker: int = 0) -> XksService:
    return XksService(config, open_key_manager(config), worker=worker)


def uvicorn_options(config: ProxyConfig) -> dict[str, Any]:
    return {
        "http": XksHttpToolsProtocol,  # httptools, one write per response
        # No X-Forwarded-* handling: the proxy sits behind TCP load balancers, and the
        # middleware would cost every request a wrapper call for nothing.
        "proxy_headers": False,
        "loop": "uvloop",
        "lifespan": "on",
        "access_log": False,
        "server_header": False,
        "log_config": None,
        # KMS reuses connections; a short idle timeout would cost it TLS handshakes.
        "timeout_keep_alive": config.server.keep_alive_seconds,
        "timeout_graceful_shutdown": config.server.graceful_shutdown_seconds,
    }


RESTART_ONLY_SERVER_SETTINGS = (
    "host",
    "port",
    "workers",
    "state_dir",
    "health_host",
    "health_port",
)


def restart_needed_for(old: ProxyConfig, new: ProxyConfig) -> list[str]:
    """Settings a reload cannot apply in place (they need a restart)."""
    changed = []
    for name in RESTART_ONLY_SERVER_SETTINGS:
        if getattr(old.server, name) != getattr(new.server, name):
            changed.append(f"server.{name}")
    if old.hsms != new.hsms:
        changed.append("hsm")
    if old.audit != new.audit:
        changed.append("audit")
    if len(new.hsms) > 1:
        for name in ("degraded_latency_ms", "probation_seconds"):
            if getattr(old.health, name) != getattr(new.health, name):
                changed.append(f"health.{name} (failover)")
    if (old.tls is None) != (new.tls is None) or (
        old.tls is not None
        and new.tls is not None
        and (old.tls.client_ca_file is None) != (new.tls.client_ca_file is None)
    ):
        changed.append("tls (turning TLS or mTLS on or off)")
    return changed


def respawn_config(started: ProxyConfig, current: ProxyConfig) -> ProxyConfig:
    """The configuration a worker restarted after a crash runs with.

    The current (last reloaded) configuration, except the settings a reload cannot
    apply in place (restart_needed_for): those keep the values the proxy started
    with, so that one restarted worker never runs on another HSM, another audit
    chain key or path, or another TLS mode than its siblings.
    """
    changed = restart_needed_for(started, current)
    if not changed:
        return current
    server = replace(
        current.server,
        **{name: getattr(started.server, name) for name in RESTART_ONLY_SERVER_SETTINGS},
    )
    health = replace(
        current.health,
        degraded_latency_ms=started.health.degraded_latency_ms,
        probation_seconds=started.health.probation_seconds,
    )
    tls = current.tls
    if any(item.startswith("tls") for item in changed):
        tls = started.tls
    return replace(
        current, server=server, hsms=started.hsms, audit=started.audit, health=health, tls=tls
    )


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
    key_manager = open_key_manager(config)
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
