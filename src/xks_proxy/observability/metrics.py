"""Prometheus metrics, named to sit beside the CloudWatch metrics KMS publishes.

| ours                                        | KMS (CloudWatch)                |
|---------------------------------------------|---------------------------------|
| xks_proxy_latency_seconds{operation,...}    | XksProxyLatency                 |
| xks_proxy_errors_total{operation,error_name}| XksProxyErrors                  |
| xks_external_key_manager_state{hsm,state}   | XksExternalKeyManagerStates     |
| xks_proxy_credential_age_seconds            | XksProxyCredentialAge           |
| xks_proxy_certificate_days_to_expire        | XksProxyCertificateDaysToExpire |
| xks_proxy_throttled_total{key_store}        | ExternalKeyStoreThrottle        |

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0)
HSM_STATES = ("ACTIVE", "DEGRADED", "UNAVAILABLE")


def prepare_multiprocess_dir(state_dir: Path) -> Path:
    """Start each run with an empty metrics directory and point prometheus_client at it."""
    directory = state_dir / "metrics"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, mode=0o700)
    os.environ[MULTIPROC_ENV] = str(directory)
    return directory


class RequestMetrics:
    """What a worker records per request (about 5-10 us, measured in docs/performance.md)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.latency = Histogram(
            "xks_proxy_latency_seconds",
            "XKS API request latency (KMS: XksProxyLatency)",
            ["operation", "status"],
            buckets=LATENCY_BUCKETS,
        )
        self.requests = Counter(
            "xks_proxy_requests_total",
            "XKS API requests by outcome",
            ["operation", "status", "error_name", "key_store"],
        )
        self.errors = Counter(
            "xks_proxy_errors_total",
            "XKS API error answers (KMS: XksProxyErrors)",
            ["operation", "error_name"],
        )
        self.throttled = Counter(
            "xks_proxy_throttled_total",
            "Requests refused with ThrottlingException (KMS: ExternalKeyStoreThrottle)",
            ["key_store"],
        )
        self._latency_children: dict[tuple[str, str], Any] = {}

    def observe(self, log: dict[str, Any], seconds: float) -> None:
        operation = str(log.get("operation", "Unknown"))
        status = str(log.get("status", 0))
        key = (operation, status)
        child = self._latency_children.get(key)
        if child is None:
            child = self._latency_children[key] = self.latency.labels(operation, status)
        child.observe(seconds)
        error_name = log.get("errorName")
        key_store = str(log.get("keyStore", ""))
        self.requests.labels(operation, status, error_name or "", key_store).inc()
        if error_name:
            self.errors.labels(operation, error_name).inc()
            if error_name == "ThrottlingException":
                self.throttled.labels(key_store).inc()


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
