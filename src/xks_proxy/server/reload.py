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

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xks_proxy.statefiles import read_json, write_json_atomic

PID_FILE = "xks-proxy.pid"
STATUS_FILE = "reload-status.json"


@dataclass(frozen=True, slots=True)
class ReloadResult:
    generation: int
    ok: bool
    error: str | None = None
    pid: int = field(default_factory=os.getpid)
    workers: dict[str, Any] = field(default_factory=dict)


def write_result(path: Path, result: ReloadResult) -> None:
    write_json_atomic(path, asdict(result))


def read_generation(path: Path) -> int:
    document = read_json(path)
    value = document.get("generation") if document else None
    return value if isinstance(value, int) else 0
