"""Deep health of the external key managers, refreshed in the background.

GetHealthStatus SHOULD be deep — a real encrypt/decrypt on a dedicated test key — and
MAY answer from a cache no older than one minute (spec: GetHealthStatus). Each worker
runs the round trip every ``interval_seconds`` and answers from that; a result older
than :func:`max_age` (never more than 60 s) is refreshed before answering.

Per key manager: ACTIVE (round trip fine), DEGRADED (fine but slower than
``degraded_latency_ms``, or a backend the failover layer reports degraded),
UNAVAILABLE (failed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from xks_proxy.config import HealthConfig
from xks_proxy.keymanager.base import EkmInfo, KeyManager
from xks_proxy.protocol.errors import XksError
from xks_proxy.protocol.models import EkmFleetMember, HealthStatus

logger = logging.getLogger("xks_proxy.health")

SPEC_MAX_AGE_SECONDS = 60.0


class BackendStatusSource(Protocol):
    """A key manager fronting several HSMs (the failover layer) reports each one."""

    def fleet_status(self) -> list[Any]: ...


@dataclass(frozen=True, slots=True)
class HealthReport:
    checked_at: float  # time.monotonic()
    members: tuple[EkmFleetMember, ...]
    latency_ms: float
    error: str | None = None

    @property
    def usable(self) -> bool:
        return any(m.health_status is not HealthStatus.UNAVAILABLE for m in self.members)


def max_age(config: HealthConfig) -> float:
    return min(SPEC_MAX_AGE_SECONDS, 2 * config.interval_seconds)


class HealthMonitor:
    def __init__(
        self,
        key_manager: KeyManager,
        info: EkmInfo,
        config: HealthConfig,
        run_blocking: Callable[[Callable[[], None]], Awaitable[None]],
    ) -> None:
        self.key_manager = key_manager
        self.info = info
        self.config = config
        self.run_blocking = run_blocking
        self.report: HealthReport | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def fresh_report(self) -> HealthReport | None:
        report = self.report
        if report is None or time.monotonic() - report.checked_at > max_age(self.config):
            return None
        return report

    async def check(self) -> HealthReport:
        """Run one deep check now (callers arriving meanwhile share its result)."""
        async with self._lock:
            if (report := self.report) is not None and time.monotonic() - report.checked_at < 0.5:
                return report
            started = time.monotonic()
            error = None
            try:
                await self.run_blocking(self.key_manager.health_check)
            except XksError as exc:
                error = exc.error_message
            except Exception as exc:
                error = f"{type(exc).__name__}"
            latency_ms = (time.monotonic() - started) * 1000
            report = HealthReport(
                time.monotonic(), self._members(error, latency_ms), latency_ms, error
            )
            if error and (self.report is None or self.report.error is None):
                logger.error("deep health check failed: %s", error)
            elif not error and self.report is not None and self.report.error:
                logger.info("deep health check recovered")
            self.report = report
            return report

    def _members(self, error: str | None, latency_ms: float) -> tuple[EkmFleetMember, ...]:
        fleet_status = getattr(self.key_manager, "fleet_status", None)
        if callable(fleet_status):
            return tuple(
                EkmFleetMember(str(b.name), str(b.info.model), HealthStatus(str(b.status)))
                for b in fleet_status()
            )
        if error is not None:
            status = HealthStatus.UNAVAILABLE
        elif latency_ms > self.config.degraded_latency_ms:
            status = HealthStatus.DEGRADED
        else:
            status = HealthStatus.ACTIVE
        return (EkmFleetMember(self.info.id, self.info.model, status),)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="xks-health")

    async def _loop(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:
                logger.exception("health monitor iteration failed")
            await asyncio.sleep(self.config.interval_seconds)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
