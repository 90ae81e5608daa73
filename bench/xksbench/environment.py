"""What the bench runs against: its own SoftHSM token, proxy configs, server processes.

Everything lives in one temporary directory (removed at the end unless --keep):
the token store, the PIN and SigV4 secret files (mode 600), a throwaway CA and server
certificate for HTTPS, one config file per server, and each server's log.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.metadata
import os
import platform
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parents[1]  # .../bench
REPO_DIR = BENCH_DIR.parent
TOKEN_LABEL = "xks-bench"
URI_PREFIX = "bench"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _write_private(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


def _toml(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class BenchToken:
    """A SoftHSM token with DEMO_KEYS and the health-check key, plus SigV4 credentials."""

    directory: Path
    module_path: str
    conf_path: Path
    pin_file: Path
    access_key_id: str
    secret_access_key: str = field(repr=False)
    secret_file: Path = field(repr=False)
    key_labels: tuple[str, ...]

    @classmethod
    def provision(cls, directory: Path) -> BenchToken:
        from xks_proxy.credentials import new_credential
        from xks_proxy.keymanager.softhsm import (
            DEMO_KEYS,
            HEALTH_CHECK_KEY_LABEL,
            provision_softhsm_token,
        )

        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        pin = secrets.token_hex(16)
        pin_file = _write_private(directory / "hsm-pin", pin + "\n")
        token = provision_softhsm_token(
            directory / "softhsm",
            token_label=TOKEN_LABEL,
            pin=pin,
            so_pin=secrets.token_hex(16),
            keys=DEMO_KEYS,
            health_check_key_label=HEALTH_CHECK_KEY_LABEL,
        )
        credential = new_credential()
        secret_file = _write_private(
            directory / "sigv4-secret-access-key", credential.secret_access_key + "\n"
        )
        return cls(
            directory=directory,
            module_path=token.module_path,
            conf_path=token.conf_path,
            pin_file=pin_file,
            access_key_id=credential.access_key_id,
            secret_access_key=credential.secret_access_key,
            secret_file=secret_file,
            key_labels=tuple(key.label for key in DEMO_KEYS),
        )


@dataclass(frozen=True)
class Tls:
    cert_file: Path
    key_file: Path
    ca_file: Path


def make_tls(directory: Path) -> Tls:
    """A throwaway CA and server certificate for 127.0.0.1 (the proxy's demo PKI)."""
    from xks_proxy.server.tls import make_demo_pki

    pki = make_demo_pki(directory, server_names=("127.0.0.1", "localhost"))
    return Tls(pki.server_cert, pki.server_key, pki.ca_cert)


def write_proxy_config(
    path: Path,
    token: BenchToken,
    *,
    port: int,
    health_port: int | None,
    workers: int,
    tls: Tls | None,
    log_level: str,
    audit: str = "on",
) -> Path:
    """A production-like config: workers, health/metrics listener, per-request log lines."""
    from xks_proxy.keymanager.softhsm import HEALTH_CHECK_KEY_LABEL

    tls_section = (
        f"\n[tls]\ncert_file = {_toml(str(tls.cert_file))}\nkey_file = {_toml(str(tls.key_file))}\n"
        if tls is not None
        else ""
    )
    key_ids = ", ".join(_toml(label) for label in token.key_labels)
    audit_section = {
        "on": "",
        "off": "[audit]\nenabled = false  # bench/run --no-audit\n",
        "fsync": "[audit]\nfsync = true  # bench/run --audit-fsync\n",
    }[audit]
    text = f"""# Written by bench/run.
[server]
host = "127.0.0.1"
port = {port}
workers = {workers}
{f"health_port = {health_port}" if health_port else "# no health_port: no metrics"}
state_dir = {_toml(str(path.parent / (path.stem + "-state")))}
{"allow_plain_http = true" if tls is None else ""}

[hsm]
module = {_toml(token.module_path)}
token_label = {_toml(TOKEN_LABEL)}
pin_file = {_toml(str(token.pin_file))}
health_check_key = {_toml(HEALTH_CHECK_KEY_LABEL)}

[hsm.environment]
SOFTHSM2_CONF = {_toml(str(token.conf_path))}

[logging]
level = {_toml(log_level)}
{audit_section}{tls_section}
[[key_stores]]
name = "bench"
uri_prefix = {_toml(URI_PREFIX)}
external_key_ids = [{key_ids}]

[[key_stores.credentials]]
access_key_id = {_toml(token.access_key_id)}
secret_access_key_file = {_toml(str(token.secret_file))}
"""
    return _write_private(path, text)


# ------------------------------------------------------------------------ /proc


def children_of(pid: int) -> list[int]:
    """Direct child pids of ``pid`` (scans /proc; no psutil needed)."""
    result = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[1]) == pid:
            result.append(int(entry))
    return sorted(result)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def system_cpu() -> dict[str, float]:
    """Whole-machine CPU seconds so far (all cores) from /proc/stat: busy and steal."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return {
        "busy": (user + nice + system + irq + softirq) / CLOCK_TICKS,
        "steal": steal / CLOCK_TICKS,
        "at": time.monotonic(),
    }


def machine_share(
    before: dict[str, float], after: dict[str, float], ours: float
) -> dict[str, float]:
    """Cores busy on the whole machine during a span, and how many were not ours."""
    span = after["at"] - before["at"]
    if span <= 0:
        return {}
    busy = (after["busy"] - before["busy"]) / span
    return {
        "machine_busy_cores": round(busy, 2),
        "other_processes_cores": round(max(0.0, busy - ours / span), 2),
        "steal_cores": round((after["steal"] - before["steal"]) / span, 2),
    }


def connections_by_pid(pids: list[int], port: int) -> dict[int, int]:
    """Established TCP connections to local ``port`` held by each of ``pids``."""
    established: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                established.add(fields[9])  # inode
    counts = {}
    for pid in pids:
        count = 0
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:[") and link[8:-1] in established:
                        count += 1
        except OSError:
            pass
        counts[pid] = count
    return counts


def rss_kib(pid: int) -> int | None:
    """VmRSS from /proc/<pid>/status, in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# ------------------------------------------------------------------------ servers


