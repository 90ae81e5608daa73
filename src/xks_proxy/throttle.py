"""Throttling: a request-rate quota per key store and a cap on requests in flight.

Both answer 429 ThrottlingException (spec: Error codes — "the proxy may send this
either because it is unable to keep up or the caller exceeded its request quota").
Shedding early keeps an overloaded proxy answering fast instead of timing out.

Each worker process enforces its share: a key store's rate and burst are divided by
the number of workers (the kernel spreads connections across them), so the whole
proxy admits about the configured rate. Single-threaded per worker (event loop), so
no locks.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenBucket:
    """Classic token bucket: ``rate`` tokens per second, at most ``burst`` stored."""

    rate: float
    burst: float
    tokens: float = field(default=-1.0)
    updated: float = 0.0

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        if self.tokens < 0:
            self.tokens = self.burst

    def try_acquire(self, now: float) -> bool:
        """Take one token if there is one; ``now`` is a monotonic clock in seconds."""
        if self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class KeyStoreQuotas:
    """One bucket per key store that has a quota; stores without one are unlimited."""

    def __init__(self, quotas: dict[str, tuple[float, float]], workers: int = 1) -> None:
        self.buckets = {
            name: TokenBucket(rate / workers, max(1.0, burst / workers))
            for name, (rate, burst) in quotas.items()
        }

    def admit(self, key_store: str, now: float) -> bool:
        bucket = self.buckets.get(key_store)
        return bucket is None or bucket.try_acquire(now)


@dataclass(slots=True)
class InFlightLimit:
    """Requests being processed right now, capped."""

    limit: int
    current: int = 0

    def try_enter(self) -> bool:
        if self.current >= self.limit:
            return False
        self.current += 1
        return True

    def leave(self) -> None:
        self.current -= 1
