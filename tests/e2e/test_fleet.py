"""A fleet of three proxies behind a TCP load balancer, under continuous signed load.

HAProxy in ``mode tcp`` stands in for an NLB with TLS passthrough: round robin over
three ``xks-proxy serve`` instances (one worker each, one SoftHSMv2 token shared by
all, ``fleet_size = 3``), each checked with ``GET /ready`` on its health port. Eight
client threads keep signed Encrypt calls going through it, each on its own keep-alive
connection, reconnecting like an HTTP client (and KMS) does. Then:

a. one instance gets SIGTERM (graceful shutdown), and is started again (a rolling
   restart);
b. another instance's whole process group gets SIGKILL (a crash).

How a request ends, as the client sees it:

- ``ok``: a 200 answer.
- ``status``: any other answer (a failure).
- ``stale``: before sending on a reused connection the client found it already closed
  by the far end (the FIN had arrived); it reconnects. Nothing was sent: not a request.
- ``unsent``: the connection broke while the request was being written. Resent on a
  new connection; not a failure (nothing can have been processed).
- ``no_response``: the request was fully written, then the connection closed without
  a single byte of answer. The client cannot know whether the proxy processed it; every
  request carries a unique kmsRequestId and the proxies log each request they answer,
  so the test decides afterwards from the logs:
    * not in any proxy's log: **closed before the request was accepted** — it never
      reached the application (uvicorn closed an idle keep-alive connection whose
      request bytes had not been read yet, or the connection sat in a listen backlog
      nobody accepted from any more). A client retries that on a fresh connection, as
      HTTP clients do when a reused connection yields nothing; the test does too, once
      and at once (KMS gives a whole call 250 ms: there is no time for back-off), and
      reports how many requests were still lost after that retry. Recorded separately,
      not a failure.
    * in a log: processed, answer lost — a failure.
  After SIGKILL the logs cannot tell (the process died before logging), so in phase b
  every ``no_response`` is counted as a failure: those are the requests in flight on the
  killed instance, which is exactly what a crash is allowed to lose.
- ``truncated``: part of an answer arrived, then the connection died (a failure).
- ``timeout``: no answer within CLIENT_TIMEOUT (a failure).
- ``connect_failed``: the load balancer itself refused the connection (a failure).
- ``unwritable``: MAX_WRITE_ATTEMPTS fresh connections in a row broke while the request
  was written (a failure).

The report (totals, failures per phase, times to recover) is written to
``fleet-report.json`` / ``.txt`` in the test's tmp directory, printed (``-s`` or
``-rP`` shows it), and recorded with ``record_property`` (junit XML).
"""

from __future__ import annotations

import dataclasses
import http.client
import itertools
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from e2e.conftest import CREDENTIAL, PREFIX, write_config
from e2e.proxy import free_port, sign

pytestmark = [pytest.mark.e2e, pytest.mark.hsm]

FLEET_SIZE = 3
CLIENTS = 8
CLIENT_TIMEOUT = 5.0
CHECK_INTER_MS = 100  # HAProxy health check interval; fall = rise = 2
GRACEFUL_SHUTDOWN_SECONDS = 5
DRAIN_SECONDS = 1  # server.drain_seconds, when this version of the proxy has it
ENCRYPT_PATH = f"/{PREFIX}/kms/xks/v1/keys/foo/encrypt"
PLAINTEXT = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
FAILURE_KINDS = ("status", "truncated", "timeout", "connect_failed", "unwritable")
MAX_WRITE_ATTEMPTS = 5
HAPROXY_LOG_RE = re.compile(
    r"^XKSFLEET (?P<port>\d+) (?P<backend>\S+)/(?P<server>\S+) (?P<state>\S+) (?P<bytes>\d+)"
)


# --------------------------------------------------------------------------- instances


