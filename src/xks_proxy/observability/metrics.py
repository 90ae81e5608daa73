"""Prometheus metrics, named to sit beside the CloudWatch metrics KMS publishes.

| ours                                        | KMS (CloudWatch)                |
|---------------------------------------------|---------------------------------|
| xks_proxy_latency_seconds{operation,...}    | XksProxyLatency                 |
| xks_proxy_errors_total{operation,error_name}| XksProxyErrors                  |
| xks_external_key_manager_state{hsm,state}   | XksExternalKeyManagerStates     |
| xks_proxy_credential_age_seconds            | XksProxyCredentialAge           |
| xks_proxy_certificate_days_to_expire        | XksProxyCertificateDaysToExpire |
| xks_proxy_throttled_total{key_store}        | ExternalKeyStoreThrottle        |
| xks_proxy_event_loop_lag_seconds            | (none: our own stall detector)  |

Workers record into prometheus_client's multiprocess files (``<state_dir>/metrics``);
the supervisor serves the merged view on the health/admin listener's ``/metrics`` —
never on the API port. The directory must be set before prometheus_client is first
imported, so :func:`prepare_multiprocess_dir` runs in the supervisor before any
worker is spawned (workers inherit the environment).
"""

from __future__ import annotations

import os
import shutil
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0)
LOOP_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
HSM_STATES = ("ACTIVE", "DEGRADED", "UNAVAILABLE")


def prepare_multiprocess_dir(state_dir: Path) -> Path:
    """Start each run with an empty metrics directory and point prometheus_client at it."""
    directory = state_dir / "metrics"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, mode=0o700)
    os.environ[MULTIPROC_ENV] = str(directory)
    return directory


FLUSH_SECONDS = 0.5  # a worker's counts reach the shared files at least this often


