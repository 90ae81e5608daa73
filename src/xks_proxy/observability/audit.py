"""Append-only, tamper-evident JSON-lines audit log of every XKS API decision.

Each line is one JSON object: the caller's fields plus ``seq``, ``prev``, ``hash``
(and ``time`` if the caller gave none). ``hash`` chains the records::

    hash = SHA-256(bytes.fromhex(prev) || canonical_json(record without "hash"))

or HMAC-SHA256 under ``chain_key`` with the same message, where canonical_json is
orjson with OPT_SORT_KEYS and ``prev`` is the previous record's hash (64 zeros for
the first record of a brand-new log). ``seq`` counts up by one across the whole
chain, rotated files included.

Several worker processes may append to one log. Every append runs, under a
``threading.Lock`` and an exclusive ``flock`` on a sidecar ``<name>.lock`` file:
detect rotation (inode of our fd vs the path), read the chain tail (or reuse our
cached tail when the file's size proves nobody else wrote), rotate if due, then one
``os.write`` of one line on an ``O_APPEND`` fd. The fd is ``fdatasync``'d after the
flock is released (so processes' syncs overlap) and before ``append`` returns.

Exceptions and problem reports name files, lines, keys and sequence numbers, never
record contents.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import orjson

__all__ = [
    "GENESIS_HASH",
    "AuditLog",
    "AuditLogError",
    "VerifyReport",
    "audit_chains",
    "audit_files_in_order",
    "chain_of",
    "load_chain_key",
    "main_verify",
    "verify_files",
    "worker_log_path",
]

GENESIS_HASH: Final = "0" * 64
"""``prev`` of the first record of a brand-new log."""

_RESERVED_KEYS: Final = frozenset({"seq", "prev", "hash"})
_FORBIDDEN_KEYS: Final = frozenset(
    {"plaintext", "additionalauthenticateddata", "ciphertext", "pin"}
)
_FORBIDDEN_PREFIX: Final = "secret"
_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_ROTATED_NAME: Final = r"\.(\d{8}T\d{6}Z)\.(\d+)\.jsonl"
_TAIL_CHUNK: Final = 4096
_MIN_CHAIN_KEY_BYTES: Final = 16
_fdatasync = getattr(os, "fdatasync", os.fsync)

# Bumped in a forked child: a flock is shared by the parent's and the child's copies
# of one open file description, so a child must open its own fds before appending.
_fork_generation = 0


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class AuditLogError(Exception):
    """The audit log cannot be appended to (closed, or its tail is not a valid record)."""


# --------------------------------------------------------------------------- hashing


def _chain_hash(prev: str, canonical: bytes, chain_key: bytes | None) -> str:
    message = bytes.fromhex(prev) + canonical
    if chain_key is None:
        return hashlib.sha256(message).hexdigest()
    return hmac.digest(chain_key, message, "sha256").hex()


# Dataclasses would serialise in field order, which a JSON round trip does not keep.
_CANONICAL: Final = orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATACLASS


def _canonical(record: Mapping[str, Any]) -> bytes:
    return orjson.dumps(record, option=_CANONICAL)


# --------------------------------------------------------------------------- records


_time_prefix_cache: tuple[int, str] = (-1, "")


def _utc_now_iso() -> str:
    global _time_prefix_cache
    now = time.time()
    seconds = int(now)
    cached_second, prefix = _time_prefix_cache
    if seconds != cached_second:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _time_prefix_cache = (seconds, prefix)
    return f"{prefix}.{int((now - seconds) * 1000):03d}Z"


# Key names already found harmless: the service uses a fixed set, so after the first
# few records checking a key is one set lookup. Bounded against callers with unbounded keys.
_harmless_keys: set[str] = set()
_HARMLESS_KEYS_MAX: Final = 4096


def _check_key(key: object) -> None:
    if not isinstance(key, str):
        raise ValueError("audit record keys must be strings")
    lowered = key.lower()
    if lowered in _FORBIDDEN_KEYS or lowered.startswith(_FORBIDDEN_PREFIX):
        raise ValueError(f"audit record must not contain a field named {key!r}")
    if len(_harmless_keys) < _HARMLESS_KEYS_MAX:
        _harmless_keys.add(key)


_SCALAR_TYPES: Final = frozenset({str, int, float, bool, type(None)})


def _check_keys(mapping: Mapping[Any, Any]) -> None:
    """Refuse secret-looking keys anywhere in the record (orjson refuses non-JSON values)."""
    for key, value in mapping.items():
        if key not in _harmless_keys:
            _check_key(key)
        kind = type(value)
        if kind in _SCALAR_TYPES:
            continue
        if kind is dict:
            _check_keys(value)
        elif kind is list or kind is tuple:
            _check_items(value)
        elif isinstance(value, Mapping):
            _check_keys(value)
        elif isinstance(value, list | tuple):
            _check_items(value)


def _check_items(items: Sequence[Any]) -> None:
    for value in items:
        if isinstance(value, Mapping):
            _check_keys(value)
        elif isinstance(value, list | tuple):
            _check_items(value)


# --------------------------------------------------------------------------- files


def _rotated_pattern(live: Path) -> re.Pattern[str]:
    return re.compile(re.escape(live.stem) + _ROTATED_NAME)


def audit_files_in_order(path: Path) -> list[Path]:
    """The rotated files of the log at ``path`` (oldest first), then the live file.

    Rotated files are ``<stem>.<UTC timestamp>.<seq>.jsonl`` next to ``path``, where
    seq is the last record's; they are ordered by that seq, not by name.
    """
    pattern = _rotated_pattern(path)
    rotated: list[tuple[int, str, Path]] = []
    directory = path.parent
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        names = []
    for name in names:
        match = pattern.fullmatch(name)
        if match is not None:
            rotated.append((int(match.group(2)), match.group(1), directory / name))
    rotated.sort()
    files = [entry[2] for entry in rotated]
    if path.exists():
        files.append(path)
    return files


def _chain_order(paths: Sequence[Path]) -> list[Path]:
    """Order paths as a chain: rotated-looking names by seq, then the rest as given."""
    rotated: list[tuple[int, str, Path]] = []
    others: list[Path] = []
    for path in paths:
        match = re.fullmatch(r".+" + _ROTATED_NAME, path.name)
        if match is None:
            others.append(path)
        else:
            rotated.append((int(match.group(2)), match.group(1), path))
    rotated.sort()
    return [entry[2] for entry in rotated] + others


def _last_lines(fd: int, size: int, count: int) -> list[bytes]:
    """Up to ``count`` last lines of the first ``size`` bytes of a file.

    A final newline ends the last line; without one, the last line is a fragment.
    """
    chunk = _TAIL_CHUNK
    while True:
        start = max(0, size - chunk)
        data = os.pread(fd, size - start, start)
        if data.endswith(b"\n"):
            data = data[:-1]
        lines = data.split(b"\n")
        if len(lines) > count or start == 0:
            return lines[-count:]
        chunk *= 4


def _parse_tail(line: bytes) -> tuple[int, str] | None:
    """(seq, hash) of a record line, or None if the line is not one."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict):
        return None
    seq, record_hash = record.get("seq"), record.get("hash")
    if (
        type(seq) is not int
        or not isinstance(record_hash, str)
        or not _HEX64.fullmatch(record_hash)
    ):
        return None
    return seq, record_hash


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _first_record_time(fd: int, size: int) -> float | None:
    """The ``time`` of a file's first record as epoch seconds, if it parses."""
    data = os.pread(fd, min(size, _TAIL_CHUNK), 0)
    newline = data.find(b"\n")
    if newline < 0:
        return None
    try:
        record = orjson.loads(data[:newline])
    except orjson.JSONDecodeError:
        return None
    value = record.get("time") if isinstance(record, dict) else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return None


