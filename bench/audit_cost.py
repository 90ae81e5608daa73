"""Measure what one audit record costs the proxy: fsync on/off, HMAC on/off, 1 vs 2 processes.

Run:  .venv/bin/python bench/audit_cost.py [--records 20000] [--fsync-records 2000]
                                           [--repeat 5] [--dir DIR]

Every scenario runs in fresh spawned worker processes (as the proxy's workers are),
each with its own AuditLog on one shared file in a temporary directory (default:
the system temp dir; the script prints whether it is on the same filesystem as
this checkout, since fsync cost is a property of the filesystem and device).
Each worker warms up, waits on a barrier, then times every append.

Reported per scenario (median over --repeat runs, taken round-robin):
  * us/append: the mean time one append call takes in one worker (the latency the
    request path pays before it may send its response); p50 and p99 of single calls;
  * us/record: wall time / all records written by all workers (the inverse of the
    log's throughput; with 2 processes it shows how much they overlap).

Last, verify_files over 100,000 records (plain and HMAC), in us/record.

Baselines: a bare os.write of a same-sized line, with and without fdatasync, so the
audit log's own overhead (lock, tail check, JSON, hash) can be read off.
Also: the tail cache off (re-read the chain head from the file on every append)
and fsync while holding the flock, to justify those two design choices.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import orjson

from xks_proxy.observability.audit import AuditLog, verify_files

CHAIN_KEY = bytes(range(32))


@dataclass(frozen=True)
class Scenario:
    name: str
    processes: int
    fsync: bool
    keyed: bool = False
    cache_tail: bool = True
    fsync_under_flock: bool = False
    raw: bool = False  # a bare os.write baseline instead of AuditLog


SCENARIOS = (
    Scenario("raw os.write (baseline)", 1, fsync=False, raw=True),
    Scenario("raw os.write + fdatasync (baseline)", 1, fsync=True, raw=True),
    Scenario("audit, no fsync, plain", 1, fsync=False),
    Scenario("audit, no fsync, HMAC", 1, fsync=False, keyed=True),
    Scenario("audit, fsync, plain", 1, fsync=True),
    Scenario("audit, fsync, HMAC", 1, fsync=True, keyed=True),
    Scenario("audit, no fsync, plain", 2, fsync=False),
    Scenario("audit, no fsync, HMAC", 2, fsync=False, keyed=True),
    Scenario("audit, fsync, plain", 2, fsync=True),
    Scenario("audit, fsync, HMAC", 2, fsync=True, keyed=True),
    Scenario("audit, no fsync, plain, tail cache off", 1, fsync=False, cache_tail=False),
    Scenario("audit, no fsync, plain, tail cache off", 2, fsync=False, cache_tail=False),
    Scenario("audit, fsync, plain, fsync under flock", 2, fsync=True, fsync_under_flock=True),
)


def _record(worker: int, number: int) -> dict[str, Any]:
    """A record the size and shape of one the service writes (about 600 bytes on disk)."""
    return {
        "kmsRequestId": f"4112f4d6-db54-4af4-ae30-c55a22a8dfae-{worker}-{number}",
        "operation": "Decrypt",
        "kmsOperation": "Decrypt",
        "keyStore": "xks-store",
        "externalKeyId": "foo",
        "awsPrincipalArn": "arn:aws:iam::123456789012:role/application-role",
        "kmsKeyArn": "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "kmsViaService": "ebs.us-east-1.amazonaws.com",
        "awsSourceVpc": "vpc-0123456789abcdef0",
        "awsSourceVpce": "vpce-0123456789abcdef0",
        "status": 200,
        "errorName": None,
        "latencyMs": 0.734,
        "hsm": "softhsm",
        "policyIds": ["default"],
    }


def _now() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def _worker(
    scenario: Scenario,
    path: Path,
    worker: int,
    records: int,
    start: Barrier,
    results: Queue[dict[str, Any]],
) -> None:
    durations: list[float] = []
    if scenario.raw:
        line = orjson.dumps(_record(worker, 0), option=orjson.OPT_APPEND_NEWLINE)
        line = line[:-1] + b" " * 180 + b"\n"  # the size of an audit line with seq/prev/hash
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        for _ in range(200):
            os.write(fd, line)
        start.wait()
        begin = _now()
        for _ in range(records):
            call = _now()
            os.write(fd, line)
            if scenario.fsync:
                os.fdatasync(fd)
            durations.append(_now() - call)
        end = _now()
        os.close(fd)
    else:

        class Log(AuditLog):
            _cache_tail = scenario.cache_tail
            _fsync_under_flock = scenario.fsync_under_flock

        log = Log(
            path,
            fsync=scenario.fsync,
            chain_key=CHAIN_KEY if scenario.keyed else None,
            rotate_bytes=None,
        )
        batch = [_record(worker, number) for number in range(records)]
        for number in range(200):
            log.append(_record(worker, -number))
        start.wait()
        begin = _now()
        for record in batch:
            call = _now()
            log.append(record)
            durations.append(_now() - call)
        end = _now()
        log.close()
    durations.sort()
    results.put(
        {
            "begin": begin,
            "end": end,
            "mean": (end - begin) / records,
            "p50": durations[len(durations) // 2],
            "p99": durations[int(len(durations) * 0.99)],
        }
    )


def run_scenario(scenario: Scenario, directory: Path, records: int) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    path = Path(tempfile.mkdtemp(dir=directory)) / "audit.jsonl"
    start = context.Barrier(scenario.processes)
    results: Queue[dict[str, Any]] = context.Queue()
    workers = [
        context.Process(target=_worker, args=(scenario, path, worker, records, start, results))
        for worker in range(scenario.processes)
    ]
    for process in workers:
        process.start()
    outcomes = [results.get(timeout=600) for _ in workers]
    for process in workers:
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"{scenario.name}: a worker failed")
    wall = max(o["end"] for o in outcomes) - min(o["begin"] for o in outcomes)
    return {
        "us_per_append": statistics.mean(o["mean"] for o in outcomes) * 1e6,
        "p50_us": statistics.mean(o["p50"] for o in outcomes) * 1e6,
        "p99_us": statistics.mean(o["p99"] for o in outcomes) * 1e6,
        "us_per_record": wall / (records * scenario.processes) * 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=20_000, help="per process, no fsync")
    parser.add_argument("--fsync-records", type=int, default=2_000, help="per process, fsync")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: tmp)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as temporary:
        directory = Path(temporary)
        checkout = Path(__file__).resolve().parent
        same_fs = os.stat(directory).st_dev == os.stat(checkout).st_dev
        print(
            f"# audit cost: Python {platform.python_version()}, {platform.platform()}, "
            f"{os.cpu_count()} CPUs"
        )
        print(f"# files in {directory} (same filesystem as {checkout}: {same_fs})")
        print(f"# median of {args.repeat} runs; {args.records} records/process without fsync, ")
        print(f"# {args.fsync_records} with fsync; times in microseconds")
        print()
        # Round-robin over the scenarios, repeat times: noise from other work on the
        # machine then spreads over all scenarios instead of spoiling one.
        runs: dict[Scenario, list[dict[str, float]]] = {scenario: [] for scenario in SCENARIOS}
        for _ in range(args.repeat):
            for scenario in SCENARIOS:
                records = args.fsync_records if scenario.fsync else args.records
                runs[scenario].append(run_scenario(scenario, directory, records))
        print("| scenario | procs | us/append | p50 | p99 | us/record (wall/all) |")
        print("|---|---:|---:|---:|---:|---:|")
        table: list[dict[str, Any]] = []
        for scenario in SCENARIOS:
            measured = runs[scenario]
            result = {key: statistics.median(run[key] for run in measured) for key in measured[0]}
            table.append({"scenario": scenario.name, "processes": scenario.processes, **result})
            print(
                f"| {scenario.name} | {scenario.processes} | {result['us_per_append']:.1f} "
                f"| {result['p50_us']:.1f} | {result['p99_us']:.1f} "
                f"| {result['us_per_record']:.1f} |",
                flush=True,
            )
        print()
        for keyed in (False, True):
            us = _verify_cost(directory, keyed)
            table.append({"scenario": f"verify, {'HMAC' if keyed else 'plain'}", "us": us})
            print(f"verify_files, {'HMAC' if keyed else 'plain'}: {us:.1f} us/record")
    print()
    print(json.dumps(table))
    return 0


def _verify_cost(directory: Path, keyed: bool, records: int = 100_000) -> float:
    path = Path(tempfile.mkdtemp(dir=directory)) / "audit.jsonl"
    key = CHAIN_KEY if keyed else None
    with AuditLog(path, fsync=False, chain_key=key, rotate_bytes=None) as log:
        for number in range(records):
            log.append(_record(0, number))
    begin = _now()
    report = verify_files([path], chain_key=key)
    elapsed = _now() - begin
    if not report.ok:
        raise RuntimeError("verify failed on a freshly written log")
    return elapsed / records * 1e6


if __name__ == "__main__":
    sys.exit(main())