class Server:
    """A server process started by the bench: its workers are its spawned children."""

    name = "server"

    def __init__(self, command: list[str], log_path: Path, port: int, env: dict[str, str]):
        self.command = command
        self.log_path = log_path
        self.port = port
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.expected_workers = 1

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, ssl_context: ssl.SSLContext | None = None, timeout: float = 60.0) -> None:
        # O_APPEND: the log can be truncated while the server writes (memory runs).
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=REPO_DIR,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            if self._answers(ssl_context) and len(self.worker_pids()) >= self.expected_workers:
                break
            time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError(f"{self.name} did not start in {timeout:g} s:\n{self.log_tail()}")
        self.wait_workers_ready(deadline)

    def wait_workers_ready(self, deadline: float) -> None:
        """Hook: wait until every worker can serve (the first answer proves only one)."""
        time.sleep(0.5)

    def _answers(self, ssl_context: ssl.SSLContext | None) -> bool:
        connection: http.client.HTTPConnection
        if ssl_context is not None:
            connection = http.client.HTTPSConnection(
                "127.0.0.1", self.port, timeout=1, context=ssl_context
            )
        else:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
        try:
            connection.request("GET", "/")
            connection.getresponse().read()
            return True
        except (OSError, http.client.HTTPException):
            return False
        finally:
            connection.close()

    def worker_pids(self) -> list[int]:
        """Children started by multiprocessing's spawn (not its resource tracker)."""
        if self.process is None:
            return []
        return [pid for pid in children_of(self.pid) if "spawn_main" in cmdline(pid)]

    def cpu_seconds(self) -> dict[int, float]:
        pids = [self.pid, *self.worker_pids()] if self.process else []
        return {pid: cpu_seconds(pid) for pid in pids}

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def truncate_log(self) -> None:
        with contextlib.suppress(OSError):
            os.truncate(self.log_path, 0)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                # The whole session: the server and the workers it spawned.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


