"""Configuration reload bookkeeping shared by the supervisor and the CLI.

A reload is a numbered *generation*. The supervisor validates the new file and sends
the validated configuration to every worker over its pipe; each worker swaps its
state atomically and answers; the supervisor records the outcome in
``reload-status.json``, which ``xks-proxy reload`` waits for. Workers never read the
config file themselves, so a half-edited file cannot reach them (not even a worker
restarted after a crash: it gets the last good configuration). Files are written
atomically (write to a temporary name, then rename).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PID_FILE = "xks-proxy.pid"
STATUS_FILE = "reload-status.json"


@dataclass(frozen=True, slots=True)
class ReloadResult:
    generation: int
    ok: bool
    error: str | None = None
    pid: int = field(default_factory=os.getpid)
    workers: dict[str, Any] = field(default_factory=dict)


def write_json_atomic(path: Path, document: dict[str, Any]) -> None:
    """Replace path with document in one rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(document, handle)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def write_result(path: Path, result: ReloadResult) -> None:
    write_json_atomic(path, asdict(result))


def read_generation(path: Path) -> int:
    document = read_json(path)
    value = document.get("generation") if document else None
    return value if isinstance(value, int) else 0
