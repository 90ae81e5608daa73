"""Closed-loop load with wrk: a Lua script replays the pre-signed pool over keep-alive."""

from __future__ import annotations

import json
import resource
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .workloads import SignedRequest

LUA_SCRIPT = Path(__file__).with_name("pool.lua")
JSON_MARKER = "XKS_BENCH_JSON "


def write_pool(path: Path, pool: Sequence[SignedRequest]) -> Path:
    """Write the pool in the line format pool.lua reads."""
    with path.open("wb") as out:
        out.write(f"XKSPOOL 1\n{len(pool)}\n".encode("ascii"))
        for request in pool:
            out.write(f"{request.method} {request.path}\n{len(request.headers)}\n".encode("ascii"))
            for name, value in request.headers:
                if "\n" in value or "\r" in value:
                    raise ValueError(f"header {name} holds a line break")
                out.write(f"{name}: {value}\n".encode("latin-1"))
            out.write(f"{len(request.body)}\n".encode("ascii") + request.body + b"\n")
    return path


@dataclass
class WrkSettings:
    threads: int
    connections: int
    duration: int  # seconds (wrk takes whole seconds)
    timeout: int = 5

    def as_json(self) -> dict[str, Any]:
        return {
            "threads": self.threads,
            "connections": self.connections,
            "duration_s": self.duration,
            "timeout_s": self.timeout,
        }


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    non_2xx: int  # wrk's errors.status: answers with status > 399 (the proxy sends no 1xx/3xx)
    socket_errors: dict[str, int]
    latency_ms: dict[str, float]
    curve_ms: list[tuple[float, float]]  # (percentile, latency)
    load_generator_cpu_s: float
    raw: dict[str, Any] = field(repr=False)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def socket_error_total(self) -> int:
        return sum(self.socket_errors.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "duration_s": round(self.duration_s, 3),
            "requests_per_s": round(self.rps, 1),
            "non_2xx": self.non_2xx,
            "socket_errors": self.socket_errors,
            "latency_ms": self.latency_ms,
            "curve_ms": [list(point) for point in self.curve_ms],
            "load_generator_cpu_s": round(self.load_generator_cpu_s, 2),
        }


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_wrk(
    url: str,
    pool_file: Path,
    settings: WrkSettings,
    *,
    max_requests: int = 0,
    progress: Callable[[float], None] | None = None,
    progress_every: float = 3.0,
) -> WrkResult:
    """Run wrk once; ``max_requests`` (if > 0) stops each thread after its share."""
    per_thread = -(-max_requests // settings.threads) if max_requests > 0 else 0
    command = [
        "wrk",
        "-t",
        str(settings.threads),
        "-c",
        str(settings.connections),
        "-d",
        f"{settings.duration}s",
        "--timeout",
        f"{settings.timeout}s",
        "-s",
        str(LUA_SCRIPT),
        url,
        "--",
        str(pool_file),
        str(per_thread),
    ]
    cpu_before = children_cpu()
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = started + settings.duration + settings.timeout + 30
    next_report = started + min(progress_every, 1.0)  # an early first look, then regular
    while True:
        try:
            process.wait(timeout=0.25)
            break
        except subprocess.TimeoutExpired:
            now = time.monotonic()
            if now > deadline:
                process.kill()
                process.wait()
                raise RuntimeError(f"wrk did not finish in time: {' '.join(command)}") from None
            if progress is not None and now >= next_report:
                progress(now - started)
                next_report = now + progress_every
    stdout = process.stdout.read() if process.stdout else ""
    stderr = process.stderr.read() if process.stderr else ""
    cpu = children_cpu() - cpu_before
    lines = [line for line in stdout.splitlines() if line.startswith(JSON_MARKER)]
    if process.returncode != 0 or not lines:
        raise RuntimeError(
            f"wrk failed (exit {process.returncode}): {stderr.strip() or stdout.strip()}"
        )
    raw = json.loads(lines[-1][len(JSON_MARKER) :])
    latency = raw["latency_us"]
    curve = [(float(p), value / 1000.0) for p, value in latency["curve"]]
    by_p = dict(curve)
    return WrkResult(
        requests=int(raw["requests"]),
        duration_s=raw["duration_us"] / 1e6,
        non_2xx=int(raw["errors"]["status"]),
        socket_errors={k: int(v) for k, v in raw["errors"].items() if k != "status"},
        latency_ms={
            "p50": by_p[50.0],
            "p90": by_p[90.0],
            "p99": by_p[99.0],
            "p99.9": by_p[99.9],
            "max": latency["max"] / 1000.0,
            "mean": round(latency["mean"] / 1000.0, 3),
        },
        curve_ms=curve,
        load_generator_cpu_s=cpu,
        raw=raw,
    )