def python_env() -> dict[str, str]:
    python_path = os.pathsep.join(p for p in (str(BENCH_DIR), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": python_path}


class ProxyServer(Server):
    name = "xks-proxy"
    READY = re.compile(r"worker \d+ ready")

    def __init__(
        self, config_path: Path, log_path: Path, port: int, workers: int, log_level: str
    ) -> None:
        super().__init__(
            [sys.executable, "-m", "xks_proxy", "serve", "--config", str(config_path)],
            log_path,
            port,
            python_env(),
        )
        self.config_path = config_path
        self.expected_workers = workers
        self.log_level = log_level

    def wait_workers_ready(self, deadline: float) -> None:
        # Every worker logs "worker N ready" (at info) once its HSM sessions are open.
        if self.log_level not in ("debug", "info"):
            time.sleep(3.0)  # no such lines: give the other workers time to open theirs
            return
        while time.monotonic() < deadline:
            if len(self.READY.findall(self.log_tail(400))) >= self.expected_workers:
                return
            time.sleep(0.1)
        print(f"  note: fewer than {self.expected_workers} 'worker ready' lines in the log")


class EchoServer(Server):
    name = "echo server"

    def __init__(self, log_path: Path, port: int, workers: int) -> None:
        super().__init__(
            [
                sys.executable,
                "-m",
                "xksbench.echo",
                "--port",
                str(port),
                "--workers",
                str(workers),
            ],
            log_path,
            port,
            python_env(),
        )
        self.expected_workers = workers if workers > 1 else 0

    def worker_pids(self) -> list[int]:
        if self.process is None:
            return []
        if self.expected_workers == 0:
            return [self.pid]  # uvicorn serves in the main process with one worker
        return super().worker_pids()

    def wait_workers_ready(self, deadline: float) -> None:
        time.sleep(1.0)  # uvicorn's workers start at the same time and in well under 1 s


class FloorServer(EchoServer):
    """Bare HTTP plus one real HSM call per request (xksbench.floor)."""

    name = "floor server"

    def __init__(
        self, log_path: Path, port: int, workers: int, token: BenchToken, hsm_calls: str
    ) -> None:
        super().__init__(log_path, port, workers)
        self.command = [
            sys.executable,
            "-m",
            "xksbench.floor",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--hsm-calls",
            hsm_calls,
            "--module",
            token.module_path,
            "--token-label",
            TOKEN_LABEL,
            "--pin-file",
            str(token.pin_file),
            "--conf",
            str(token.conf_path),
        ]
        self.name = f"floor server ({hsm_calls})"

    def wait_workers_ready(self, deadline: float) -> None:
        time.sleep(2.0)  # each worker opens its HSM session during lifespan start-up


# ------------------------------------------------------------------------ machine


def _first_line(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) // 1024} MiB"
    except OSError:
        pass
    return "unknown"


def _git() -> dict[str, Any]:
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read-only: never touch the index
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_DIR,
            capture_output=True,
            text=True,
            env=env,
            check=False,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "src", "pyproject.toml"],
            cwd=REPO_DIR,
            capture_output=True,
            text=True,
            env=env,
            check=False,
        ).stdout
    except OSError:
        return {}
    return {"commit": commit, "src_modified": [line[3:] for line in status.splitlines()]}


def machine_info() -> dict[str, Any]:
    versions = {}
    for package in ("xks-proxy", "uvicorn", "uvloop", "httptools", "python-pkcs11", "botocore"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "memory": _memory_total(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "openssl": ssl.OPENSSL_VERSION,
        "softhsm": _first_line(["softhsm2-util", "--version"]),
        "wrk": _first_line(["wrk", "-v"]),
        "packages": versions,
        "git": _git(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]