# --------------------------------------------------------------------------- writer


@dataclass(slots=True)
class _Tail:
    """The chain head as last seen by this process, valid while the file has this size."""

    size: int
    seq: int
    hash: str


class AuditLog:
    """Append audit records to a hash-chained JSON-lines file shared by many processes.

    ``rotate_bytes``: rotate before a write that would take the live file past this
    size. ``rotate_seconds``: rotate before a write once the live file's first record
    is this old (checked on append; a quiet log is not rotated until the next record).
    ``fsync``: make each record durable against power loss before ``append`` returns
    (without it a record still survives a crash of this process). ``chain_key``: make
    the chain an HMAC-SHA256 chain under this key.
    """

    # Re-use the tail read by our own last append when the file size shows nobody
    # else wrote since; off only to measure the difference (bench/audit_cost.py).
    _cache_tail: bool = True
    # Sync after releasing the flock so that processes' syncs overlap; on only to
    # measure the difference.
    _fsync_under_flock: bool = False

    def __init__(
        self,
        path: Path,
        *,
        rotate_bytes: int | None = 64 << 20,
        rotate_seconds: float | None = None,
        fsync: bool = True,
        chain_key: bytes | None = None,
    ) -> None:
        if rotate_bytes is not None and rotate_bytes <= 0:
            raise ValueError("rotate_bytes must be positive or None")
        if rotate_seconds is not None and rotate_seconds <= 0:
            raise ValueError("rotate_seconds must be positive or None")
        if chain_key is not None and len(chain_key) < _MIN_CHAIN_KEY_BYTES:
            raise ValueError(f"chain_key must be at least {_MIN_CHAIN_KEY_BYTES} bytes")
        self._path = Path(path)
        self._path_str = os.fspath(self._path)  # os.stat on a str skips __fspath__ per append
        self._lock_path = self._path.with_name(self._path.name + ".lock")
        self._rotate_bytes = rotate_bytes
        self._rotate_seconds = rotate_seconds
        self._fsync = fsync
        self._chain_key = chain_key
        self._closed = False
        self._open_fds()

    def _open_fds(self) -> None:
        self._thread_lock = threading.Lock()
        self._generation = _fork_generation
        self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        self._fd = -1
        self._ino = (-1, -1)
        self._tail: _Tail | None = None
        self._live_started: float | None = None

    def __repr__(self) -> str:
        keyed = self._chain_key is not None
        return f"AuditLog(path={str(self._path)!r}, keyed={keyed}, fsync={self._fsync})"

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def path(self) -> Path:
        """The live file."""
        return self._path

    def append(self, record: Mapping[str, Any]) -> str:
        """Write one record (durably, if ``fsync``) and return its hash.

        When this returns the line is in the file (it survives a crash of this
        process) and, with ``fsync``, on stable storage (it survives power loss).
        Raises ValueError for a record with a forbidden or reserved key or a non-JSON
        value, AuditLogError if the log is closed or its tail is not a valid record,
        OSError if the write fails.
        """
        return self.append_many([record])[0]

    def append_many(self, records: Sequence[Mapping[str, Any]]) -> list[str]:
        """Write several records under one lock and one fsync (group commit).

        Same guarantees as :meth:`append` for every record once this returns; the
        records get consecutive sequence numbers in the given order.
        """
        batch: list[dict[str, Any]] = []
        for record in records:
            fields = dict(record)
            _check_keys(fields)
            reserved = _RESERVED_KEYS.intersection(fields)
            if reserved:
                raise ValueError(f"audit record fields {sorted(reserved)} are set by the audit log")
            fields.setdefault("time", _utc_now_iso())
            batch.append(fields)
        if not batch:
            return []
        if self._generation != _fork_generation:
            self._reopen_after_fork()
        hashes: list[str] = []
        with self._thread_lock:
            if self._closed:
                raise AuditLogError("audit log is closed")
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                for fields in batch:
                    record_hash, fd = self._append_locked(fields)
                    hashes.append(record_hash)
                if self._fsync and self._fsync_under_flock:
                    _fdatasync(fd)
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            if self._fsync and not self._fsync_under_flock:
                _fdatasync(fd)
        return hashes

    def _append_locked(self, fields: dict[str, Any]) -> tuple[str, int]:
        size = self._ensure_current_file()
        size, seq, prev, live_has_record = self._chain_head(size)
        fields["seq"] = seq
        fields["prev"] = prev
        try:
            canonical = _canonical(fields)
        except (orjson.JSONEncodeError, TypeError):
            raise ValueError("audit record is not JSON-serialisable") from None
        record_hash = _chain_hash(prev, canonical, self._chain_key)
        fields["hash"] = record_hash
        line = orjson.dumps(fields, option=_CANONICAL | orjson.OPT_APPEND_NEWLINE)
        if live_has_record and self._rotation_due(size, len(line)):
            self._rotate(seq - 1)
            size = 0
        self._write(line)
        self._tail = _Tail(size + len(line), seq, record_hash)
        return record_hash, self._fd

    def _write(self, data: bytes) -> None:
        written = os.write(self._fd, data)
        if written != len(data):
            # The fragment is terminated and skipped by the next append; verify reports it.
            raise OSError(f"short write to audit log {self._path} ({written} of {len(data)})")

    def _ensure_current_file(self) -> int:
        """(Re)open the live file if it was rotated or removed; return its size."""
        try:
            stat = os.stat(self._path_str)
        except FileNotFoundError:
            stat = None
        if stat is not None and (stat.st_dev, stat.st_ino) == self._ino:
            return stat.st_size
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._fd = os.open(self._path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        opened = os.fstat(self._fd)
        self._ino = (opened.st_dev, opened.st_ino)
        self._tail = None
        self._live_started = None
        if stat is None and self._fsync:
            _fsync_directory(self._path.parent)
        return opened.st_size

    def _chain_head(self, size: int) -> tuple[int, int, str, bool]:
        """(size, next seq, prev hash, whether the live file holds a record).

        A partial last line (a write cut short by a crash or power loss) is ended
        with a newline so that our record starts on its own line; verify reports it.
        """
        tail = self._tail
        if self._cache_tail and tail is not None and tail.size == size:
            return size, tail.seq + 1, tail.hash, True
        if size == 0:
            return (size, *self._head_of_rotated_files(), False)
        partial = os.pread(self._fd, 1, size - 1) != b"\n"
        if partial:
            self._write(b"\n")
            size += 1
        lines = _last_lines(self._fd, size, 2 if partial else 1)
        for line in reversed(lines):
            parsed = _parse_tail(line)
            if parsed is not None:
                return size, parsed[0] + 1, parsed[1], True
        if partial and len(lines) == 1:
            # The file holds nothing but the fragment: continue from the rotated files.
            return (size, *self._head_of_rotated_files(), False)
        raise AuditLogError(
            f"the last record of {self._path} is not a valid audit record; "
            "refusing to extend the chain (run audit verify)"
        )

    def _head_of_rotated_files(self) -> tuple[int, str]:
        """Next (seq, prev) for an empty live file: after the newest rotated file."""
        rotated = [path for path in audit_files_in_order(self._path) if path != self._path]
        if not rotated:
            return 0, GENESIS_HASH
        newest = rotated[-1]
        fd = os.open(newest, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            partial = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
            lines = _last_lines(fd, size, 2 if partial else 1) if size else []
        finally:
            os.close(fd)
        for line in reversed(lines):
            parsed = _parse_tail(line)
            if parsed is not None:
                return parsed[0] + 1, parsed[1]
        raise AuditLogError(
            f"the newest rotated audit file {newest} does not end with a valid record; "
            "refusing to extend the chain (run audit verify)"
        )

    def _rotation_due(self, size: int, line_bytes: int) -> bool:
        if self._rotate_bytes is not None and size + line_bytes > self._rotate_bytes:
            return True
        if self._rotate_seconds is None:
            return False
        if self._live_started is None:
            started = _first_record_time(self._fd, size)
            # An unparseable first time: count the age from when this process first saw it.
            self._live_started = started if started is not None else time.time()
        return time.time() - self._live_started >= self._rotate_seconds

    def _rotate(self, last_seq: int) -> None:
        """Rename the live file to its rotated name and open a new, empty live file."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self._path.with_name(f"{self._path.stem}.{stamp}.{last_seq}.jsonl")
        if target.exists():
            raise AuditLogError(f"refusing to overwrite the rotated audit file {target}")
        if self._fsync:
            # A record of the old file must not be lost behind a durable one in the new file.
            _fdatasync(self._fd)
        os.rename(self._path, target)
        old_fd = self._fd
        self._fd = os.open(self._path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o640)
        os.close(old_fd)
        opened = os.fstat(self._fd)
        self._ino = (opened.st_dev, opened.st_ino)
        self._tail = None
        self._live_started = time.time()
        if self._fsync:
            _fsync_directory(self._path.parent)

    def _reopen_after_fork(self) -> None:
        # The inherited fds share the parent's open file descriptions and so its flock:
        # close our copies (the parent keeps its lock) and open our own. The inherited
        # thread lock may be held by a parent thread that does not exist here.
        for fd in (self._fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._lock_fd = -1
        if self._closed:
            self._thread_lock = threading.Lock()
            self._generation = _fork_generation
        else:
            self._open_fds()

    def close(self) -> None:
        """Close the files; further appends raise AuditLogError."""
        if self._generation != _fork_generation:
            self._reopen_after_fork()
        with self._thread_lock:
            if self._closed:
                return
            self._closed = True
            for fd in (self._fd, self._lock_fd):
                if fd >= 0:
                    os.close(fd)
            self._fd = self._lock_fd = -1


# --------------------------------------------------------------------------- verifier


@dataclass
class VerifyReport:
    """The outcome of :func:`verify_files`.

    ``records`` counts the lines that parsed as audit records. ``first_seq``,
    ``last_seq`` and ``last_hash`` describe the chain read: anchor ``last_hash``
    elsewhere to detect a rewritten or cut-off tail.
    """

    ok: bool
    records: int
    files: list[Path]
    problems: list[str]
    first_seq: int | None = None
    last_seq: int | None = None
    last_hash: str | None = None


@dataclass(slots=True)
class _Line:
    """What verify learnt from one line; holds no record contents."""

    path: Path
    file_index: int
    number: int
    problem: str | None = None  # set for a line that is not a well-formed record
    note: str | None = None  # a problem with a line that is still a good record
    seq: int = -1
    prev: str = ""
    stored_hash: str = ""
    computed_hash: str = ""  # "" if prev or hash is not 64 lowercase hex digits
    plain_hash: str = ""  # the unkeyed hash, for the first record of a keyed verify only
    self_ok: bool = False
    noncanonical: bool = False

    @property
    def where(self) -> str:
        return f"{self.path}:{self.number}"


def _parse_line(
    raw: bytes, line: _Line, chain_key: bytes | None, *, want_plain_hash: bool = False
) -> None:
    if not raw:
        line.problem = "empty line (inserted?)"
        return
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        line.problem = "bad JSON (an edited, inserted or partially written line)"
        return
    if not isinstance(record, dict):
        line.problem = "not a JSON object (an inserted or edited line)"
        return
    seq, prev, stored = record.get("seq"), record.get("prev"), record.pop("hash", None)
    if type(seq) is not int or not isinstance(prev, str) or not isinstance(stored, str):
        line.problem = "malformed record: seq, prev or hash missing or of the wrong type"
        return
    line.seq, line.prev, line.stored_hash = seq, prev, stored
    if not (_HEX64.fullmatch(prev) and _HEX64.fullmatch(stored)):
        return  # not self_ok: a byte of prev or hash was changed
    canonical = _canonical(record)
    line.computed_hash = _chain_hash(prev, canonical, chain_key)
    if want_plain_hash and chain_key is not None:
        line.plain_hash = _chain_hash(prev, canonical, None)
    record["hash"] = stored
    # JSON has many spellings of one value; only the canonical one is what we wrote.
    line.noncanonical = _canonical(record) != raw
    line.self_ok = not line.noncanonical and hmac.compare_digest(line.computed_hash, stored)


def _iter_lines(
    files: Sequence[Path], chain_key: bytes | None, problems: list[str]
) -> Iterator[_Line]:
    """Every line of every file, in order, one file in memory at a time."""
    want_plain_hash = chain_key is not None  # for the first record only
    for file_index, path in enumerate(files):
        try:
            data = path.read_bytes()
        except OSError as error:
            problems.append(f"{path}: cannot read: {error.strerror or type(error).__name__}")
            continue
        if not data:
            continue
        terminated = data.endswith(b"\n")
        raw_lines = (data[:-1] if terminated else data).split(b"\n")
        del data
        last = len(raw_lines)
        for number, raw in enumerate(raw_lines, start=1):
            line = _Line(path, file_index, number)
            _parse_line(raw, line, chain_key, want_plain_hash=want_plain_hash)
            want_plain_hash = want_plain_hash and line.problem is not None
            if number == last and not terminated:
                if line.problem is None:
                    line.note = "no newline at end of file (truncated?)"
                else:
                    line.problem = "truncated last line (partial write)"
            yield line


def verify_files(paths: Sequence[Path], *, chain_key: bytes | None = None) -> VerifyReport:
    """Verify the hash chain through ``paths``, taken in the order given.

    Reports each problem as ``file:line: what``: an edited record, a deleted,
    inserted or reordered line, a truncated last line, bad JSON, a break between
    files (a rotated file missing from the set) or a wrong chain key. A chain whose
    first record has seq > 0 is accepted as a log whose older files were removed;
    the report's ``first_seq`` says where it starts. Memory use is one file's bytes.
    """
    files = [Path(path) for path in paths]
    problems: list[str] = []
    # First pass, which normally stops at the first record: does any record verify?
    # If none does, the key (not every record) is the likely culprit: say so once and
    # check the chain's structure with the stored hashes instead.
    first_record: _Line | None = None
    any_verifies = False
    for line in _iter_lines(files, chain_key, []):
        if line.problem is None:
            first_record = first_record or line
            if line.self_ok:
                any_verifies = True
                break
    trust_stored_hashes = False
    if first_record is not None and not any_verifies:
        trust_stored_hashes = _explain_no_record_verifies(first_record, chain_key, problems)
    counted = _Counted(_iter_lines(files, chain_key, problems))
    first_seq, last_seq, last_hash = _check_chain(
        _Lookahead(counted), problems, trust_stored_hashes
    )
    return VerifyReport(
        ok=not problems,
        records=counted.records,
        files=files,
        problems=problems,
        first_seq=first_seq,
        last_seq=last_seq,
        last_hash=last_hash,
    )


class _Counted:
    """Lines passed through, counting the well-formed records."""

    def __init__(self, lines: Iterator[_Line]) -> None:
        self._lines = lines
        self.records = 0

    def __iter__(self) -> Iterator[_Line]:
        for line in self._lines:
            if line.problem is None:
                self.records += 1
            yield line


class _Lookahead:
    """An iterator of lines that can show the next well-formed record without taking it."""

    def __init__(self, lines: _Counted) -> None:
        self._lines = iter(lines)
        self._peeked: _Line | None = None

    def take(self) -> _Line | None:
        if self._peeked is not None:
            line, self._peeked = self._peeked, None
            return line
        return next(self._lines, None)

    def next_record(self) -> _Line | None:
        """The next line if it is a well-formed record, else None."""
        if self._peeked is None:
            self._peeked = next(self._lines, None)
        if self._peeked is not None and self._peeked.problem is None:
            return self._peeked
        return None


def _explain_no_record_verifies(first: _Line, chain_key: bytes | None, problems: list[str]) -> bool:
    """Report a log in which no record verifies; True if that is down to the key."""
    if first.noncanonical or not first.computed_hash:
        return False
    if chain_key is None:
        problems.append(
            f"{first.where}: no record's hash matches: the log is probably HMAC-keyed "
            "(give its chain key), or every record was rewritten"
        )
    elif first.plain_hash == first.stored_hash:
        problems.append(
            f"{first.where}: wrong chain key: the log is a plain SHA-256 chain, "
            "not keyed (verify without a chain key)"
        )
    else:
        problems.append(
            f"{first.where}: wrong chain key: no record's HMAC matches "
            "(or every record was rewritten)"
        )
    return True


def _check_chain(
    lines: _Lookahead, problems: list[str], trust_stored_hashes: bool
) -> tuple[int | None, int | None, str | None]:
    """Walk the lines in order and report breaks. Returns (first seq, last seq, last hash)."""
    anchor: _Line | None = None  # the last record accepted as part of the chain
    lenient_prevs: set[str] = set()  # hashes a record after an edited one may link to
    unverified = 0  # lines since the anchor that could not be checked (bad or edited)
    first_seq: int | None = None
    while (line := lines.take()) is not None:
        if line.problem is not None:
            problems.append(f"{line.where}: {line.problem}")
            unverified += 1
            continue
        if line.note is not None:
            problems.append(f"{line.where}: {line.note}")
        if not (line.self_ok or trust_stored_hashes):
            following = lines.next_record()
            if (
                anchor is not None
                and unverified == 0
                and following is not None
                and following.prev == anchor.stored_hash
                and following.seq == anchor.seq + 1
            ):
                problems.append(
                    f"{line.where}: inserted: this line's hash does not verify and the "
                    f"next line continues the chain from {anchor.where}"
                )
                continue
            what = "not in canonical form" if line.noncanonical else "hash does not match"
            problems.append(f"{line.where}: edited: {what} the record's contents")
            lenient_prevs.update(h for h in (line.stored_hash, line.computed_hash) if h)
            unverified += 1
            continue
        if first_seq is None:
            first_seq = line.seq
        if anchor is None:
            if unverified == 0 and line.seq == 0 and line.prev != GENESIS_HASH:
                problems.append(f"{line.where}: chain start: seq 0 but prev is not genesis")
            elif unverified == 0 and line.seq != 0 and line.prev == GENESIS_HASH:
                problems.append(f"{line.where}: chain start: genesis prev but seq {line.seq}")
            anchor, lenient_prevs, unverified = line, set(), 0
            continue
        linked = line.prev == anchor.stored_hash or line.prev in lenient_prevs
        expected = anchor.seq + 1
        if unverified == 0 and linked and line.seq == expected:
            anchor, lenient_prevs = line, set()
            continue
        if unverified > 0 and (
            (linked and expected <= line.seq <= expected + unverified)
            or (not linked and expected < line.seq <= expected + unverified)
        ):
            # The unverifiable lines stood in for records (or were junk); reported above.
            anchor, lenient_prevs, unverified = line, set(), 0
            continue
        new_anchor = _report_break(line, lines, anchor, lenient_prevs, problems)
        if new_anchor is not None:
            anchor, lenient_prevs, unverified = new_anchor, set(), 0
    if anchor is None:
        return first_seq, None, None
    return first_seq, anchor.seq, anchor.stored_hash


def _report_break(
    line: _Line,
    lines: _Lookahead,
    anchor: _Line,
    lenient_prevs: set[str],
    problems: list[str],
) -> _Line | None:
    """Describe why ``line``, a verified record, does not follow ``anchor``.

    Returns the new anchor, or None to keep the old one (``line`` was an intruder).
    Takes the next line from ``lines`` too if the two were swapped.
    """
    following = lines.next_record()
    anchor_hashes = {anchor.stored_hash} | lenient_prevs
    expected = anchor.seq + 1
    crosses = line.file_index != anchor.file_index
    if following is not None and following.prev in anchor_hashes and following.seq == expected:
        if line.prev == following.stored_hash and line.seq == expected + 1:
            lines.take()
            problems.append(
                f"{line.where}: reordered: lines {line.number} and {following.number} are "
                f"swapped (seq {line.seq} comes before seq {following.seq})"
            )
            return line
        problems.append(
            f"{line.where}: inserted: this record (seq {line.seq}) is not part of the "
            f"chain; the next line continues from {anchor.where}"
        )
        return None
    if line.seq > expected:
        missing = line.seq - expected
        span = f"seq {expected}" if missing == 1 else f"seq {expected}..{line.seq - 1}"
        if crosses:
            problems.append(
                f"{line.where}: chain break between files: {anchor.path} ends at seq "
                f"{anchor.seq} and this file continues at seq {line.seq}; {missing} "
                f"record(s) missing ({span}): a file removed from the set, or records deleted"
            )
        else:
            problems.append(
                f"{line.where}: deleted: {missing} record(s) missing before this line ({span})"
            )
        return line
    if line.seq < expected:
        between = "between files: " if crosses else ""
        problems.append(
            f"{line.where}: {between}out of order: seq {line.seq} after seq {anchor.seq} "
            f"at {anchor.where} (lines or files duplicated, moved or given out of order)"
        )
        return line
    if crosses:
        problems.append(
            f"{line.where}: chain break between files: prev does not match the last "
            f"record of {anchor.path} ({anchor.where})"
        )
    else:
        problems.append(
            f"{line.where}: chain break: prev does not match the hash of {anchor.where} "
            "(that record was rewritten and re-hashed, or this one forged)"
        )
    return line


# --------------------------------------------------------------------------- CLI helpers


def load_chain_key(path: Path) -> bytes:
    """Read an HMAC chain key: hex text (e.g. ``openssl rand -hex 32``), whitespace ignored."""
    text = Path(path).read_text(encoding="ascii", errors="replace")
    compact = "".join(text.split())
    try:
        key = bytes.fromhex(compact)
    except ValueError:
        raise ValueError(f"chain key file {path} must hold the key as hex text") from None
    if len(key) < _MIN_CHAIN_KEY_BYTES:
        raise ValueError(f"chain key in {path} is shorter than {_MIN_CHAIN_KEY_BYTES} bytes")
    return key


def worker_log_path(path: Path, worker: int) -> Path:
    """The live file of worker ``worker``'s own chain, beside the configured ``path``.

    ``audit.jsonl`` -> ``audit.worker0.jsonl``, ``audit.worker1.jsonl``, ...: each
    worker process appends to a chain of its own, so workers never wait for one
    another's lock or re-read one another's records (docs/audit.md, "Files"). The
    name always ends in ``.worker<N>.jsonl`` (``audit.log`` -> ``audit.log.worker0.jsonl``)
    so that every chain's rotated files, ``<live stem>.<timestamp>.<seq>.jsonl``,
    have names of their own.
    """
    name = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    return path.with_name(f"{name}.worker{worker}.jsonl")


def chain_of(path: Path) -> str:
    """The chain an audit file belongs to: its live file's stem.

    ``audit.worker0.jsonl`` and its rotated ``audit.worker0.<timestamp>.<seq>.jsonl``
    (in any directory: rotated files may be archived elsewhere) belong to chain
    ``audit.worker0``; any other file is a chain of its own name.
    """
    match = re.fullmatch(r"(.+)" + _ROTATED_NAME, path.name)
    return match.group(1) if match is not None else path.stem


def audit_chains(paths: Sequence[Path]) -> list[list[Path]]:
    """Group files into chains, each in chain order; a directory stands for its *.jsonl.

    Files are grouped by chain name whatever directory they are in, so a rotated file
    missing between an archive directory and the live file is still a break. A file
    given twice (e.g. a directory and a file in it) counts once. Chains come in the
    order their first file was given (a directory's files sorted by name).
    """
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(
                sorted(
                    child
                    for child in path.iterdir()
                    if child.suffix == ".jsonl" and child.is_file()
                )
            )
        else:
            files.append(path)
    seen: set[Path] = set()
    chains: dict[str, list[Path]] = {}
    for path in files:
        resolved = path.resolve()
        if resolved in seen:
            continue
        seen.add(resolved)
        chains.setdefault(chain_of(path), []).append(path)
    return [_chain_order(chain) for chain in chains.values()]


def main_verify(paths: Sequence[Path], chain_key_file: Path | None) -> int:
    """``xks-proxy audit verify FILE|DIR...``: print a report; return 0 if OK, else 1.

    Files are grouped into chains (one per worker: ``audit.worker0.jsonl`` with its
    rotated files, ...) and each chain is verified on its own. Within a chain, rotated
    files (``<stem>.<timestamp>.<seq>.jsonl``) are put in order by their seq, whatever
    order the shell globbed them in; other files follow as given.
    """
    chains = audit_chains([Path(path) for path in paths])
    if not chains:
        print("audit verify: no audit files (*.jsonl) in the paths given", file=sys.stderr)
        return 1
    chain_key: bytes | None = None
    if chain_key_file is not None:
        try:
            chain_key = load_chain_key(chain_key_file)
        except (OSError, ValueError) as error:
            print(f"audit verify: {error}", file=sys.stderr)
            return 1
    failed = 0
    for files in chains:
        name = f"{chain_of(files[-1])}: " if len(chains) > 1 else ""
        if not _print_report(name, verify_files(files, chain_key=chain_key)):
            failed += 1
    if len(chains) > 1:
        verdict = f"FAILED: {failed} of {len(chains)}" if failed else f"OK: all {len(chains)}"
        print(f"{verdict} chains")
    return 1 if failed else 0


def _print_report(name: str, report: VerifyReport) -> bool:
    scope = f"{report.records} records across {len(report.files)} files"
    if report.last_seq is not None:
        scope += f" (seq {report.first_seq}..{report.last_seq}, last hash {report.last_hash})"
    if report.ok:
        print(f"{name}OK: {scope}")
        if report.first_seq:
            print(
                f"{name}note: the chain starts at seq {report.first_seq}, not 0 "
                "(older files removed?)"
            )
        return True
    print(f"{name}FAILED: {len(report.problems)} problem(s) in {scope}")
    for problem in report.problems:
        print(f"  {problem}")
    return False