@dataclass
class Instance:
    """One `xks-proxy serve` process group (supervisor + its worker)."""

    name: str
    directory: Path
    config: Path
    port: int
    health_port: int
    process: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)
    terminated: bool = False  # SIGTERM already sent to the current process

    def start(self) -> None:
        self.terminated = False
        log_path = self.directory / f"proxy-{len(self.logs)}.log"
        self.logs.append(log_path)
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "xks_proxy", "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,  # its own process group: SIGKILL takes the workers too
            )

    def wait_serving(self, timeout: float = 30.0) -> None:
        """Until /ready answers 200 and a worker answers HTTP on the API port."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_text()}")
            if http_status(self.health_port, "/ready") == 200 and http_status(self.port, "/"):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start in time:\n{self.log_text()}")

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def request_ids(self) -> set[str]:
        """kmsRequestId of every request this instance answered (all its runs)."""
        found: set[str] = set()
        for line in self.log_text().splitlines():
            if '"kmsRequestId"' not in line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("kmsRequestId"), str):
                found.add(record["kmsRequestId"])
        return found

    def signal_group(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signum)

    def begin_stop(self) -> None:
        if self.process is not None and self.process.poll() is None and not self.terminated:
            self.process.send_signal(signal.SIGTERM)
            self.terminated = True

    def stop(self) -> None:
        """SIGTERM (unless begin_stop did), wait, then SIGKILL whatever is left of the group."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.begin_stop()
            try:
                self.process.wait(timeout=GRACEFUL_SHUTDOWN_SECONDS + 10)
            except subprocess.TimeoutExpired:
                pass
        try:  # leftovers of the group (a worker orphaned by SIGKILL of its supervisor)
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.process.poll() is None:
            self.process.wait(timeout=10)


def http_status(port: int, path: str) -> int | None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=0.5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


def drain_supported() -> bool:
    """Whether the proxy has a drain phase on SIGTERM (server.drain_seconds)."""
    from xks_proxy.config import ServerConfig

    return "drain_seconds" in {f.name for f in dataclasses.fields(ServerConfig)}


def make_instance(directory: Path, token: Any, index: int) -> Instance:
    directory.mkdir(parents=True, exist_ok=True)
    port, health_port = free_port(), free_port()
    config = write_config(directory, token, port)
    text = config.read_text()
    assert f"fleet_size = {FLEET_SIZE}" in text
    text = text.replace(
        "[server]\n",
        "[server]\nworkers = 1\n"
        f"health_port = {health_port}\n"
        f"graceful_shutdown_seconds = {GRACEFUL_SHUTDOWN_SECONDS}\n"
        + (f"drain_seconds = {DRAIN_SECONDS}\n" if drain_supported() else ""),
    )
    # This test is about stopping and crashing, not latency: a loaded CI machine must
    # not turn a slow HSM call into a 503 DependencyTimeoutException (default 150 ms).
    text = text.replace("[limits]\n", "[limits]\nrequest_timeout_ms = 2000\n")
    assert "request_timeout_ms = 2000" in text
    config.write_text(text)
    return Instance(f"p{index}", directory, config, port, health_port)


# --------------------------------------------------------------------------- HAProxy


@dataclass
class Balancer:
    process: subprocess.Popen[bytes]
    port: int
    stats_socket: Path
    log_path: Path

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(str(self.stats_socket))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_states(self) -> dict[str, str]:
        """Server name -> HAProxy status ("UP", "DOWN", "UP 1/2" = failing, ...)."""
        lines = self.command("show stat").splitlines()
        if not lines or not lines[0].startswith("# "):
            return {}
        header = lines[0][2:].split(",")
        states = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == "xks" and row.get("svname") not in ("BACKEND", "FRONTEND"):
                states[row["svname"]] = row["status"]
        return states

    def wait_for(self, predicate: Callable[[dict[str, str]], bool], timeout: float) -> float:
        """Poll until the server states satisfy predicate; the monotonic time it did."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.server_states()):
                return time.monotonic()
            time.sleep(0.02)
        raise AssertionError(f"HAProxy states: {self.server_states()}")

    def connections(self) -> dict[int, tuple[str, str, int]]:
        """Client port -> (server, termination state, bytes to client), from the log."""
        found = {}
        for line in self.log_path.read_text(errors="replace").splitlines():
            match = HAPROXY_LOG_RE.search(line)
            if match:
                found[int(match["port"])] = (
                    match["server"],
                    match["state"],
                    int(match["bytes"]),
                )
        return found


def haproxy_config(port: int, stats_socket: Path, instances: list[Instance]) -> str:
    servers = "\n".join(
        f"    server {i.name} 127.0.0.1:{i.port} check port {i.health_port}" for i in instances
    )
    return f"""
global
    maxconn 2000
    stats socket {stats_socket} mode 600 level admin
    log stderr format raw local0 info

defaults
    mode tcp
    log global
    log-format "XKSFLEET %cp %b/%s %ts %B %Tt"
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout check 1s
    # A refused connect is retried, on another server (like an NLB never picking a
    # target that failed its checks); the client never notices.
    retries 3
    option redispatch 1

