"""Real TLS handshakes against uvicorn (asyncio and uvloop) serving with our context.

The server runs in a thread on 127.0.0.1 with build_server_context() and
MtlsHttpToolsProtocol; clients are Python ssl sockets (and curl, when installed).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trustme
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from xks_proxy.server.tls import (
    MtlsHttpToolsProtocol,
    PeerNamePolicy,
    TlsSettings,
    build_server_context,
    reload_certificates,
)

KMS_NAME = "cks.kms.us-east-1.amazonaws.com"
LOOPS = ["asyncio", "uvloop"]
TLS13, TLS12 = ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2
T = TypeVar("T")


class _Policy(PeerNamePolicy):
    """This module's own allowed names (the process-wide ones stay untouched)."""


class _Protocol(MtlsHttpToolsProtocol):
    policy = _Policy


# --------------------------------------------------------------------------- PKI


def write_pair(directory: Path, name: str, cert_pem: bytes, key_pem: bytes) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    return cert, key


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A CA-less client certificate with the right name."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, KMS_NAME)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return write_pair(
        directory, "selfsigned", cert.public_bytes(serialization.Encoding.PEM), key_pem
    )


@dataclass
class Pki:
    directory: Path
    server_ca: trustme.CA
    client_ca: trustme.CA
    settings: TlsSettings
    clients: dict[str, tuple[Path, Path]]

    def renewed_server(self, name: str) -> TlsSettings:
        leaf = self.server_ca.issue_cert("localhost", "127.0.0.1")
        cert, key = write_pair(
            self.directory,
            name,
            b"".join(p.bytes() for p in leaf.cert_chain_pems),
            leaf.private_key_pem.bytes(),
        )
        return TlsSettings(cert, key, None, self.settings.client_ca_file, (KMS_NAME,))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("tls-pki")
    server_ca, client_ca, other_ca = trustme.CA(), trustme.CA(), trustme.CA()
    server = server_ca.issue_cert("localhost", "127.0.0.1")
    server_cert, server_key = write_pair(
        directory,
        "server",
        b"".join(p.bytes() for p in server.cert_chain_pems),
        server.private_key_pem.bytes(),
    )
    client_ca_file = directory / "client-ca.pem"
    client_ca.cert_pem.write_to_path(client_ca_file)
    now = dt.datetime.now(dt.UTC)

    def leaf(ca: trustme.CA, *names: str, cn: str, **kwargs: Any) -> tuple[bytes, bytes]:
        issued = ca.issue_cert(*names, common_name=cn, **kwargs)
        return issued.cert_chain_pems[0].bytes(), issued.private_key_pem.bytes()

    clients = {
        "good": write_pair(directory, "good", *leaf(client_ca, KMS_NAME, cn=KMS_NAME)),
        "good-san-only": write_pair(
            directory, "good-san", *leaf(client_ca, KMS_NAME, cn="not-the-name")
        ),
        "wrong-name": write_pair(
            directory, "wrong", *leaf(client_ca, "evil.example.com", cn="evil.example.com")
        ),
        "expired": write_pair(
            directory,
            "expired",
            *leaf(
                client_ca,
                KMS_NAME,
                cn=KMS_NAME,
                not_before=now - dt.timedelta(days=30),
                not_after=now - dt.timedelta(days=1),
            ),
        ),
        "other-ca": write_pair(directory, "other-ca", *leaf(other_ca, KMS_NAME, cn=KMS_NAME)),
        "self-signed": self_signed(directory),
    }
    settings = TlsSettings(server_cert, server_key, None, client_ca_file, (KMS_NAME,))
    return Pki(directory, server_ca, client_ca, settings, clients)


# --------------------------------------------------------------------------- server


