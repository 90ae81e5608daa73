"""Worker processes appending to one audit log while it rotates under them.

Each process opens its own AuditLog, as the proxy's workers do; the small
rotate_bytes makes rotation happen dozens of times while all four contend.
"""

from __future__ import annotations

import multiprocessing
from collections import Counter
from multiprocessing.synchronize import Barrier
from pathlib import Path

import orjson
import pytest

from xks_proxy.observability.audit import AuditLog, audit_files_in_order, verify_files

PROCESSES = 4
APPENDS_PER_PROCESS = 500
ROTATE_BYTES = 16 * 1024


def _append_many(path: Path, worker: int, fsync: bool, start: Barrier) -> None:
    log = AuditLog(path, rotate_bytes=ROTATE_BYTES, fsync=fsync)
    start.wait()
    for number in range(APPENDS_PER_PROCESS):
        log.append(
            {
                "kmsRequestId": f"w{worker}-{number}",
                "operation": "Decrypt",
                "keyStore": "xks-store",
                "externalKeyId": "foo",
                "status": 200,
                "latencyMs": 0.5,
            }
        )
    log.close()


@pytest.mark.parametrize("fsync", [False, True], ids=["write", "fsync"])
def test_processes_never_interleave_or_break_the_chain(tmp_path: Path, fsync: bool) -> None:
    path = tmp_path / "audit.jsonl"
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(PROCESSES)
    workers = [
        context.Process(target=_append_many, args=(path, worker, fsync, start))
        for worker in range(PROCESSES)
    ]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=60)
    assert [process.exitcode for process in workers] == [0] * PROCESSES

    files = audit_files_in_order(path)
    assert len(files) >= 10, "rotation should have happened many times under contention"
    report = verify_files(files)
    assert report.ok, report.problems
    total = PROCESSES * APPENDS_PER_PROCESS
    assert (report.records, report.first_seq, report.last_seq) == (total, 0, total - 1)

    records = [orjson.loads(line) for file in files for line in file.read_bytes().splitlines()]
    assert [record["seq"] for record in records] == list(range(total))
    seen = Counter(record["kmsRequestId"] for record in records)
    expected = {
        f"w{worker}-{number}"
        for worker in range(PROCESSES)
        for number in range(APPENDS_PER_PROCESS)
    }
    assert set(seen) == expected and set(seen.values()) == {1}
    for worker in range(PROCESSES):  # each process's records keep its own order
        own = [r["kmsRequestId"] for r in records if r["kmsRequestId"].startswith(f"w{worker}-")]
        assert own == [f"w{worker}-{number}" for number in range(APPENDS_PER_PROCESS)]
    for file in files[:-1]:
        assert file.stat().st_size <= ROTATE_BYTES
