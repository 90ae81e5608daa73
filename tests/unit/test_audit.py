"""The audit chain: appends, rotation, and verify's report of each kind of tampering."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xks_proxy.observability.audit import (
    GENESIS_HASH,
    AuditLog,
    AuditLogError,
    audit_chains,
    audit_files_in_order,
    chain_of,
    load_chain_key,
    main_verify,
    verify_files,
    worker_log_path,
)

CHAIN_KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def _record(number: int) -> dict[str, Any]:
    return {
        "time": "2024-05-01T12:00:00.000Z",
        "kmsRequestId": f"req-{number}",
        "operation": "Encrypt",
        "kmsOperation": "Encrypt",
        "keyStore": "xks-store",
        "externalKeyId": "foo",
        "awsPrincipalArn": "arn:aws:iam::123456789012:role/app",
        "status": 200,
        "latencyMs": 1.25,
        "policyIds": ["allow-all"],
    }


def _write_log(
    path: Path, count: int, *, chain_key: bytes | None = None, rotate_bytes: int | None = None
) -> list[str]:
    with AuditLog(path, fsync=False, chain_key=chain_key, rotate_bytes=rotate_bytes) as log:
        return [log.append(_record(number)) for number in range(count)]


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def _only_problem(path: Path, *, chain_key: bytes | None = None) -> str:
    report = verify_files([path], chain_key=chain_key)
    assert not report.ok
    assert len(report.problems) == 1, report.problems
    return report.problems[0]


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.jsonl"


# --------------------------------------------------------------------------- writing


def test_records_carry_seq_prev_hash_and_verify(log_path: Path) -> None:
    hashes = _write_log(log_path, 5)

    records = [orjson.loads(line) for line in _lines(log_path)]
    assert [record["seq"] for record in records] == [0, 1, 2, 3, 4]
    assert records[0]["prev"] == GENESIS_HASH
    assert [record["prev"] for record in records[1:]] == hashes[:-1]
    assert [record["hash"] for record in records] == hashes
    report = verify_files([log_path])
    assert report.ok and report.problems == []
    assert (report.records, report.first_seq, report.last_seq) == (5, 0, 4)
    assert report.last_hash == hashes[-1]


def test_hash_is_sha256_of_prev_bytes_and_sorted_json(log_path: Path) -> None:
    _write_log(log_path, 2)
    for line in _lines(log_path):
        record = orjson.loads(line)
        stored = record.pop("hash")
        message = bytes.fromhex(record["prev"]) + orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
        assert stored == hashlib.sha256(message).hexdigest()


def test_keyed_hash_is_hmac_sha256(log_path: Path) -> None:
    _write_log(log_path, 2, chain_key=CHAIN_KEY)
    for line in _lines(log_path):
        record = orjson.loads(line)
        stored = record.pop("hash")
        message = bytes.fromhex(record["prev"]) + orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
        assert stored == hmac.new(CHAIN_KEY, message, hashlib.sha256).hexdigest()
    assert verify_files([log_path], chain_key=CHAIN_KEY).ok


def test_time_is_added_when_absent(log_path: Path) -> None:
    with AuditLog(log_path, fsync=True) as log:
        log.append({"kmsRequestId": "r"})
    record = orjson.loads(_lines(log_path)[0])
    assert record["time"].endswith("Z") and record["time"][:2] == "20"


def test_reopened_log_continues_the_chain(log_path: Path) -> None:
    first = _write_log(log_path, 3)
    with AuditLog(log_path, fsync=False) as log:
        log.append(_record(3))
    assert orjson.loads(_lines(log_path)[3])["prev"] == first[-1]
    assert verify_files([log_path]).last_seq == 3


@pytest.mark.parametrize(
    "key",
    [
        "plaintext",
        "Plaintext",
        "additionalAuthenticatedData",
        "ciphertext",
        "secret",
        "secretAccessKey",
        "SecretKey",
        "pin",
        "PIN",
    ],
)
def test_secret_keys_are_refused_without_echoing_values(log_path: Path, key: str) -> None:
    with AuditLog(log_path, fsync=False) as log:
        with pytest.raises(ValueError) as raised:
            log.append({"kmsRequestId": "r", key: "hunter2-secret-value"})
        with pytest.raises(ValueError):
            log.append({"kmsRequestId": "r", "nested": [{key: "hunter2-secret-value"}]})
    assert "hunter2" not in str(raised.value)
    assert not log_path.exists() or log_path.read_bytes() == b""


@pytest.mark.parametrize("key", ["seq", "prev", "hash"])
def test_reserved_keys_are_refused(log_path: Path, key: str) -> None:
    with AuditLog(log_path, fsync=False) as log, pytest.raises(ValueError, match=key):
        log.append({key: 1})


@pytest.mark.parametrize(
    "value", [b"raw-bytes-value", 1 << 70, {1: "non-str key"}, object(), {"x": {7}}]
)
def test_non_json_values_are_refused_without_echoing_them(log_path: Path, value: Any) -> None:
    with AuditLog(log_path, fsync=False) as log:
        with pytest.raises(ValueError) as raised:
            log.append({"kmsRequestId": "r", "field": value})
        log.append(_record(0))  # a refused record leaves the log usable
    assert "raw-bytes-value" not in str(raised.value)
    assert "non-str key" not in str(raised.value)
    assert verify_files([log_path]).ok


def test_closed_log_refuses_appends(log_path: Path) -> None:
    log = AuditLog(log_path, fsync=False)
    log.close()
    log.close()
    with pytest.raises(AuditLogError):
        log.append(_record(0))


def test_repr_hides_the_chain_key(log_path: Path) -> None:
    with AuditLog(log_path, chain_key=CHAIN_KEY) as log:
        assert CHAIN_KEY.hex() not in repr(log) and "keyed=True" in repr(log)


def test_short_chain_key_is_refused(log_path: Path) -> None:
    with pytest.raises(ValueError):
        AuditLog(log_path, chain_key=b"short")


def test_threads_share_one_log(log_path: Path) -> None:
    with AuditLog(log_path, fsync=False, rotate_bytes=20_000) as log:

        def work(worker: int) -> None:
            for number in range(100):
                log.append({"kmsRequestId": f"{worker}-{number}"})

        threads = [threading.Thread(target=work, args=(worker,)) for worker in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    files = audit_files_in_order(log_path)
    report = verify_files(files)
    assert report.ok, report.problems
    assert (report.records, report.first_seq, report.last_seq) == (800, 0, 799)


@pytest.mark.parametrize("cache_tail", [True, False])
def test_tail_cache_on_and_off_write_the_same_chain(tmp_path: Path, cache_tail: bool) -> None:
    class Log(AuditLog):
        _cache_tail = cache_tail

    path = tmp_path / "audit.jsonl"
    with Log(path, fsync=False) as first, Log(path, fsync=False) as second:
        for number in range(20):
            (first if number % 3 else second).append(_record(number))
    assert verify_files([path]).ok
    assert verify_files([path]).last_seq == 19


def test_partial_last_line_is_ended_and_the_chain_continues(log_path: Path) -> None:
    hashes = _write_log(log_path, 3)
    with log_path.open("ab") as file:
        file.write(b'{"kmsRequestId":"cut-off-by-a-cra')  # a write cut short by power loss
    with AuditLog(log_path, fsync=False) as log:
        log.append(_record(3))
    record = orjson.loads(_lines(log_path)[4])
    assert (record["seq"], record["prev"]) == (3, hashes[-1])
    assert _only_problem(log_path).startswith(f"{log_path}:4: bad JSON")


def test_records_longer_than_the_tail_chunk(log_path: Path) -> None:
    with AuditLog(log_path, fsync=False) as log:
        log.append({"kmsRequestId": "big", "policyIds": ["p" * 50] * 400})
    with AuditLog(log_path, fsync=False) as log:  # a fresh instance reads the tail back
        log.append(_record(1))
    report = verify_files([log_path])
    assert report.ok and report.last_seq == 1


def test_fragment_only_live_file_continues_from_rotated_file(log_path: Path) -> None:
    hashes = _write_log(log_path, 3)
    log_path.rename(log_path.with_name("audit.20240501T120000Z.2.jsonl"))
    log_path.write_bytes(b'{"kmsRequestId":"cut')
    with AuditLog(log_path, fsync=False) as log:
        log.append(_record(3))
    record = orjson.loads(_lines(log_path)[1])
    assert (record["seq"], record["prev"]) == (3, hashes[-1])
    assert _only_problem(log_path).startswith(f"{log_path}:1: bad JSON")


def test_corrupt_last_record_stops_appends_without_echoing_it(log_path: Path) -> None:
    _write_log(log_path, 2)
    lines = _lines(log_path)
    _rewrite(log_path, [*lines[:-1], b'{"tampered": "sensitive-looking"}\n'])
    with AuditLog(log_path, fsync=False) as log, pytest.raises(AuditLogError) as raised:
        log.append(_record(2))
    assert "sensitive-looking" not in str(raised.value)


# --------------------------------------------------------------------------- rotation


def test_size_rotation_chains_across_three_or_more_files(log_path: Path) -> None:
    hashes = _write_log(log_path, 30, rotate_bytes=1500)

    files = audit_files_in_order(log_path)
    assert len(files) >= 4 and files[-1] == log_path
    for rotated in files[:-1]:
        stem, stamp, last_seq, suffix = rotated.name.split(".")
        assert (stem, suffix, len(stamp)) == ("audit", "jsonl", 16)
        assert orjson.loads(_lines(rotated)[-1])["seq"] == int(last_seq)
        assert rotated.stat().st_size <= 1500
    for older, newer in itertools.pairwise(files):
        assert orjson.loads(_lines(newer)[0])["prev"] == orjson.loads(_lines(older)[-1])["hash"]
    report = verify_files(files)
    assert report.ok, report.problems
    assert (report.records, report.last_seq, report.last_hash) == (30, 29, hashes[-1])


def test_missing_middle_file_is_a_chain_break_between_files(log_path: Path) -> None:
    _write_log(log_path, 30, rotate_bytes=1500)
    files = audit_files_in_order(log_path)
    removed = files.pop(1)
    last_before = orjson.loads(_lines(files[0])[-1])["seq"]

    report = verify_files(files)
    assert not report.ok and len(report.problems) == 1
    problem = report.problems[0]
    assert problem.startswith(f"{files[1]}:1: chain break between files: {files[0]} ends at")
    missing = len(_lines(removed))
    assert f"{missing} record(s) missing (seq {last_before + 1}.." in problem


def test_other_instance_notices_rotation_and_reopens(log_path: Path) -> None:
    # Two instances stand for two processes: one rotates, the other must follow.
    with (
        AuditLog(log_path, fsync=False, rotate_bytes=1200) as rotating,
        AuditLog(log_path, fsync=False, rotate_bytes=None) as other,
    ):
        for number in range(12):
            rotating.append(_record(number))
            other.append(_record(number))
    files = audit_files_in_order(log_path)
    assert len(files) >= 3
    report = verify_files(files)
    assert report.ok, report.problems
    assert report.records == 24


def test_age_rotation(log_path: Path) -> None:
    with AuditLog(log_path, fsync=False, rotate_bytes=None, rotate_seconds=0.05) as log:
        log.append({"kmsRequestId": "a"})
        log.append({"kmsRequestId": "b"})
        time.sleep(0.08)
        log.append({"kmsRequestId": "c"})
    files = audit_files_in_order(log_path)
    assert [len(_lines(path)) for path in files] == [2, 1]
    assert verify_files(files).ok


def test_crash_between_rename_and_first_write_continues_from_rotated_file(
    log_path: Path,
) -> None:
    hashes = _write_log(log_path, 3)
    log_path.rename(log_path.with_name("audit.20240501T120000Z.2.jsonl"))
    with AuditLog(log_path, fsync=False) as log:
        log.append(_record(3))
    record = orjson.loads(_lines(log_path)[0])
    assert (record["seq"], record["prev"]) == (3, hashes[-1])
    assert verify_files(audit_files_in_order(log_path)).ok


def test_files_in_order_sorts_rotated_files_by_seq_not_name(tmp_path: Path) -> None:
    for name in ("audit.20240501T120000Z.99.jsonl", "audit.20240501T120000Z.100.jsonl"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "audit.jsonl").write_bytes(b"")
    (tmp_path / "audit.jsonl.lock").write_bytes(b"")
    (tmp_path / "other.20240501T120000Z.5.jsonl").write_bytes(b"")
    assert [path.name for path in audit_files_in_order(tmp_path / "audit.jsonl")] == [
        "audit.20240501T120000Z.99.jsonl",
        "audit.20240501T120000Z.100.jsonl",
        "audit.jsonl",
    ]


# --------------------------------------------------------------------------- tampering


def _edit_field(line: bytes) -> bytes:
    return line.replace(b'"status":200', b'"status":500')


def test_edited_field(log_path: Path) -> None:
    _write_log(log_path, 6)
    lines = _lines(log_path)
    lines[2] = _edit_field(lines[2])
    _rewrite(log_path, lines)
    assert (
        _only_problem(log_path)
        == f"{log_path}:3: edited: hash does not match the record's contents"
    )


def test_edited_hash_field(log_path: Path) -> None:
    _write_log(log_path, 6)
    lines = _lines(log_path)
    record = orjson.loads(lines[2])
    record["hash"] = "f" * 64
    lines[2] = orjson.dumps(record, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE)
    _rewrite(log_path, lines)
    assert _only_problem(log_path).startswith(f"{log_path}:3: edited")


def test_noncanonical_spelling_is_an_edit(log_path: Path) -> None:
    _write_log(log_path, 4)
    lines = _lines(log_path)
    lines[1] = lines[1].replace(b'"latencyMs":1.25', b'"latencyMs":1.250')
    _rewrite(log_path, lines)
    assert _only_problem(log_path) == (
        f"{log_path}:2: edited: not in canonical form the record's contents"
    )


def test_edit_rehashed_in_plain_chain_breaks_at_next_line(log_path: Path) -> None:
    # An attacker who rewrites a record and its hash (no key needed for a plain chain)
    # is caught by the next record's prev -- unless they rewrite the whole tail too.
    _write_log(log_path, 6)
    lines = _lines(log_path)
    record = orjson.loads(lines[2])
    record["status"] = 500
    del record["hash"]
    message = bytes.fromhex(record["prev"]) + orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
    record["hash"] = hashlib.sha256(message).hexdigest()
    lines[2] = orjson.dumps(record, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE)
    _rewrite(log_path, lines)
    assert _only_problem(log_path).startswith(
        f"{log_path}:4: chain break: prev does not match the hash of {log_path}:3"
    )


def test_rehashing_without_the_key_fails_in_a_keyed_chain(log_path: Path) -> None:
    _write_log(log_path, 6, chain_key=CHAIN_KEY)
    lines = _lines(log_path)
    record = orjson.loads(lines[2])
    record["status"] = 500
    del record["hash"]
    message = bytes.fromhex(record["prev"]) + orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
    record["hash"] = hashlib.sha256(message).hexdigest()
    lines[2] = orjson.dumps(record, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE)
    _rewrite(log_path, lines)
    problems = verify_files([log_path], chain_key=CHAIN_KEY).problems
    assert problems[0] == f"{log_path}:3: edited: hash does not match the record's contents"


def test_deleted_line(log_path: Path) -> None:
    _write_log(log_path, 6)
    lines = _lines(log_path)
    del lines[2]
    _rewrite(log_path, lines)
    assert _only_problem(log_path) == (
        f"{log_path}:3: deleted: 1 record(s) missing before this line (seq 2)"
    )


def test_deleted_lines(log_path: Path) -> None:
    _write_log(log_path, 8)
    lines = _lines(log_path)
    del lines[2:5]
    _rewrite(log_path, lines)
    assert _only_problem(log_path) == (
        f"{log_path}:3: deleted: 3 record(s) missing before this line (seq 2..4)"
    )


def test_inserted_copy_of_a_line(log_path: Path) -> None:
    _write_log(log_path, 6)
    lines = _lines(log_path)
    lines.insert(4, lines[1])
    _rewrite(log_path, lines)
    assert _only_problem(log_path).startswith(
        f"{log_path}:5: inserted: this record (seq 1) is not part of the chain; "
        f"the next line continues from {log_path}:4"
    )


def test_inserted_forged_record(log_path: Path) -> None:
    _write_log(log_path, 6)
    lines = _lines(log_path)
    forged = orjson.loads(lines[3])
    forged["kmsRequestId"] = "forged"
    lines.insert(4, orjson.dumps(forged, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE))
    _rewrite(log_path, lines)
    assert _only_problem(log_path).startswith(f"{log_path}:5: inserted: this line's hash")


def test_inserted_junk_line(log_path: Path) -> None:
    _write_log(log_path, 6)
    lines = _lines(log_path)
    lines.insert(2, b"not json at all\n")
    _rewrite(log_path, lines)
    assert _only_problem(log_path).startswith(f"{log_path}:3: bad JSON")


def test_two_lines_swapped(log_path: Path) -> None:
    _write_log(log_path, 6)
    lines = _lines(log_path)
    lines[2], lines[3] = lines[3], lines[2]
    _rewrite(log_path, lines)
    assert _only_problem(log_path) == (
        f"{log_path}:3: reordered: lines 3 and 4 are swapped (seq 3 comes before seq 2)"
    )


def test_truncated_last_line(log_path: Path) -> None:
    _write_log(log_path, 6)
    data = log_path.read_bytes()
    log_path.write_bytes(data[:-40])
    assert _only_problem(log_path) == f"{log_path}:6: truncated last line (partial write)"


def test_missing_final_newline(log_path: Path) -> None:
    _write_log(log_path, 3)
    log_path.write_bytes(log_path.read_bytes()[:-1])
    assert _only_problem(log_path).startswith(f"{log_path}:3: no newline at end of file")


def test_wrong_hmac_key(log_path: Path) -> None:
    _write_log(log_path, 6, chain_key=CHAIN_KEY)
    assert _only_problem(log_path, chain_key=OTHER_KEY).startswith(
        f"{log_path}:1: wrong chain key: no record's HMAC matches"
    )


def test_keyed_log_verified_without_key(log_path: Path) -> None:
    _write_log(log_path, 3, chain_key=CHAIN_KEY)
    assert "probably HMAC-keyed" in _only_problem(log_path)


def test_plain_log_verified_with_a_key(log_path: Path) -> None:
    _write_log(log_path, 3)
    assert "plain SHA-256 chain" in _only_problem(log_path, chain_key=CHAIN_KEY)


def test_wrong_key_still_reports_structural_damage(log_path: Path) -> None:
    _write_log(log_path, 6, chain_key=CHAIN_KEY)
    lines = _lines(log_path)
    del lines[3]
    _rewrite(log_path, lines)
    problems = verify_files([log_path], chain_key=OTHER_KEY).problems
    assert len(problems) == 2 and problems[1].startswith(f"{log_path}:4: deleted")


def test_chain_starting_after_genesis_is_accepted_as_pruned(log_path: Path) -> None:
    _write_log(log_path, 30, rotate_bytes=1500)
    files = audit_files_in_order(log_path)[1:]  # retention removed the oldest file
    report = verify_files(files)
    assert report.ok and report.first_seq is not None and report.first_seq > 0


def test_problems_do_not_quote_record_contents(log_path: Path) -> None:
    _write_log(log_path, 4)
    lines = _lines(log_path)
    lines[1] = lines[1].replace(b"req-1", b"leaky")
    lines[2] = lines[2][:30] + b"leaky\n"
    _rewrite(log_path, lines)
    problems = verify_files([log_path]).problems
    assert problems and not any("leaky" in problem for problem in problems)


# --------------------------------------------------------------------------- properties


def _build_valid_log(chain_key: bytes | None) -> bytes:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "audit.jsonl"
        _write_log(path, 8, chain_key=chain_key)
        return path.read_bytes()


VALID_LOGS = {None: _build_valid_log(None), CHAIN_KEY: _build_valid_log(CHAIN_KEY)}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    keyed=st.booleans(),
    position=st.floats(min_value=0, max_value=1, exclude_max=True),
    flip=st.integers(min_value=1, max_value=255),
)
def test_any_single_byte_change_is_detected(keyed: bool, position: float, flip: int) -> None:
    chain_key = CHAIN_KEY if keyed else None
    data = bytearray(VALID_LOGS[chain_key])
    data[int(position * len(data))] ^= flip
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "audit.jsonl"
        path.write_bytes(bytes(data))
        report = verify_files([path], chain_key=chain_key)
    assert not report.ok
    assert all(problem.startswith(f"{path}:") for problem in report.problems)


_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=6,
)
_safe_keys = st.text(min_size=1, max_size=12).filter(
    lambda key: (
        key not in {"seq", "prev", "hash"}
        and key.lower() not in {"plaintext", "additionalauthenticateddata", "ciphertext", "pin"}
        and not key.lower().startswith("secret")
    )
)


def _has_forbidden_key(value: Any) -> bool:
    if isinstance(value, dict):
        return any(
            key.lower() in {"plaintext", "additionalauthenticateddata", "ciphertext", "pin"}
            or key.lower().startswith("secret")
            or _has_forbidden_key(item)
            for key, item in value.items()
        )
    if isinstance(value, list):
        return any(_has_forbidden_key(item) for item in value)
    return False


@settings(max_examples=60, deadline=None)
@given(records=st.lists(st.dictionaries(_safe_keys, _json_values, max_size=4), max_size=3))
def test_any_json_record_round_trips_to_a_verifiable_line(records: list[dict[str, Any]]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "audit.jsonl"
        with AuditLog(path, fsync=False) as log:
            for record in records:
                if _has_forbidden_key(record):
                    with pytest.raises(ValueError):
                        log.append(record)
                else:
                    log.append(record)
        report = verify_files([path]) if path.exists() else None
    assert report is None or report.ok, report.problems if report else None


# --------------------------------------------------------------------------- CLI helper


def test_main_verify_ok_in_chain_order(log_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_log(log_path, 30, rotate_bytes=1500)
    files = audit_files_in_order(log_path)
    shuffled = sorted(files, key=lambda path: path.name)  # as a shell glob would order them
    assert main_verify(shuffled[::-1], None) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK: 30 records across {len(files)} files (seq 0..29")


def test_main_verify_reports_problems(log_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_log(log_path, 6)
    lines = _lines(log_path)
    lines[1] = _edit_field(lines[1])
    _rewrite(log_path, lines)
    assert main_verify([log_path], None) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("FAILED: 1 problem(s) in 6 records across 1 files")
    assert out[1] == f"  {log_path}:2: edited: hash does not match the record's contents"


def test_main_verify_with_key_file(tmp_path: Path, log_path: Path) -> None:
    _write_log(log_path, 3, chain_key=CHAIN_KEY)
    key_file = tmp_path / "chain.key"
    key_file.write_text(CHAIN_KEY.hex() + "\n")
    assert load_chain_key(key_file) == CHAIN_KEY
    assert main_verify([log_path], key_file) == 0
    key_file.write_text(OTHER_KEY.hex())
    assert main_verify([log_path], key_file) == 1


@pytest.mark.parametrize("content", ["not hex", "abcd", ""])
def test_bad_key_file(tmp_path: Path, log_path: Path, content: str) -> None:
    _write_log(log_path, 1)
    key_file = tmp_path / "chain.key"
    key_file.write_text(content)
    with pytest.raises(ValueError):
        load_chain_key(key_file)
    assert main_verify([log_path], key_file) == 1


def test_main_verify_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main_verify([tmp_path / "absent.jsonl"], None) == 1
    assert "cannot read" in capsys.readouterr().out


# --------------------------------------------------------------------------- one chain per worker


def test_worker_log_paths_and_chain_names(tmp_path: Path) -> None:
    base = tmp_path / "audit.jsonl"
    assert worker_log_path(base, 0) == tmp_path / "audit.worker0.jsonl"
    assert worker_log_path(base, 12).name == "audit.worker12.jsonl"
    # Whatever the configured name, the live files end in .worker<N>.jsonl.
    assert worker_log_path(tmp_path / "xks-audit", 1).name == "xks-audit.worker1.jsonl"
    assert worker_log_path(tmp_path / "audit.log", 1).name == "audit.log.worker1.jsonl"
    rotated = tmp_path / "audit.worker1.20261130T101010Z.41.jsonl"
    assert chain_of(rotated) == "audit.worker1"
    assert chain_of(worker_log_path(base, 1)) == "audit.worker1"
    assert chain_of(worker_log_path(base, 10)) == "audit.worker10"
    assert chain_of(tmp_path / "copy.jsonl") == "copy"
    # Rotated files archived in another directory still belong to their chain.
    assert chain_of(tmp_path / "archive" / rotated.name) == "audit.worker1"


def test_workers_chains_stay_apart_whatever_the_configured_name(tmp_path: Path) -> None:
    """A path without .jsonl once gave two workers the same rotated-file names, so one
    chain continued from the other's rotated file."""
    for base in (tmp_path / "a" / "xks-audit", tmp_path / "b" / "audit.log"):
        base.parent.mkdir()
        logs = [AuditLog(worker_log_path(base, w), fsync=False, rotate_bytes=1500) for w in (0, 1)]
        for number in range(30):
            for log in logs:
                log.append(_record(number))
        for log in logs:
            log.close()
        chains = audit_chains([base.parent])
        assert [chain_of(chain[-1]) for chain in chains] == [
            worker_log_path(base, w).stem for w in (0, 1)
        ]
        for chain in chains:
            report = verify_files(chain)
            assert report.ok and report.records == 30 and len(chain) > 2, report.problems


