"""Helpers to run the real proxy process and call it like KMS does."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

REGION = "us-east-1"
SERVICE = "kms-xks-proxy"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict[str, str]

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class ProxyProcess:
    """A running `xks-proxy serve` process."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    config_path: Path
    connections: list[http.client.HTTPConnection] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def request(
        self,
        method: str,
        path: str,
        body: bytes | dict[str, Any] | None = None,
        *,
        credential: tuple[str, str] | None = None,
        headers: dict[str, str] | None = None,
        timestamp: float | None = None,
    ) -> Response:
        """Send one request, SigV4-signed with botocore when a credential is given."""
        data = json.dumps(body).encode() if isinstance(body, dict) else (body or b"")
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        if credential is not None:
            all_headers = sign(
                method, self.base_url + path, data, credential, all_headers, timestamp
            )
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request(method, path, body=data, headers=all_headers)
            reply = connection.getresponse()
            return Response(
                reply.status, reply.read(), {k.lower(): v for k, v in reply.getheaders()}
            )
        finally:
            connection.close()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def sign(
    method: str,
    url: str,
    data: bytes,
    credential: tuple[str, str],
    headers: dict[str, str],
    timestamp: float | None = None,
) -> dict[str, str]:
    """Sign like KMS with botocore's independent SigV4 implementation."""
    request = AWSRequest(method=method, url=url, data=data, headers=dict(headers))
    signer = SigV4Auth(Credentials(*credential), SERVICE, REGION)
    if timestamp is None:
        signer.add_auth(request)
    else:
        request.context["timestamp"] = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(timestamp))
        signer._modify_request_before_signing(request)  # fixed clock for tests
        canonical = signer.canonical_request(request)
        string_to_sign = signer.string_to_sign(request, canonical)
        signature = signer.signature(string_to_sign, request)
        signer._inject_signature_to_request(request, signature)
    return dict(request.headers.items())


def run_cli(
    *args: str, timeout: float = 60, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m xks_proxy ARGS...`` to completion, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "xks_proxy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
        check=False,
    )


def start_proxy(
    config_path: Path,
    log_path: Path,
    port: int,
    *,
    wait: bool = True,
    tls_context: ssl.SSLContext | None = None,
) -> ProxyProcess:
    """Start `python -m xks_proxy serve --config ...` and wait until it accepts connections."""
    log = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "xks_proxy", "serve", "--config", str(config_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    proxy = ProxyProcess(process, port, log_path, config_path)
    if wait:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"proxy exited with {process.returncode}:\n{proxy.log_text()}")
            try:
                # Ready means a worker answers HTTP, not just that the port accepts.
                connection: http.client.HTTPConnection = (
                    http.client.HTTPSConnection("127.0.0.1", port, timeout=0.5, context=tls_context)
                    if tls_context is not None
                    else http.client.HTTPConnection("127.0.0.1", port, timeout=0.5)
                )
                connection.request("GET", "/")
                connection.getresponse().read()
                connection.close()
                return proxy
            except (OSError, http.client.HTTPException):
                time.sleep(0.05)
        proxy.stop()
        raise RuntimeError(f"proxy did not start in time:\n{proxy.log_text()}")
    return proxy
