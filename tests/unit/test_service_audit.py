"""The service writes each decision to its worker's audit chain before answering, and
fails closed when it cannot (docs/audit.md, "Durability").

Both ways of writing are covered: inline on the event loop (``fsync = false``, the
default) and group-committed on a thread (``fsync = true``). The HSM is a stand-in;
the audit log, its files and the signed requests are real.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from unit.test_service_faults import PATH, StandInHsm, call, config, error_name
from xks_proxy.observability.audit import verify_files
from xks_proxy.service import XksService


def chain_files(tmp_path: Path) -> list[str]:
    return sorted(path.name for path in (tmp_path / "state" / "audit").glob("*.jsonl"))


def records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("fsync", [False, True], ids=["inline", "group-commit"])
def test_each_answer_is_in_its_workers_chain_before_it_is_returned(
    tmp_path: Path, fsync: bool
) -> None:
    service = XksService(config(tmp_path, audit={"fsync": fsync}), StandInHsm(), worker=3)
    live = tmp_path / "state" / "audit" / "audit.worker3.jsonl"

    async def run() -> None:
        service.start()
        try:
            for index in range(5):
                outcome = await call(service)
                assert outcome.status == 200
                # Written before handle() returned, i.e. before any answer could go out.
                written = records(live)
                assert len(written) == index + 1
                assert written[-1]["status"] == 200 and written[-1]["operation"] == "Encrypt"
            refused = await call(service, path=PATH.replace("/p/", "/q/"))
            assert refused.status == 404
            assert records(live)[-1]["errorName"] == "InvalidUriPathException"
        finally:
            service.close()

    asyncio.run(run())
    assert chain_files(tmp_path) == ["audit.worker3.jsonl"]  # no shared file, no other chain
    assert [record["seq"] for record in records(live)] == list(range(6))
    assert verify_files([live]).ok


@pytest.mark.parametrize("fsync", [False, True], ids=["inline", "group-commit"])
def test_an_unwritable_audit_log_fails_the_request(
    tmp_path: Path, fsync: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Fail closed: no 200 goes out without its record, and the log says why."""
    service = XksService(config(tmp_path, audit={"fsync": fsync}), StandInHsm(), worker=0)
    live = tmp_path / "state" / "audit" / "audit.worker0.jsonl"

    async def run() -> None:
        service.start()
        try:
            assert (await call(service)).status == 200
            # A last line that is not a record: the log refuses to extend the chain.
            with live.open("ab") as handle:
                handle.write(b'{"not": "a record"}\n')
            outcome = await call(service)
            assert outcome.status == 500
            assert error_name(outcome) == "InternalException"
            assert b"audit log cannot be written" in outcome.body
        finally:
            service.close()

    with caplog.at_level("ERROR", logger="xks_proxy.audit"):
        asyncio.run(run())
    assert any(
        "audit log write failed" in r.getMessage() and "not a valid audit record" in r.getMessage()
        for r in caplog.records
    ), caplog.text


def test_workers_write_separate_chains(tmp_path: Path) -> None:
    """Two workers' services, one state directory: two chains, each complete."""
    services = [XksService(config(tmp_path), StandInHsm(), worker=index) for index in range(2)]

    async def run() -> None:
        for service in services:
            service.start()
        try:
            for _ in range(4):
                for service in services:
                    assert (await call(service)).status == 200
        finally:
            for service in services:
                service.close()

    asyncio.run(run())
    assert chain_files(tmp_path) == ["audit.worker0.jsonl", "audit.worker1.jsonl"]
    for name in chain_files(tmp_path):
        path = tmp_path / "state" / "audit" / name
        assert [record["seq"] for record in records(path)] == [0, 1, 2, 3]
        assert verify_files([path]).ok