frontend xks_front
    bind 127.0.0.1:{port}
    default_backend xks

backend xks
    balance roundrobin
    option httpchk GET /ready
    http-check expect status 200
    default-server inter {CHECK_INTER_MS}ms fastinter {CHECK_INTER_MS}ms \
downinter {CHECK_INTER_MS}ms fall 2 rise 2
{servers}
"""


def start_balancer(directory: Path, instances: list[Instance]) -> Balancer:
    port = free_port()
    # A unix socket path must stay under 108 bytes; pytest's tmp paths can be long.
    socket_dir = Path(tempfile.mkdtemp(prefix="xks-fleet-"))
    stats_socket = socket_dir / "haproxy.sock"
    config = directory / "haproxy.cfg"
    config.write_text(haproxy_config(port, stats_socket, instances))
    log_path = directory / "haproxy.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["haproxy", "-f", str(config), "-db"], stdout=log, stderr=subprocess.STDOUT
        )
    balancer = Balancer(process, port, stats_socket, log_path)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"haproxy exited:\n{log_path.read_text(errors='replace')}")
        try:
            if balancer.server_states():
                return balancer
        except OSError:
            pass
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"haproxy did not start:\n{log_path.read_text(errors='replace')}")


# --------------------------------------------------------------------------- load


@dataclass
class Outcome:
    started: float
    ended: float
    kind: str  # ok, no_response, or one of FAILURE_KINDS
    request_id: str
    client_port: int
    detail: str = ""
    retry_of: str | None = None


@dataclass
class Load:
    """CLIENTS threads of signed Encrypt calls through the load balancer."""

    port: int
    outcomes: list[Outcome] = field(default_factory=list)
    stale: list[float] = field(default_factory=list)  # reused connection found closed
    unsent: list[float] = field(default_factory=list)  # broke while writing; resent
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for index in range(CLIENTS):
            thread = threading.Thread(target=self._client, args=(index,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(CLIENT_TIMEOUT + 5)

    def ok_count(self) -> int:
        with self.lock:
            return sum(1 for o in self.outcomes if o.kind == "ok")

    def _record(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)

    def _client(self, index: int) -> None:
        connection: http.client.HTTPConnection | None = None
        for sequence in itertools.count():
            if self.stop.is_set():
                break
            request_id = f"fleet-{index}-{sequence}"
            connection, outcome = self._attempt(connection, request_id, None)
            if outcome.kind == "no_response":
                # Nothing came back on a connection we had written to: resend once on a
                # fresh connection, as an HTTP client (and KMS) does.
                connection, _ = self._attempt(connection, request_id + "-retry", request_id)
        if connection is not None:
            connection.close()

    def _attempt(
        self,
        connection: http.client.HTTPConnection | None,
        request_id: str,
        retry_of: str | None,
    ) -> tuple[http.client.HTTPConnection | None, Outcome]:
        body = json.dumps(
            {
                "requestMetadata": {
                    "awsPrincipalArn": "arn:aws:iam::123456789012:user/Alice",
                    "kmsKeyArn": "arn:aws:kms:us-east-1:123456789012:key/fleet",
                    "kmsOperation": "Encrypt",
                    "kmsRequestId": request_id,
                },
                "plaintext": PLAINTEXT,
                "encryptionAlgorithm": "AES_GCM",
            }
        ).encode()
        headers = sign(
            "POST",
            f"http://127.0.0.1:{self.port}{ENCRYPT_PATH}",
            body,
            CREDENTIAL,
            {"Content-Type": "application/json"},
        )
        for _ in range(MAX_WRITE_ATTEMPTS):
            if connection is not None and connection_dropped(connection):
                self.stale.append(time.monotonic())
                connection.close()
                connection = None
            started = time.monotonic()
            if connection is None:
                connection = http.client.HTTPConnection(
                    "127.0.0.1", self.port, timeout=CLIENT_TIMEOUT
                )
                try:
                    connection.connect()
                except OSError as exc:
                    connection.close()
                    outcome = Outcome(
                        started,
                        time.monotonic(),
                        "connect_failed",
                        request_id,
                        0,
                        repr(exc),
                        retry_of,
                    )
                    self._record(outcome)
                    time.sleep(0.05)
                    return None, outcome
            assert connection.sock is not None
            client_port: int = connection.sock.getsockname()[1]
            try:
                connection.request("POST", ENCRYPT_PATH, body=body, headers=headers)
            except OSError:
                self.unsent.append(time.monotonic())  # nothing reached a proxy: resend
                connection.close()
                connection = None
                continue
            break
        else:
            outcome = Outcome(
                started, time.monotonic(), "unwritable", request_id, 0, retry_of=retry_of
            )
            self._record(outcome)
            return None, outcome
        assert connection is not None
        kind, detail = "ok", ""
        try:
            response = connection.getresponse()
        except TimeoutError as exc:
            kind, detail = "timeout", repr(exc)
        except (OSError, http.client.HTTPException) as exc:
            # RemoteDisconnected / ConnectionResetError: no byte of an answer.
            kind, detail = "no_response", repr(exc)
        else:
            try:
                data = response.read()
            except TimeoutError as exc:
                kind, detail = "timeout", repr(exc)
            except (OSError, http.client.HTTPException) as exc:
                kind, detail = "truncated", repr(exc)
            else:
                if response.status != 200:
                    kind, detail = "status", f"{response.status} {data[:200]!r}"
                elif response.will_close:
                    connection.close()
                    connection = None
        if kind != "ok" and connection is not None:
            connection.close()
            connection = None
        outcome = Outcome(
            started, time.monotonic(), kind, request_id, client_port, detail, retry_of
        )
        self._record(outcome)
        return connection, outcome


def connection_dropped(connection: http.client.HTTPConnection) -> bool:
    """The reused-connection check of urllib3 and others: readable while idle = closed."""
    sock = connection.sock
    if sock is None:
        return True
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


# --------------------------------------------------------------------------- report


@dataclass
class Phase:
    name: str
    started: float
    ended: float = 0.0
    marks: dict[str, float] = field(default_factory=dict)  # seconds after started


def classify(
    outcomes: list[Outcome],
    phases: list[Phase],
    answered: set[str],
    routes: dict[int, tuple[str, str, int]],
    killed_phase: str,
) -> dict[str, dict[str, Any]]:
    """Per phase: counts by kind, failures and where the failed requests went."""
    report: dict[str, dict[str, Any]] = {}
    for phase in phases:
        # By when a request ended: one cut short by a signal belongs to that signal's phase.
        mine = [o for o in outcomes if phase.started <= o.ended < phase.ended]
        kinds = Counter(o.kind for o in mine)
        failed: list[Outcome] = []
        before_accept: list[Outcome] = []
        processed_lost: list[Outcome] = []
        for o in mine:
            if o.kind in FAILURE_KINDS:
                failed.append(o)
            elif o.kind == "no_response":
                if o.request_id in answered:
                    processed_lost.append(o)
                    failed.append(o)
                elif phase.name == killed_phase:
                    failed.append(o)  # in flight on the killed instance
                else:
                    before_accept.append(o)
        retries = {o.retry_of: o.kind for o in mine if o.retry_of is not None}  # last wins
        last_bad = max((o.ended for o in mine if o.kind != "ok"), default=None)

        def where(o: Outcome) -> str:
            server, state, _ = routes.get(o.client_port, ("?", "?", 0))
            return f"{o.request_id} {o.kind} via {server} (haproxy {state}): {o.detail}"

        report[phase.name] = {
            "seconds": round(phase.ended - phase.started, 2),
            "requests": len(mine),
            "ok": kinds["ok"],
            "kinds": dict(kinds),
            "failed": len(failed),
            "failed_detail": [where(o) for o in failed[:20]],
            "closed_before_accepted_detail": [where(o) for o in before_accept[:20]],
            "failed_kinds": dict(Counter(o.kind for o in failed)),
            "last_failure_after_s": max(
                (round(o.ended - phase.started, 3) for o in failed), default=None
            ),
            "failed_servers": dict(Counter(routes.get(o.client_port, ("?",))[0] for o in failed)),
            "closed_before_accepted": len(before_accept),
            "closed_before_accepted_servers": dict(
                Counter(routes.get(o.client_port, ("?",))[0] for o in before_accept)
            ),
            "processed_but_answer_lost": len(processed_lost),
            "retries": dict(Counter(retries.values())),
            "lost_after_retry": sum(1 for kind in retries.values() if kind != "ok"),
            "last_non_ok_after_s": None if last_bad is None else round(last_bad - phase.started, 3),
            "marks_s": {k: round(v, 3) for k, v in phase.marks.items()},
        }
    return report


def render(report: dict[str, Any]) -> str:
    lines = [
        f"fleet: {FLEET_SIZE} proxies x 1 worker behind HAProxy (mode tcp, roundrobin, "
        f"GET /ready every {CHECK_INTER_MS} ms, fall/rise 2), {CLIENTS} keep-alive clients, "
        f"drain on SIGTERM: {report['drain_seconds'] or 'none (proxy has no drain_seconds)'}",
        f"total requests {report['total_requests']} (ok {report['total_ok']}) in "
        f"{report['load_seconds']} s; stale keep-alive connections dropped before use: "
        f"{report['stale_connections']}; requests resent after a failed write: "
        f"{report['unsent_resent']}",
    ]
    for name, phase in report["phases"].items():
        lines.append(
            f"[{name}] {phase['requests']} requests in {phase['seconds']} s: "
            f"failed {phase['failed']} {phase['failed_servers'] or ''}, "
            f"closed before accepted {phase['closed_before_accepted']} "
            f"{phase['closed_before_accepted_servers'] or ''}, "
            f"processed but answer lost {phase['processed_but_answer_lost']}, "
            f"retried {sum(phase['retries'].values())} (still lost after the retry: "
            f"{phase['lost_after_retry']}), kinds {phase['kinds']}, "
            f"recovered (last non-ok answer) at +{phase['last_non_ok_after_s']} s, "
            f"marks {phase['marks_s']}"
        )
        lines.extend(f"    failed: {detail}" for detail in phase["failed_detail"])
        lines.extend(
            f"    closed before accepted: {detail}"
            for detail in phase["closed_before_accepted_detail"]
        )
    lines.append(f"haproxy termination states: {report['haproxy_termination_states']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- test


@pytest.fixture
def fleet(softhsm_token: Any, tmp_path: Path) -> Iterator[tuple[list[Instance], Balancer]]:
    if shutil.which("haproxy") is None:
        pytest.skip(
            "haproxy is not installed (the TCP load balancer of this test): "
            "apt-get install haproxy, or run scripts/bootstrap.sh"
        )
    instances = [
        make_instance(tmp_path / f"p{index}", softhsm_token, index) for index in range(FLEET_SIZE)
    ]
    balancer: Balancer | None = None
    try:
        # One after another: SoftHSMv2's file store has a race when several processes
        # log in to one token at the same moment (one of them may find no token at all:
        # SoftHSMv2 issue #757); started together, 3 of 15 trial fleets failed that way.
        for instance in instances:
            instance.start()
            instance.wait_serving()
        balancer = start_balancer(tmp_path, instances)
        yield instances, balancer
    finally:
        for instance in instances:
            instance.begin_stop()
        for instance in instances:
            instance.stop()
        if balancer is not None:
            balancer.process.terminate()
            try:
                balancer.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                balancer.process.kill()
                balancer.process.wait()
            shutil.rmtree(balancer.stats_socket.parent, ignore_errors=True)


def watch_stop(instance: Instance, balancer: Balancer, since: float) -> dict[str, float]:
    """Seconds after ``since`` when the process exited and when HAProxy marked it DOWN."""
    assert instance.process is not None
    marks: dict[str, float] = {}
    deadline = time.monotonic() + GRACEFUL_SHUTDOWN_SECONDS + 15
    while len(marks) < 2:
        assert time.monotonic() < deadline, f"{instance.name} did not stop: {marks}"
        if "process_exited" not in marks and instance.process.poll() is not None:
            marks["process_exited"] = time.monotonic() - since
        if "haproxy_marked_down" not in marks and balancer.server_states().get(
            instance.name, ""
        ).startswith("DOWN"):
            marks["haproxy_marked_down"] = time.monotonic() - since
        time.sleep(0.01)
    return marks


def all_up(states: dict[str, str]) -> bool:
    return len(states) == FLEET_SIZE and all(s == "UP" for s in states.values())


def test_fleet_survives_sigterm_and_sigkill(
    fleet: tuple[list[Instance], Balancer],
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    instances, balancer = fleet
    balancer.wait_for(all_up, timeout=10)
    load = Load(balancer.port)
    phases: list[Phase] = []
    load_started = time.monotonic()
    load.start()
    try:
        # Baseline: every instance serves.
        baseline = Phase("baseline", time.monotonic())
        phases.append(baseline)
        time.sleep(2.0)
        assert load.ok_count() > 100, "the load does not get through"

        # a. SIGTERM p0, let it exit, then start it again (a rolling restart).
        graceful = Phase("a_sigterm", time.monotonic())
        baseline.ended = graceful.started
        phases.append(graceful)
        victim = instances[0]
        assert victim.process is not None
        victim.begin_stop()
        graceful.marks.update(watch_stop(victim, balancer, graceful.started))
        assert victim.process.returncode == 0, victim.log_text()[-3000:]
        time.sleep(1.0)
        graceful.marks["restart_begun"] = time.monotonic() - graceful.started
        victim.start()
        up = balancer.wait_for(all_up, timeout=30)
        graceful.marks["haproxy_marked_up_again"] = up - graceful.started
        time.sleep(1.5)  # it takes its share of new connections again

        # b. SIGKILL p1's whole process group (supervisor and worker): a crash.
        crash = Phase("b_sigkill", time.monotonic())
        graceful.ended = crash.started
        phases.append(crash)
        instances[1].signal_group(signal.SIGKILL)
        down = balancer.wait_for(lambda s: s.get(instances[1].name, "").startswith("DOWN"), 15)
        crash.marks["haproxy_marked_down"] = down - crash.started
        time.sleep(2.0)
    finally:
        load.finish()
    crash.ended = time.monotonic()
    load_seconds = crash.ended - load_started

    # HAProxy logs each connection when it closes: stop it, then read its log.
    balancer.process.terminate()
    balancer.process.wait(timeout=10)
    answered = set().union(*(i.request_ids() for i in instances))
    routes = balancer.connections()
    phase_report = classify(load.outcomes, phases, answered, routes, killed_phase="b_sigkill")
    report: dict[str, Any] = {
        "drain_seconds": DRAIN_SECONDS if drain_supported() else None,
        "total_requests": len(load.outcomes),
        "total_ok": sum(1 for o in load.outcomes if o.kind == "ok"),
        "load_seconds": round(load_seconds, 2),
        "stale_connections": len(load.stale),
        "unsent_resent": len(load.unsent),
        "phases": phase_report,
        "haproxy_termination_states": dict(Counter(state for _, state, _ in routes.values())),
    }
    text = render(report)
    (tmp_path / "fleet-report.json").write_text(json.dumps(report, indent=2))
    (tmp_path / "fleet-report.txt").write_text(text + "\n")
    print("\n" + text)
    for key in ("drain_seconds", "total_requests", "total_ok", "load_seconds", "stale_connections"):
        record_property(key, report[key])
    for name, phase in phase_report.items():
        for key in (
            "requests",
            "failed",
            "closed_before_accepted",
            "lost_after_retry",
            "last_non_ok_after_s",
        ):
            record_property(f"{name}.{key}", phase[key])
        for mark, seconds in phase["marks_s"].items():
            record_property(f"{name}.{mark}", seconds)
    record_property("report_file", str(tmp_path / "fleet-report.txt"))

    base, a, b = (phase_report[n] for n in ("baseline", "a_sigterm", "b_sigkill"))
    assert base["failed"] == 0 and base["closed_before_accepted"] == 0, text
    # a. Graceful shutdown and restart: no request failed (no error answer, none
    # processed and its answer lost, no timeout). Connections closed before their
    # request was accepted are reported, not failed: without a drain the stopping
    # instance stays in rotation until it exits (its /ready answers 200 to the end) and
    # its port keeps queueing new connections nobody accepts, so even a retry can land
    # there (seen in about 1 run in 10).
    assert a["failed"] == 0, text
    assert a["requests"] > 200, text
    if drain_supported():
        # With a drain, the LB takes the instance out and clients leave it between two
        # requests: not even a connection closed before its request was accepted.
        assert a["closed_before_accepted"] == 0, text
        assert a["lost_after_retry"] == 0, text
    # b. A crash loses only what was in flight on the killed instance at that moment
    # (cut before or after the response headers), plus at most the one retry a client
    # made in the milliseconds before its death was complete: all on p1, all before
    # HAProxy took it out, never an error answer or a timeout from the survivors.
    assert b["failed"] <= 2 * CLIENTS, text
    assert set(b["failed_servers"]) <= {instances[1].name}, text
    assert set(b["failed_kinds"]) <= {"no_response", "truncated"}, text
    # (0.5 s of slack: the DOWN time is polled, a failure's end is when its thread ran.)
    assert b["last_failure_after_s"] is None or (
        b["last_failure_after_s"] <= b["marks_s"]["haproxy_marked_down"] + 0.5
    ), text
    assert b["ok"] > 100, text
