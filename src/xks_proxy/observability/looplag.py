"""Event-loop stall detector: how late a worker's loop runs a 100 ms timer.

Everything a worker answers goes through one event loop, so a stall of that loop (a
long garbage collection, a blocking call, the VM descheduling the process) delays
every request the worker holds, and past KMS's 250 ms budget turns into timeouts the
proxy's own latency numbers can miss (a request's clock starts only once the loop
reads it). Each tick records its lateness (the metric
``xks_proxy_event_loop_lag_seconds``) and a stall of ``warn_after`` seconds or more
is logged as a warning: the first at once, then at most one summary per
``WARN_EVERY_SECONDS``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

logger = logging.getLogger("xks_proxy.worker")

TICK_SECONDS = 0.1
WARN_AFTER_SECONDS = 0.1
WARN_EVERY_SECONDS = 10.0


class LoopLagMonitor:
    def __init__(
        self,
        record: Callable[[float], None] | None = None,
        *,
        warn_after: float = WARN_AFTER_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``record(lag_seconds)`` receives every tick's lateness."""
        self._record = record
        self._warn_after = warn_after
        self._clock = clock
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self.worst = 0.0  # the longest lag seen
        self.stalls = 0  # ticks at least warn_after late
        self._unreported = 0
        self._unreported_worst = 0.0
        self._last_warning = -WARN_EVERY_SECONDS

    def start(self) -> None:
        self._schedule()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self) -> None:
        self._due = self._clock() + TICK_SECONDS
        self._handle = asyncio.get_running_loop().call_later(TICK_SECONDS, self._tick)

    def _tick(self) -> None:
        now = self._clock()
        lag = max(0.0, now - self._due)
        self.worst = max(self.worst, lag)
        if self._record is not None:
            self._record(lag)
        if lag >= self._warn_after:
            self.stalls += 1
            self._unreported += 1
            self._unreported_worst = max(self._unreported_worst, lag)
        if self._unreported and now - self._last_warning >= WARN_EVERY_SECONDS:
            logger.warning(
                "event loop stalled: %d time(s) for %.0f ms or more since the last report, "
                "the longest %.0f ms; every request of this worker waited as long",
                self._unreported,
                self._warn_after * 1000,
                self._unreported_worst * 1000,
            )
            self._last_warning = now
            self._unreported = 0
            self._unreported_worst = 0.0
        self._schedule()
