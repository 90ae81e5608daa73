"""Worker processes appending to one audit log while it rotates under them.

Each process opens its own AuditLog, as the proxy's workers do; the small
rotate_bytes makes rotation happen dozens of times while all four contend. A
second test forks workers that inherit one AuditLog, as a pre-fork server would.
"""

from __future__ import annotations

import multiprocessing
import os
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


def test_fork_child_gets_its_own_lock(tmp_path: Path) -> None:
    # A forked child shares the parent's open file description and so its flock;
    # the log must notice the fork and open its own before appending.
    if not hasattr(os, "fork"):
        pytest.skip("no fork")
    log_path = tmp_path / "audit.jsonl"
    log = AuditLog(log_path, fsync=False)
    log.append({"kmsRequestId": "parent-first"})
    children = []
    for worker in range(3):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 0
            try:
                for number in range(400):
                    log.append({"kmsRequestId": f"child{worker}-{number}"})
                log.close()
            except BaseException:
                code = 1
            os._exit(code)
        children.append(pid)
    for number in range(400):
        log.append({"kmsRequestId": f"parent-{number}"})
    for pid in children:
        assert os.waitpid(pid, 0)[1] == 0
    log.close()
    report = verify_files([log_path])
    assert report.ok, report.problems
    assert report.records == 1601