def test_audit_chains_groups_a_directory_by_worker(tmp_path: Path) -> None:
    base = tmp_path / "audit.jsonl"
    for worker in (0, 1):
        _write_log(worker_log_path(base, worker), 25, rotate_bytes=1500)
    (tmp_path / "notes.txt").write_text("not an audit file")
    chains = audit_chains([tmp_path])
    assert [chain[-1].name for chain in chains] == ["audit.worker0.jsonl", "audit.worker1.jsonl"]
    for worker, chain in enumerate(chains):
        assert chain == audit_files_in_order(worker_log_path(base, worker))
        assert len(chain) > 2  # rotated files, in seq order, then the live file
        assert verify_files(chain).ok


def test_main_verify_checks_every_chain_and_names_the_broken_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tmp_path / "audit.jsonl"
    live = [worker_log_path(base, worker) for worker in (0, 1)]
    for path in live:
        _write_log(path, 6)
    assert main_verify([tmp_path], None) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(", last hash")[0] for line in out] == [
        "audit.worker0: OK: 6 records across 1 files (seq 0..5",
        "audit.worker1: OK: 6 records across 1 files (seq 0..5",
        "OK: all 2 chains",
    ]
    lines = _lines(live[1])
    lines[3] = _edit_field(lines[3])
    _rewrite(live[1], lines)
    assert main_verify(live, None) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("audit.worker0: OK: 6 records")
    assert out[1].startswith("audit.worker1: FAILED: 1 problem(s) in 6 records")
    assert out[2] == f"  {live[1]}:4: edited: hash does not match the record's contents"
    assert out[3] == "FAILED: 1 of 2 chains"


def test_main_verify_of_an_empty_directory_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main_verify([tmp_path], None) == 1
    assert "no audit files" in capsys.readouterr().err


def test_a_file_given_twice_counts_once(log_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_log(log_path, 4)
    (log_path.parent / "not-a-file.jsonl").mkdir()  # a directory with the suffix is skipped
    assert main_verify([log_path.parent, log_path, log_path.parent.resolve()], None) == 0
    assert capsys.readouterr().out.startswith("OK: 4 records across 1 files")


def test_a_rotated_file_missing_from_an_archive_is_still_a_break(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live = tmp_path / "audit" / "audit.worker0.jsonl"
    live.parent.mkdir()
    _write_log(live, 30, rotate_bytes=1500)
    archive = tmp_path / "archive"
    archive.mkdir()
    rotated = [path for path in audit_files_in_order(live) if path != live]
    for path in rotated:
        path.rename(archive / path.name)
    (archive / rotated[-1].name).unlink()  # the newest archived file goes missing
    assert main_verify([*sorted(archive.iterdir()), live.parent], None) == 1
    out = capsys.readouterr().out
    assert "chain break between files" in out and "record(s) missing" in out