@dataclass
class App:
    """A trivial ASGI app that counts the requests it serves."""

    calls: list[str] = field(default_factory=list)
    loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            self.loop = asyncio.get_running_loop()
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        self.calls.append(scope["path"])
        body = b'{"ok":true}'
        headers = [(b"content-type", b"application/json"), (b"content-length", b"11")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@dataclass
class Running:
    port: int
    app: App
    context: ssl.SSLContext

    def on_loop(self, function: Callable[[], T]) -> T:
        """Run ``function`` on the server's event-loop thread and wait for it."""
        assert self.app.loop is not None

        async def call() -> T:
            return function()

        return asyncio.run_coroutine_threadsafe(call(), self.app.loop).result(timeout=5)


@contextmanager
def running_server(settings: TlsSettings, loop: str) -> Iterator[Running]:
    context = build_server_context(settings)
    sock = socket.create_server(("127.0.0.1", 0))
    app = App()
    config = uvicorn.Config(
        app,
        loop=loop,
        http=_Protocol,
        ssl_context_factory=lambda *_: context,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield Running(sock.getsockname()[1], app, context)
    finally:
        server.should_exit = True
        thread.join(5)
        sock.close()


@pytest.fixture(scope="module", params=LOOPS)
def server(request: pytest.FixtureRequest, pki: Pki) -> Iterator[Running]:
    _Policy.set_allowed([KMS_NAME])
    with running_server(pki.settings, request.param) as running:
        yield running


# --------------------------------------------------------------------------- client

REQUEST = (
    b"POST /kms/xks/v1/health HTTP/1.1\r\nHost: localhost\r\n"
    b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
)


def client_context(pki: Pki, client: str | None, version: ssl.TLSVersion = TLS13) -> ssl.SSLContext:
    context = ssl.create_default_context()
    pki.server_ca.configure_trust(context)
    context.minimum_version = context.maximum_version = version
    if client is not None:
        cert, key = pki.clients[client]
        context.load_cert_chain(cert, key)
    return context


def read_response(tls: ssl.SSLSocket) -> bytes:
    """One HTTP/1.1 response with a Content-Length (b"" if the server closed first)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(4096)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = tls.recv(4096)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


@dataclass
class Outcome:
    kind: str  # "response", "alert" or "closed"
    detail: str
    response: bytes = b""
    session_reused: bool = False


def attempt(
    port: int, context: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[Outcome, ssl.SSLSession | None]:
    """Connect, send one request, read the answer; classify what happened."""
    reused = False
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=3) as raw,
            context.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
        ):
            reused = bool(tls.session_reused)
            tls.sendall(REQUEST)
            response = read_response(tls)
            if response:
                return Outcome("response", "", response, reused), tls.session
            return Outcome("closed", "EOF", session_reused=reused), None
    except ssl.SSLError as exc:
        if exc.reason and "ALERT" in exc.reason:
            return Outcome("alert", exc.reason, session_reused=reused), None
        return Outcome("closed", repr(exc), session_reused=reused), None
    except (ConnectionResetError, BrokenPipeError) as exc:
        return Outcome("closed", repr(exc), session_reused=reused), None


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("version", [TLS13, TLS12])
@pytest.mark.parametrize("client", ["good", "good-san-only"])
def test_allowed_client_gets_200(
    server: Running, pki: Pki, client: str, version: ssl.TLSVersion
) -> None:
    before = len(server.app.calls)
    outcome, _ = attempt(server.port, client_context(pki, client, version))
    assert outcome.kind == "response", outcome
    assert outcome.response.startswith(b"HTTP/1.1 200 ")
    assert outcome.response.endswith(b'{"ok":true}')
    assert len(server.app.calls) == before + 1


@pytest.mark.parametrize("version", [TLS13, TLS12])
def test_wrong_name_from_the_right_ca_is_cut_off_without_a_response(
    server: Running, pki: Pki, version: ssl.TLSVersion, caplog: pytest.LogCaptureFixture
) -> None:
    before = len(server.app.calls)
    with caplog.at_level(logging.WARNING, logger="xks_proxy.tls"):
        outcome, _ = attempt(server.port, client_context(pki, "wrong-name", version))
    assert outcome.kind == "closed", outcome
    assert outcome.response == b""
    assert len(server.app.calls) == before
    assert "'evil.example.com' are not allowed" in caplog.text


@pytest.mark.parametrize(
    ("client", "version", "alert"),
    [
        (None, TLS13, "TLSV13_ALERT_CERTIFICATE_REQUIRED"),
        (None, TLS12, "SSLV3_ALERT_HANDSHAKE_FAILURE"),
        # Every refused certificate gets handshake_failure (server/handshake_alert.py).
        ("expired", TLS13, "SSLV3_ALERT_HANDSHAKE_FAILURE"),
        ("expired", TLS12, "SSLV3_ALERT_HANDSHAKE_FAILURE"),
        ("self-signed", TLS13, "SSLV3_ALERT_HANDSHAKE_FAILURE"),
        ("self-signed", TLS12, "SSLV3_ALERT_HANDSHAKE_FAILURE"),
        ("other-ca", TLS13, "SSLV3_ALERT_HANDSHAKE_FAILURE"),
        ("other-ca", TLS12, "SSLV3_ALERT_HANDSHAKE_FAILURE"),
    ],
)
def test_bad_client_certificates_fail_the_handshake_with_an_alert(
    server: Running, pki: Pki, client: str | None, version: ssl.TLSVersion, alert: str
) -> None:
    before = len(server.app.calls)
    outcome, _ = attempt(server.port, client_context(pki, client, version))
    assert (outcome.kind, outcome.detail) == ("alert", alert)
    assert len(server.app.calls) == before


def test_allowed_names_swap_at_runtime(server: Running, pki: Pki) -> None:
    context = client_context(pki, "good")
    try:
        _Policy.set_allowed(["cks.kms.eu-west-1.amazonaws.com"])
        assert attempt(server.port, context)[0].kind == "closed"
        _Policy.set_allowed(["cks.kms.eu-west-1.amazonaws.com", KMS_NAME.upper()])
        assert attempt(server.port, context)[0].kind == "response"
    finally:
        _Policy.set_allowed([KMS_NAME])


@pytest.mark.parametrize("version", [TLS13, TLS12])
def test_resumed_session_is_checked_again(
    server: Running, pki: Pki, version: ssl.TLSVersion
) -> None:
    context = client_context(pki, "good", version)
    first, session = attempt(server.port, context)
    assert first.kind == "response" and session is not None
    try:
        _Policy.set_allowed(["cks.kms.eu-west-1.amazonaws.com"])
        resumed, _ = attempt(server.port, context, session)
    finally:
        _Policy.set_allowed([KMS_NAME])
    assert resumed.session_reused
    assert resumed.kind == "closed", resumed


@pytest.mark.parametrize("loop", LOOPS)
def test_certificate_reload_on_a_running_server(pki: Pki, loop: str) -> None:
    _Policy.set_allowed([KMS_NAME])
    context = client_context(pki, "good")
    with (
        running_server(pki.settings, loop) as running,
        socket.create_connection(("127.0.0.1", running.port), timeout=3) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as kept,
    ):
        kept.sendall(REQUEST)
        assert read_response(kept).startswith(b"HTTP/1.1 200 ")
        old_serial = serial_of(kept)

        running.on_loop(lambda: reload_certificates(running.context, pki.renewed_server(loop)))

        with (
            socket.create_connection(("127.0.0.1", running.port), timeout=3) as raw2,
            context.wrap_socket(raw2, server_hostname="localhost") as fresh,
        ):
            fresh.sendall(REQUEST)
            assert read_response(fresh).startswith(b"HTTP/1.1 200 ")
            new_serial = serial_of(fresh)
        assert new_serial != old_serial
        # The connection from before the reload is still served, on its old certificate.
        kept.sendall(REQUEST)
        assert read_response(kept).startswith(b"HTTP/1.1 200 ")
        assert serial_of(kept) == old_serial
        assert len(running.app.calls) == 3


def serial_of(tls: ssl.SSLSocket) -> int:
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


CURL = shutil.which("curl")


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
@pytest.mark.parametrize("version", ["--tlsv1.3", "--tls-max"])
@pytest.mark.parametrize(
    ("client", "line"),
    [
        ("expired", "TLS alert, handshake failure (552)"),
        ("self-signed", "TLS alert, handshake failure (552)"),
    ],
)
def test_curl_reports_handshake_failure(
    server: Running, pki: Pki, client: str, line: str, version: str
) -> None:
    """What the AWS compliance client's negative mTLS tests look for (docs/tls.md)."""
    assert CURL is not None
    cert, key = pki.clients[client]
    versions = ["--tlsv1.3"] if version == "--tlsv1.3" else ["--tls-max", "1.2"]
    result = subprocess.run(
        [
            CURL,
            "-v",
            "-sS",
            "-k",
            *versions,
            "--cert",
            str(cert),
            "--key",
            str(key),
            "--max-time",
            "5",
            "-H",
            "Content-Type:application/json",
            "--data",
            "{}",
            f"https://127.0.0.1:{server.port}/kms/xks/v1/health",
        ],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert result.returncode != 0
    assert line in result.stderr, result.stderr
    assert "< HTTP/" not in result.stderr  # no response line was received
