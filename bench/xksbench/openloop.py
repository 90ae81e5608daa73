"""Open-loop load at a fixed rate, latency measured from the *scheduled* send time.

    python -m xksbench.openloop --pool POOL.json --host H --port P --rate 1800 \
        --duration 20 [--warmup 2] [--connections 64] [--max-connections 512]

Request i is due at ``t0 + i / rate`` whatever happened to the requests before it.
A closed-loop client (wrk) waits for an answer before it sends again, so when the
server stalls it simply sends less and the stall shows up as one slow request
instead of the hundreds KMS would have sent meanwhile ("coordinated omission").
Here a stall delays every request due during it, and each of them is charged from
its due time, which is what a KMS caller experiences.

Each request goes on an idle keep-alive connection (FIFO, so all connections and
therefore all workers get a share). If none is idle when a request is due, a new
connection is opened (its connect time is charged to that request) up to
``--max-connections``; beyond that the request is recorded as a miss (an error).
One request per connection at a time: no pipelining, as KMS does.

Reported (JSON on stdout; progress lines on stderr): achieved rate, errors (non-200
answers, timeouts, connection failures, misses), latency from the scheduled time
(p50/p90/p99/p99.9/max), and for comparison the service time (from the actual
write) and the generator's own send lag (actual write minus due time), which shows
whether this generator kept its schedule.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import math
import ssl
import sys
import time
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

MISS = -1
TIMEOUT = -2
CONNECTION_ERROR = -3
CURVE_PERCENTILES = (
    1, 5, 10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 85, 90, 95, 97.5, 99, 99.5, 99.9, 99.95, 99.99,
)  # fmt: skip


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize_ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}
    return {
        "p50": round(percentile(ordered, 50) * 1000, 3),
        "p90": round(percentile(ordered, 90) * 1000, 3),
        "p99": round(percentile(ordered, 99) * 1000, 3),
        "p99.9": round(percentile(ordered, 99.9) * 1000, 3),
        "max": round(ordered[-1] * 1000, 3),
        "mean": round(sum(ordered) / len(ordered) * 1000, 3),
    }


class Connection(asyncio.Protocol):
    def __init__(self, generator: Generator) -> None:
        import httptools

        self.generator = generator
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.index = -1  # the request in flight, -1 when idle
        self.closed = False
        self.body = bytearray()  # kept only until the status is known to be 200

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        import httptools

        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.abort(CONNECTION_ERROR)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.index >= 0:
            index, self.index = self.index, -1
            self.generator.finish(index, CONNECTION_ERROR, self)

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        if self.parser.get_status_code() != 200 and len(self.body) < 512:
            self.body += body

    def on_message_complete(self) -> None:
        index, self.index = self.index, -1
        status = self.parser.get_status_code()
        if status != 200:
            self.generator.note_error_body(status, bytes(self.body))
        self.body.clear()
        if index >= 0:
            self.generator.finish(index, status, self)
        if not self.parser.should_keep_alive():
            self.close()

    def send(self, index: int, data: bytes) -> None:
        assert self.transport is not None
        self.index = index
        self.generator.sent_at[index] = time.perf_counter()
        self.transport.write(data)

    def abort(self, status: int) -> None:
        if self.index >= 0:
            index, self.index = self.index, -1
            self.generator.finish(index, status, self)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class Generator:
    def __init__(
        self,
        requests: Sequence[bytes],
        *,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        rate: float,
        duration: float,
        warmup: float,
        connections: int,
        max_connections: int,
        timeout: float,
        progress_every: float,
    ) -> None:
        self.requests = requests
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.rate = rate
        self.duration = duration
        self.warmup = warmup
        self.initial_connections = connections
        self.max_connections = max_connections
        self.timeout = timeout
        self.progress_every = progress_every
        self.total = round((warmup + duration) * rate)
        self.warmup_count = round(warmup * rate)
        self.scheduled_at = array("d", bytes(8 * self.total))
        self.sent_at = array("d", bytes(8 * self.total))
        self.done_at = array("d", bytes(8 * self.total))
        self.status = array("i", bytes(4 * self.total))
        self.idle: collections.deque[Connection] = collections.deque()
        self.busy: set[Connection] = set()
        self.open_count = 0
        self.opened_total = 0
        self.connect_failures = 0
        self.finished = 0
        self.errors = 0
        self.all_done = asyncio.Event()
        self.error_names: dict[str, int] = {}

    def note_error_body(self, status: int, body: bytes) -> None:
        """Count non-200 answers by the XKS errorName in their body."""
        try:
            name = str(json.loads(body).get("errorName", "?"))
        except (ValueError, AttributeError):
            name = "?"
        key = f"{status} {name}"
        self.error_names[key] = self.error_names.get(key, 0) + 1

    async def connect(self) -> Connection:
        """Open one connection; the caller has counted it in open_count already."""
        loop = asyncio.get_running_loop()
        self.opened_total += 1
        try:
            _, protocol = await loop.create_connection(
                lambda: Connection(self), self.host, self.port, ssl=self.ssl_context
            )
        except BaseException:
            self.open_count -= 1
            raise
        return protocol

    def finish(self, index: int, status: int, connection: Connection | None) -> None:
        if self.status[index] != 0:
            return
        self.status[index] = status
        self.done_at[index] = time.perf_counter()
        self.finished += 1
        if status != 200:
            self.errors += 1
        if connection is not None:
            self.busy.discard(connection)
            if connection.closed:
                self.open_count -= 1
            else:
                self.idle.append(connection)
        if self.finished == self.total:
            self.all_done.set()

    def fire(self, index: int) -> None:
        data = self.requests[index % len(self.requests)]
        while self.idle:
            connection = self.idle.popleft()
            if not connection.closed:
                self.busy.add(connection)
                connection.send(index, data)
                return
            self.open_count -= 1
        if self.open_count >= self.max_connections:
            self.finish(index, MISS, None)
            return
        self.open_count += 1
        asyncio.get_running_loop().create_task(self._send_on_new(index, data))

    async def _send_on_new(self, index: int, data: bytes) -> None:
        try:
            connection = await self.connect()
        except OSError:
            self.connect_failures += 1
            self.finish(index, CONNECTION_ERROR, None)
            return
        self.busy.add(connection)
        connection.send(index, data)

    async def _watch_timeouts(self) -> None:
        while not self.all_done.is_set():
            await asyncio.sleep(0.05)
            limit = time.perf_counter() - self.timeout
            for connection in list(self.busy):
                index = connection.index
                if index >= 0 and self.sent_at[index] and self.sent_at[index] < limit:
                    connection.abort(TIMEOUT)

    def _progress(self, now: float, start: float, due: int) -> None:
        print(
            f"    open loop: {now - start:5.1f}/{self.warmup + self.duration:.0f} s  "
            f"due {due}  done {self.finished}  errors {self.errors}  "
            f"in flight {len(self.busy)}  connections {self.open_count}",
            file=sys.stderr,
            flush=True,
        )

    async def run(self) -> dict[str, Any]:
        await asyncio.gather(*(self._add_idle() for _ in range(self.initial_connections)))
        watcher = asyncio.get_running_loop().create_task(self._watch_timeouts())
        interval = 1.0 / self.rate
        start = time.perf_counter() + 0.1
        next_progress = start + self.progress_every
        index = 0
        while index < self.total:
            now = time.perf_counter()
            due = start + index * interval
            if due > now:
                await asyncio.sleep(due - now)
                continue
            while index < self.total and start + index * interval <= now:
                self.scheduled_at[index] = start + index * interval
                self.fire(index)
                index += 1
            if now >= next_progress:
                self._progress(now, start, index)
                next_progress += self.progress_every
        try:
            await asyncio.wait_for(self.all_done.wait(), self.timeout + 5)
        except TimeoutError:
            pass
        self._progress(time.perf_counter(), start, index)
        watcher.cancel()
        for connection in [*self.idle, *self.busy]:
            connection.close()
        return self.results()

    async def _add_idle(self) -> None:
        self.open_count += 1
        self.idle.append(await self.connect())

    def results(self) -> dict[str, Any]:
        measured = range(self.warmup_count, self.total)
        latencies: list[float] = []
        service: list[float] = []
        lag: list[float] = []
        non_200: dict[str, int] = {}
        exceptions = {"timeout": 0, "connection": 0, "unfinished": 0}
        misses = 0
        for i in measured:
            status = self.status[i]
            if status == 200:
                latencies.append(self.done_at[i] - self.scheduled_at[i])
                service.append(self.done_at[i] - self.sent_at[i])
                lag.append(self.sent_at[i] - self.scheduled_at[i])
            elif status == MISS:
                misses += 1
            elif status == TIMEOUT:
                exceptions["timeout"] += 1
            elif status == CONNECTION_ERROR:
                exceptions["connection"] += 1
            elif status == 0:
                exceptions["unfinished"] += 1
            else:
                non_200[str(status)] = non_200.get(str(status), 0) + 1
        ordered = sorted(latencies)
        first = self.scheduled_at[self.warmup_count] if self.total > self.warmup_count else 0.0
        window = [self.done_at[i] for i in measured if self.status[i] == 200]
        span = (max(window) - first) if window else 0.0
        errors = sum(non_200.values()) + sum(exceptions.values()) + misses
        return {
            "target_rate": self.rate,
            "duration_s": self.duration,
            "warmup_s": self.warmup,
            "scheduled": len(measured),
            "ok": len(latencies),
            "achieved_rate": round(len(latencies) / span, 1) if span > 0 else 0.0,
            "errors": errors,
            "non_200": non_200,
            "non_200_by_error_name_incl_warmup": self.error_names,
            "exceptions": exceptions,
            "misses": misses,
            "connections_initial": self.initial_connections,
            "connections_opened": self.opened_total,
            "latency_ms": summarize_ms(latencies),
            "service_time_ms": summarize_ms(service),
            "send_lag_ms": summarize_ms(lag),
            "curve_ms": [
                [p, round(percentile(ordered, p) * 1000, 3)] for p in CURVE_PERCENTILES if ordered
            ],
        }


def load_requests(path: Path) -> list[bytes]:
    """The pool written by the bench (list of SignedRequest.as_json) as raw HTTP bytes."""
    from .workloads import SignedRequest

    pool = []
    for item in json.loads(path.read_text(encoding="utf-8")):
        request = SignedRequest(
            item["operation"],
            item["method"],
            item["path"],
            tuple((name, value) for name, value in item["headers"]),
            item["body"].encode("ascii"),
        )
        pool.append(request.raw())
    return pool


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cafile", help="HTTPS: verify the server with this CA")
    parser.add_argument("--rate", type=float, default=1800.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--max-connections", type=int, default=512)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--progress-every", type=float, default=5.0)
    args = parser.parse_args(argv)

    requests = load_requests(args.pool)
    context = ssl.create_default_context(cafile=args.cafile) if args.cafile else None

    async def run() -> dict[str, Any]:
        generator = Generator(
            requests,
            host=args.host,
            port=args.port,
            ssl_context=context,
            rate=args.rate,
            duration=args.duration,
            warmup=args.warmup,
            connections=args.connections,
            max_connections=args.max_connections,
            timeout=args.timeout,
            progress_every=args.progress_every,
        )
        return await generator.run()

    import uvloop

    gc.collect()
    gc.freeze()
    gc.disable()  # no collector pauses inside the measurement (a few MB of garbage at most)
    result = uvloop.run(run())
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