class _PendingHistogram:
    """Observations of one histogram child not yet in the shared files: one count per
    bucket (the last is +Inf, as prometheus_client stores them) and their sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def add_to(self, child: Any) -> None:
        # prometheus_client keeps one value per bucket (not cumulative) and a sum;
        # adding to them is what observe() does one observation at a time
        # (tests/unit/test_metrics.py compares the two).
        for bucket, observed in zip(child._buckets, self.counts, strict=True):
            if observed:
                bucket.inc(observed)
        child._sum.inc(self.total)


class RequestMetrics:
    """What a worker records per request, counted in process and flushed in batches.

    Writing each observation through prometheus_client's multiprocess values costs
    ~10-20 us per request (a lock and several mmap writes). Here a request only bumps
    local counters (~1 us); :meth:`flush` adds them to the shared files every
    :data:`FLUSH_SECONDS` (the worker schedules it) and at shutdown. A scrape may
    therefore lag the requests by up to that long.
    """

    def __init__(self, registry: Any = None) -> None:
        """``registry``: where the metrics live (prometheus_client's default if None)."""
        from prometheus_client import REGISTRY, Counter, Histogram

        registry = REGISTRY if registry is None else registry
        self.latency = Histogram(
            "xks_proxy_latency_seconds",
            "XKS API request latency (KMS: XksProxyLatency)",
            ["operation", "status"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.requests = Counter(
            "xks_proxy_requests_total",
            "XKS API requests by outcome",
            ["operation", "status", "error_name", "key_store"],
            registry=registry,
        )
        self.errors = Counter(
            "xks_proxy_errors_total",
            "XKS API error answers (KMS: XksProxyErrors)",
            ["operation", "error_name"],
            registry=registry,
        )
        self.throttled = Counter(
            "xks_proxy_throttled_total",
            "Requests refused with ThrottlingException (KMS: ExternalKeyStoreThrottle)",
            ["key_store"],
            registry=registry,
        )
        self.loop_lag = Histogram(
            "xks_proxy_event_loop_lag_seconds",
            "How late each worker's event loop ran a 100 ms timer: a stall of the loop "
            "delays every request of that worker",
            buckets=LOOP_LAG_BUCKETS,
            registry=registry,
        )
        # Pending since the last flush: counts per request label set, and per
        # (operation, status) the latency histogram's observations.
        self._counts: dict[tuple[str, str, str, str], int] = {}
        self._latencies: dict[tuple[str, str], _PendingHistogram] = {}
        self._loop_lag = _PendingHistogram(LOOP_LAG_BUCKETS)

    def observe(self, log: dict[str, Any], seconds: float) -> None:
        key = (
            str(log.get("operation", "Unknown")),
            str(log.get("status", 0)),
            log.get("errorName") or "",
            str(log.get("keyStore", "")),
        )
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1
        latency_key = (key[0], key[1])
        pending = self._latencies.get(latency_key)
        if pending is None:
            pending = self._latencies[latency_key] = _PendingHistogram(LATENCY_BUCKETS)
        pending.observe(seconds)

    def observe_loop_lag(self, seconds: float) -> None:
        self._loop_lag.observe(seconds)

    def flush(self) -> None:
        """Add the pending counts to the shared metrics files."""
        counts, self._counts = self._counts, {}
        latencies, self._latencies = self._latencies, {}
        for (operation, status, error_name, key_store), count in counts.items():
            self.requests.labels(operation, status, error_name, key_store).inc(count)
            if error_name:
                self.errors.labels(operation, error_name).inc(count)
                if error_name == "ThrottlingException":
                    self.throttled.labels(key_store).inc(count)
        for (operation, status), pending in latencies.items():
            pending.add_to(self.latency.labels(operation, status))
        loop_lag, self._loop_lag = self._loop_lag, _PendingHistogram(LOOP_LAG_BUCKETS)
        if any(loop_lag.counts):
            loop_lag.add_to(self.loop_lag)


@dataclass(slots=True)
class SupervisorSnapshot:
    """What only the supervisor knows, computed at scrape time."""

    hsm_states: list[tuple[str, str]] = field(default_factory=list)  # (hsm id, state)
    credential_first_seen: dict[tuple[str, str], float] = field(default_factory=dict)
    certificate_days_to_expire: float | None = None


class SupervisorMetrics:
    """The merged worker metrics plus supervisor gauges, for ``/metrics``.

    Supervisor gauges come from a collector evaluated at scrape time rather than from
    prometheus_client's multiprocess files, so a removed credential or HSM simply
    disappears instead of lingering in a stale file.
    """

    def __init__(self, snapshot: Callable[[], SupervisorSnapshot]) -> None:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry)  # type: ignore[no-untyped-call]
        self.registry.register(_SupervisorCollector(snapshot))

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _SupervisorCollector:
    def __init__(self, snapshot: Callable[[], SupervisorSnapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        snapshot = self.snapshot()
        states = GaugeMetricFamily(
            "xks_external_key_manager_state",
            "1 for the current state of each HSM (KMS: XksExternalKeyManagerStates)",
            labels=["hsm", "state"],
        )
        for hsm, state in snapshot.hsm_states:
            for candidate in HSM_STATES:
                states.add_metric([hsm, candidate], 1.0 if candidate == state else 0.0)
        yield states
        ages = GaugeMetricFamily(
            "xks_proxy_credential_age_seconds",
            "Seconds since each SigV4 credential first appeared in the config "
            "(KMS: XksProxyCredentialAge)",
            labels=["key_store", "access_key_id"],
        )
        now = time.time()
        for (key_store, access_key_id), seen in snapshot.credential_first_seen.items():
            ages.add_metric([key_store, access_key_id], now - seen)
        yield ages
        if snapshot.certificate_days_to_expire is not None:
            yield GaugeMetricFamily(
                "xks_proxy_certificate_days_to_expire",
                "Days until the server certificate expires (KMS: XksProxyCertificateDaysToExpire)",
                value=snapshot.certificate_days_to_expire,
            )
