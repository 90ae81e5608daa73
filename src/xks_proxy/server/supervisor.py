"""The supervisor process: binds the port, spawns and watches workers, relays signals.

- Workers are started with the ``spawn`` method (fork+exec), so no worker inherits an
  initialised PKCS#11 library; each opens its own sessions.
- SIGHUP (or ``xks-proxy reload``): validate the config file here first; if it is
  bad, log why, record the failure and change nothing; if it is good, send it to
  every worker over its pipe, to apply in place, and record what each answered.
  Workers never read the file, so a restarted worker gets the last good config.
- SIGTERM/SIGINT: first a drain of ``drain_seconds`` (if set): ``/ready`` answers 503
  so the load balancer takes this instance out, and workers answer every request with
  ``Connection: close`` so keep-alive clients reconnect (elsewhere) between requests
  instead of having an idle connection closed under a request they are sending. Then
  workers stop accepting, finish in-flight requests, close idle keep-alive connections
  and exit within ``graceful_shutdown_seconds``. A second SIGTERM/SIGINT cuts the
  drain short.
- A worker that dies is replaced (with back-off); one that cannot start at all stops
  the proxy rather than crash-looping.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import time
from dataclasses import asdict
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from xks_proxy.config import ProxyConfig, load_config
from xks_proxy.credentials import track_credential_ages
from xks_proxy.keymanager.base import KeyManager
from xks_proxy.observability.metrics import prepare_multiprocess_dir
from xks_proxy.server import reload as reload_files
from xks_proxy.server.health_listener import HealthListener
from xks_proxy.server.runner import respawn_config
from xks_proxy.server.worker import DRAIN, run_worker, tls_settings

logger = logging.getLogger("xks_proxy.supervisor")

WORKER_START_FAILURE = 3
MAX_QUICK_FAILURES = 5
QUICK_FAILURE_SECONDS = 10.0
ACK_TIMEOUT_SECONDS = 10.0
CERTIFICATE_CHECK_SECONDS = 6 * 3600.0
CERTIFICATE_WARNING_DAYS = 30.0


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the API port once, here, so a port conflict stops the start clearly."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Supervisor:
    def __init__(self, config: ProxyConfig, key_manager: KeyManager) -> None:
        if config.source is None:
            raise ValueError("the supervisor needs a config file to hand to its workers")
        self.config = config
        self.started_config = config  # restart-only settings stay as started (respawns)
        self.config_path: Path = config.source.resolve()
        self.key_manager = key_manager
        self.context = multiprocessing.get_context("spawn")
        self.workers: dict[int, BaseProcess] = {}
        self.controls: dict[int, Connection] = {}
        self.started_at: dict[int, float] = {}
        self.quick_failures = 0
        self.stopping = False
        self.stop_signals = 0
        self.reload_requested = False
        self.state_dir = config.server.state_dir
        self.generation = reload_files.read_generation(self.state_dir / reload_files.STATUS_FILE)
        self.socket: socket.socket | None = None
        self.health: HealthListener | None = None

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.socket = bind_socket(self.config.server.host, self.config.server.port)
        pid_file = self.state_dir / reload_files.PID_FILE
        pid_file.write_text(f"{os.getpid()}\n", encoding="ascii")
        track_credential_ages(self.state_dir, self.config)
        if self.config.server.health_port is not None:
            prepare_multiprocess_dir(self.state_dir)  # before any worker is spawned
            self.health = HealthListener(self.config, self.key_manager)
            self.health.start()
        previous = {
            sig: signal.signal(sig, self._on_signal)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        }
        try:
            for index in range(self.config.server.workers):
                self._spawn(index)
            return self._watch()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._stop_workers()
            if self.health is not None:
                self.health.stop()
            self.socket.close()
            pid_file.unlink(missing_ok=True)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self.reload_requested = True
        else:
            self.stopping = True
            self.stop_signals += 1

    def _spawn(self, index: int) -> None:
        assert self.socket is not None
        old_control = self.controls.pop(index, None)
        if old_control is not None:
            old_control.close()
        control, worker_end = self.context.Pipe()
        process = self.context.Process(
            target=run_worker,
            kwargs={
                # The last good one, never re-read from the file; settings that need a
                # restart of the whole proxy keep their start-up values.
                "config": respawn_config(self.started_config, self.config),
                "index": index,
                "control": worker_end,
                "sockets": [self.socket],
            },
            name=f"xks-proxy-worker-{index}",
            daemon=False,
        )
        # Blocked signals survive fork+exec: workers keep SIGHUP blocked for good (its
        # default action is to kill); reloads reach them over their pipe instead.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        worker_end.close()
        self.controls[index] = control
        self.workers[index] = process
        self.started_at[index] = time.monotonic()
        logger.info("started worker %d (pid %s)", index, process.pid)

    def _watch(self) -> int:
        next_certificate_check = time.monotonic() + CERTIFICATE_CHECK_SECONDS
        while not self.stopping:
            if time.monotonic() >= next_certificate_check:
                next_certificate_check = time.monotonic() + CERTIFICATE_CHECK_SECONDS
                self._check_certificate()
            if self.reload_requested:
                self.reload_requested = False
                self.reload()
            for index, process in list(self.workers.items()):
                if process.is_alive():
                    continue
                code = process.exitcode
                if self.health is not None and process.pid is not None:
                    from prometheus_client import multiprocess

                    multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
                lived = time.monotonic() - self.started_at[index]
                logger.error("worker %d (pid %s) exited with %s", index, process.pid, code)
                if code == WORKER_START_FAILURE or lived < QUICK_FAILURE_SECONDS:
                    self.quick_failures += 1
                    if self.quick_failures >= MAX_QUICK_FAILURES:
                        logger.error("workers keep failing at start-up; stopping")
                        return 1
                    time.sleep(min(2.0**self.quick_failures, 30.0))
                else:
                    self.quick_failures = 0
                if not self.stopping:
                    self._spawn(index)
            time.sleep(0.1)
        self._drain()
        logger.info("shutting down")
        return 0

    def _drain(self) -> None:
        """Before stopping: leave the load balancer's rotation, move keep-alive clients on."""
        seconds = self.config.server.drain_seconds
        if seconds <= 0:
            return
        logger.info("draining for %d s: /ready answers 503, responses close connections", seconds)
        if self.health is not None:
            self.health.draining = True
        for index, control in self.controls.items():
            if self.workers[index].is_alive():
                try:
                    control.send(DRAIN)
                except OSError:
                    pass  # it is exiting anyway
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.stop_signals < 2:
            time.sleep(0.1)

    def _check_certificate(self) -> None:
        """Warn every few hours from 30 days before the server certificate expires."""
        if self.config.tls is None:
            return
        from xks_proxy.server.tls import certificate_days_to_expiry

        try:
            days = certificate_days_to_expiry(self.config.tls.cert_file)
        except Exception as exc:
            logger.warning("cannot read the server certificate's expiry: %s", exc)
            return
        if days <= 0:
            logger.error("the server certificate %s has EXPIRED", self.config.tls.cert_file)
        elif days <= CERTIFICATE_WARNING_DAYS:
            logger.warning(
                "the server certificate %s expires in %.1f days: renew it and run "
                "'xks-proxy reload'",
                self.config.tls.cert_file,
                days,
            )

    def _stop_workers(self) -> None:
        for process in self.workers.values():
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        # Each worker closes its copy of the listening socket as it starts shutting down;
        # close ours too, so that the port refuses new connections (a load balancer
        # retries them on another target) instead of queueing them in a backlog nobody
        # accepts from any more, to be reset when this process exits.
        if self.socket is not None:
            self.socket.close()
        deadline = time.monotonic() + self.config.server.graceful_shutdown_seconds + 5
        for process in self.workers.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                logger.error("worker pid %s did not stop in time; killing it", process.pid)
                process.kill()
                process.join(5)

    # ------------------------------------------------------------------ reload

    def reload(self) -> None:
        """Validate the config file, then have every worker apply it."""
        self.generation += 1
        generation = self.generation
        status_path = self.state_dir / reload_files.STATUS_FILE
        try:
            new_config = load_config(self.config_path)
            if new_config.tls is not None:
                from xks_proxy.server.tls import build_server_context

                build_server_context(tls_settings(new_config.tls))  # prove the files load
        except Exception as exc:
            logger.error(
                "reload %d refused, keeping the running configuration: %s", generation, exc
            )
            reload_files.write_result(
                status_path, reload_files.ReloadResult(generation, False, str(exc))
            )
            return
        answers: dict[str, dict[str, object]] = {}
        for index, control in self.controls.items():
            if not self.workers[index].is_alive():
                continue  # it will be restarted with the new configuration
            try:
                control.send((generation, new_config))
                if control.poll(ACK_TIMEOUT_SECONDS):
                    answers[str(index)] = asdict(control.recv())
                else:
                    answers[str(index)] = {"ok": False, "error": "no answer in time"}
            except (OSError, EOFError) as exc:
                answers[str(index)] = {"ok": False, "error": f"worker unreachable: {exc}"}
        failed = {k: v for k, v in answers.items() if not v.get("ok")}
        # Workers restarted from now on get the new configuration, whatever happened.
        self.config = new_config
        track_credential_ages(self.state_dir, new_config)
        if self.health is not None:
            self.health.config = new_config
        error = None
        if failed:
            error = "; ".join(f"worker {k}: {v.get('error')}" for k, v in failed.items())
            logger.error("reload %d failed on some workers: %s", generation, error)
        else:
            logger.info("reload %d applied by %d worker(s)", generation, len(answers))
        reload_files.write_result(
            status_path,
            reload_files.ReloadResult(generation, not failed, error, workers=answers),
        )
