"""Load-balancer health listener: plain HTTP on its own port, served by the supervisor.

An NLB's target health check cannot present KMS's client certificate, so it gets a
port of its own (spec: Load balancer health checks):

- ``GET /ping``  200 while the process is up (liveness);
- ``GET /ready`` 200 when the last deep health check (an AES-GCM round trip on the
  health-check key, every ``health.interval_seconds``) succeeded, and less than
  ``READY_MAX_AGE_SECONDS`` ago; 503 as soon as one fails;
  503 ``draining`` from SIGTERM on, so the load balancer stops sending connections;
- ``GET /metrics`` Prometheus metrics of all workers (never served on the API port).

Bind it to an address the load balancer reaches, never to the public internet.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from xks_proxy.config import ProxyConfig
from xks_proxy.credentials import track_credential_ages
from xks_proxy.keymanager.base import KeyManager
from xks_proxy.observability.metrics import SupervisorMetrics, SupervisorSnapshot

logger = logging.getLogger("xks_proxy.health")

METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
READY_MAX_AGE_SECONDS = 60.0


class HealthListener:
    def __init__(self, config: ProxyConfig, key_manager: KeyManager) -> None:
        self.config = config
        self.key_manager = key_manager
        self.last_ok: float | None = None
        self.last_error: str | None = None
        self.draining = False  # set by the supervisor on SIGTERM; never cleared
        self.metrics = SupervisorMetrics(self.snapshot)
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []

    def ready(self) -> bool:
        """Ready = the last deep check passed, recently. A failed check is not-ready at once."""
        if self.draining or self.last_error is not None:
            return False
        return self.last_ok is not None and time.monotonic() - self.last_ok < READY_MAX_AGE_SECONDS

    def check_once(self) -> None:
        try:
            self.key_manager.health_check()
        except Exception as exc:
            if self.last_error is None:
                logger.error("deep health check failed: %s", exc)
            self.last_error = str(exc) or type(exc).__name__
        else:
            if self.last_error is not None:
                logger.info("deep health check recovered")
            self.last_error = None
            self.last_ok = time.monotonic()

    def _check_loop(self) -> None:
        while not self._stop.is_set():
            self.check_once()
            self._stop.wait(self.config.health.interval_seconds)

    def start(self) -> None:
        port = self.config.server.health_port
        assert port is not None
        self.check_once()
        listener = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "xks-proxy"
            sys_version = ""

            def do_GET(self) -> None:
                if self.path == "/ping":
                    self._answer(200, {"status": "alive"})
                elif self.path == "/metrics":
                    self._answer_bytes(200, listener.render_metrics(), METRICS_TYPE)
                elif self.path == "/ready":
                    ready = listener.ready()
                    body: dict[str, Any] = {"status": "ready" if ready else "not ready"}
                    if listener.draining:
                        body["status"] = "draining"
                    elif not ready and listener.last_error:
                        body["reason"] = listener.last_error[:200]
                    self._answer(200 if ready else 503, body)
                else:
                    self._answer(404, {"status": "unknown path"})

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                self._answer_bytes(status, json.dumps(body).encode(), "application/json")

            def _answer_bytes(self, status: int, data: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return  # load balancers poll constantly; do not flood the log

        self._server = ThreadingHTTPServer((self.config.server.health_host, port), Handler)
        self._server.daemon_threads = True
        for target in (self._server.serve_forever, self._check_loop):
            thread = threading.Thread(target=target, name="xks-health", daemon=True)
            thread.start()
            self._threads.append(thread)
        logger.info(
            "health listener on http://%s:%d (/ping, /ready)", self.config.server.health_host, port
        )

    def render_metrics(self) -> bytes:
        return self.metrics.render()

    def snapshot(self) -> SupervisorSnapshot:
        """Merged worker metrics come from files; these values are computed now."""
        config = self.config
        snapshot = SupervisorSnapshot()
        fleet_status = getattr(self.key_manager, "fleet_status", None)
        if callable(fleet_status):
            snapshot.hsm_states = [(str(b.name), str(b.status)) for b in fleet_status()]
        else:
            info = self.key_manager.info()
            snapshot.hsm_states = [(info.id, "ACTIVE" if self.ready() else "UNAVAILABLE")]
        snapshot.credential_first_seen = track_credential_ages(config.server.state_dir, config)
        if config.tls is not None:
            from xks_proxy.server.tls import certificate_days_to_expiry

            try:
                snapshot.certificate_days_to_expire = certificate_days_to_expiry(
                    config.tls.cert_file
                )
            except Exception as exc:
                logger.warning("cannot read the server certificate's expiry: %s", exc)
        return snapshot

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
