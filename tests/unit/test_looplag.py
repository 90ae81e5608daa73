"""The event-loop stall detector sees a blocked loop, records it and warns once."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from xks_proxy.observability.looplag import LoopLagMonitor


def test_a_blocked_loop_is_measured_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    lags: list[float] = []

    async def scenario() -> LoopLagMonitor:
        monitor = LoopLagMonitor(lags.append)
        monitor.start()
        await asyncio.sleep(0.35)  # a few quiet ticks
        time.sleep(0.3)  # the loop is blocked: the next tick runs ~0.3 s late
        await asyncio.sleep(0.25)
        time.sleep(0.2)  # a second stall within WARN_EVERY_SECONDS: not logged again
        await asyncio.sleep(0.15)
        monitor.stop()
        return monitor

    with caplog.at_level(logging.WARNING, logger="xks_proxy.worker"):
        monitor = asyncio.run(scenario())
    assert len(lags) >= 5
    assert min(lags) < 0.05  # quiet ticks are on time
    assert monitor.worst >= 0.2 and monitor.stalls >= 2
    warnings = [r.getMessage() for r in caplog.records if "event loop stalled" in r.getMessage()]
    # The first stall is reported at once; the second falls in the same 10 s window.
    assert len(warnings) == 1 and "time(s) for 100 ms or more" in warnings[0]


def test_stop_ends_the_ticks() -> None:
    lags: list[float] = []

    async def scenario() -> None:
        monitor = LoopLagMonitor(lags.append)
        monitor.start()
        await asyncio.sleep(0.25)
        monitor.stop()
        seen = len(lags)
        await asyncio.sleep(0.25)
        assert len(lags) == seen

    asyncio.run(scenario())
    assert lags
