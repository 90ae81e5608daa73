"""HTTPS and mTLS on the real server (spec: API content type, Authentication), with the
demo's own PKI, curl and openssl as clients."""

from __future__ import annotations

import json
import re
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from e2e.proxy import free_port, start_proxy

pytestmark = [pytest.mark.e2e, pytest.mark.hsm]

BODY = json.dumps({"requestMetadata": {"kmsRequestId": "tls", "kmsOperation": "KmsHealthCheck"}})
CURL = shutil.which("curl")
OPENSSL = shutil.which("openssl")


def prepare(tmp_path: Path, *flags: str) -> tuple[Path, int, str, str, Path]:
    port = free_port()
    demo = tmp_path / "demo"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "xks_proxy",
            "demo",
            "--dir",
            str(demo),
            "--port",
            str(port),
            "--prepare-only",
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    akid = re.search(r"access key id:\s+(\S+)", result.stdout)
    secret = re.search(r"secret access key:\s+(\S+)", result.stdout)
    assert akid and secret
    return demo, port, akid.group(1), secret.group(1), demo / "pki"


def curl(port: int, credential: str, *extra: str) -> subprocess.CompletedProcess[str]:
    assert CURL is not None
    return subprocess.run(
        [
            CURL,
            "-sS",
            "-v",
            "--max-time",
            "5",
            *extra,
            "--aws-sigv4",
            "aws:amz:us-east-1:kms-xks-proxy",
            "--user",
            credential,
            "-H",
            "Content-Type:application/json",
            "--data",
            BODY,
            f"https://127.0.0.1:{port}/demo/kms/xks/v1/health",
        ],
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )


@pytest.mark.skipif(CURL is None or OPENSSL is None, reason="needs curl and openssl")
def test_https_with_mtls(tmp_path: Path) -> None:
    assert OPENSSL is not None
    demo, port, akid, secret, pki = prepare(tmp_path, "--mtls")
    credential = f"{akid}:{secret}"
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    context.load_cert_chain(str(pki / "client.pem"), str(pki / "client-key.pem"))
    proxy = start_proxy(demo / "config.toml", tmp_path / "proxy.log", port, tls_context=context)
    try:
        trust = ["--cacert", str(pki / "ca.pem")]
        client = ["--cert", str(pki / "client.pem"), "--key", str(pki / "client-key.pem")]
        good = curl(port, credential, *trust, *client)
        assert good.returncode == 0, good.stderr
        assert '"healthStatus":"ACTIVE"' in good.stdout
        assert "SSL connection using TLSv1.3" in good.stderr

        # TLS 1.2 offers only ECDHE AES-256-GCM / CHACHA20 suites.
        tls12 = curl(port, credential, *trust, *client, "--tls-max", "1.2")
        assert tls12.returncode == 0, tls12.stderr
        assert re.search(
            r"TLSv1\.2 / ECDHE-(ECDSA|RSA)-(AES256-GCM-SHA384|CHACHA20-POLY1305)", tls12.stderr
        )
        weak = curl(
            port,
            credential,
            *trust,
            *client,
            "--tls-max",
            "1.2",
            "--ciphers",
            "ECDHE-ECDSA-AES128-GCM-SHA256",
        )
        assert weak.returncode != 0

        # No client certificate: refused in the handshake, no HTTP at all.
        none = curl(port, credential, *trust)
        assert none.returncode != 0 and "< HTTP/" not in none.stderr
        # A self-signed certificate with the right name: alert handshake_failure.
        (tmp_path / "ss").mkdir()
        subprocess.run(
            [
                OPENSSL,
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                "/CN=cks.kms.us-east-1.amazonaws.com",
                "-days",
                "2",
                "-keyout",
                str(tmp_path / "ss/key.pem"),
                "-out",
                str(tmp_path / "ss/cert.pem"),
            ],
            capture_output=True,
            check=True,
            timeout=30,
        )
        selfsigned = curl(
            port,
            credential,
            *trust,
            "--cert",
            str(tmp_path / "ss/cert.pem"),
            "--key",
            str(tmp_path / "ss/key.pem"),
        )
        assert "TLS alert, handshake failure" in selfsigned.stderr
        assert "< HTTP/" not in selfsigned.stderr

        # TLS 1.0 and 1.1 are refused.
        for flag in ("-tls1", "-tls1_1"):
            old = subprocess.run(
                [
                    OPENSSL,
                    "s_client",
                    "-connect",
                    f"127.0.0.1:{port}",
                    flag,
                    "-cert",
                    str(pki / "client.pem"),
                    "-key",
                    str(pki / "client-key.pem"),
                ],
                input="",
                capture_output=True,
                text=True,
                timeout=15,
                check=False,
            )
            assert old.returncode != 0
            assert "Cipher is (NONE)" in old.stdout or "alert" in old.stderr.lower()
    finally:
        proxy.stop()
    assert "client certificate refused in the TLS handshake" in proxy.log_text()


@pytest.mark.skipif(CURL is None, reason="needs curl")
def test_certificate_reload_keeps_open_connections(tmp_path: Path) -> None:
    """Issue 3: a renewed certificate is served to new connections after
    `xks-proxy reload`, while an open keep-alive connection keeps working."""
    import http.client

    from xks_proxy.server.tls import make_demo_pki

    demo, port, _, _, pki = prepare(tmp_path, "--tls")
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    proxy = start_proxy(demo / "config.toml", tmp_path / "proxy.log", port, tls_context=context)

    def serial(connection: http.client.HTTPSConnection) -> int:
        assert connection.sock is not None
        assert isinstance(connection.sock, ssl.SSLSocket)
        der = connection.sock.getpeercert(binary_form=True)
        assert der is not None
        from cryptography import x509

        return x509.load_der_x509_certificate(der).serial_number

    try:
        kept = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=5)
        kept.request("GET", "/")
        kept.getresponse().read()
        old_serial = serial(kept)
        (pki / "server.pem").unlink()
        (pki / "server-key.pem").unlink()
        make_demo_pki(pki, server_names=("localhost", "127.0.0.1"))  # same CA, new leaf
        result = subprocess.run(
            [sys.executable, "-m", "xks_proxy", "reload", "--config", str(demo / "config.toml")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        fresh = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=5)
        fresh.request("GET", "/")
        fresh.getresponse().read()
        assert serial(fresh) != old_serial
        kept.request("GET", "/")  # the old connection still answers
        assert kept.getresponse().status == 404
        assert serial(kept) == old_serial
        kept.close()
        fresh.close()
    finally:
        proxy.stop()


def test_https_without_mtls_and_plain_http_refused(tmp_path: Path) -> None:
    demo, port, akid, secret, pki = prepare(tmp_path, "--tls")
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    proxy = start_proxy(demo / "config.toml", tmp_path / "proxy.log", port, tls_context=context)
    try:
        good = curl(port, f"{akid}:{secret}", "--cacert", str(pki / "ca.pem"))
        assert good.returncode == 0, good.stderr
        assert '"healthStatus":"ACTIVE"' in good.stdout
        assert CURL is not None
        plain = subprocess.run(
            [CURL, "-sS", "--max-time", "5", f"http://127.0.0.1:{port}/demo/kms/xks/v1/health"],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
        assert "healthStatus" not in plain.stdout
    finally:
        proxy.stop()
