"""Batched request metrics: a flush records exactly what per-request observe() would."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from xks_proxy.observability.metrics import LATENCY_BUCKETS, LOOP_LAG_BUCKETS, RequestMetrics


def reference(
    registry: CollectorRegistry,
) -> tuple[Histogram, Counter, Counter, Counter, Histogram]:
    return (
        Histogram(
            "xks_proxy_latency_seconds",
            "XKS API request latency (KMS: XksProxyLatency)",
            ["operation", "status"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ),
        Counter(
            "xks_proxy_requests_total",
            "XKS API requests by outcome",
            ["operation", "status", "error_name", "key_store"],
            registry=registry,
        ),
        Counter(
            "xks_proxy_errors_total",
            "XKS API error answers (KMS: XksProxyErrors)",
            ["operation", "error_name"],
            registry=registry,
        ),
        Counter(
            "xks_proxy_throttled_total",
            "Requests refused with ThrottlingException (KMS: ExternalKeyStoreThrottle)",
            ["key_store"],
            registry=registry,
        ),
        Histogram(
            "xks_proxy_event_loop_lag_seconds",
            "How late each worker's event loop ran a 100 ms timer: a stall of the loop "
            "delays every request of that worker",
            buckets=LOOP_LAG_BUCKETS,
            registry=registry,
        ),
    )


def samples(registry: CollectorRegistry) -> dict[str, float]:
    """Every sample but the creation times; sums rounded (batched addition reorders them)."""
    values = {}
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith("#") or "_created" in line:
            continue
        name, _, value = line.rpartition(" ")
        values[name] = round(float(value), 9)
    return values


def test_flush_equals_one_observe_per_request() -> None:
    batched_registry, direct_registry = CollectorRegistry(), CollectorRegistry()
    batched = RequestMetrics(registry=batched_registry)
    latency, requests, errors, throttled, loop_lag = reference(direct_registry)
    rng = random.Random(7)
    outcomes = [
        ("Encrypt", 200, None, "main"),
        ("Decrypt", 400, "InvalidCiphertextException", "main"),
        ("Encrypt", 429, "ThrottlingException", "other"),
        ("GetHealthStatus", 200, None, "main"),
    ]
    # Latencies on every bucket boundary, between them, and beyond the last one.
    latencies = [*LATENCY_BUCKETS, 0.0, 2.5, *(rng.uniform(0, 1.2) for _ in range(300))]
    for index, seconds in enumerate(latencies):
        operation, status, error, store = outcomes[index % len(outcomes)]
        log = {"operation": operation, "status": status, "keyStore": store}
        if error:
            log["errorName"] = error
        batched.observe(log, seconds)
        latency.labels(operation, str(status)).observe(seconds)
        batched.observe_loop_lag(seconds / 3)
        loop_lag.observe(seconds / 3)
        requests.labels(operation, str(status), error or "", store).inc()
        if error:
            errors.labels(operation, error).inc()
            if error == "ThrottlingException":
                throttled.labels(store).inc()
        if index == 100:
            batched.flush()  # several flushes add up
    assert samples(batched_registry) != samples(direct_registry)  # the rest is pending
    batched.flush()
    batched.flush()  # nothing pending: changes nothing
    direct = samples(direct_registry)
    assert samples(batched_registry) == direct
    assert direct['xks_proxy_latency_seconds_count{operation="Encrypt",status="200"}'] > 50
    assert direct["xks_proxy_event_loop_lag_seconds_count"] == len(latencies)
