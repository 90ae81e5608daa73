"""TLS module: context settings, file errors, reload, client names, expiry, demo PKI.

Handshakes here run over memory BIOs (no sockets); tests/integration/test_tls_handshakes.py
runs them against a real uvicorn server.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import ssl
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from uvicorn.server import ServerState

from xks_proxy.server import tls
from xks_proxy.server.tls import (
    MtlsHttpToolsProtocol,
    PeerNamePolicy,
    TlsConfigError,
    TlsSettings,
    build_server_context,
    certificate_days_to_expiry,
    certificate_not_after,
    make_demo_pki,
    peer_name_allowed,
    peer_names,
    reload_certificates,
)

KMS_NAME = "cks.kms.us-east-1.amazonaws.com"
NOW = dt.datetime.now(dt.UTC)

# --------------------------------------------------------------------------- helpers


@dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self, password: bytes | None = None) -> bytes:
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password)
            if password
            else serialization.NoEncryption()
        )
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )


def ca_parts(ca: trustme.CA) -> Issued:
    key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    return Issued(x509.load_pem_x509_certificate(ca.cert_pem.bytes()), key)


def issue(
    issuer: Issued | None,
    common_name: str | None,
    dns_names: Sequence[str] = (),
    *,
    valid_from: dt.timedelta = dt.timedelta(days=-1),
    valid_to: dt.timedelta = dt.timedelta(days=90),
    rsa_key: bool = False,
    usage: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
) -> Issued:
    """A leaf certificate signed by ``issuer`` (None: self-signed)."""
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
        rsa.generate_private_key(65537, 2048)
        if rsa_key
        else ec.generate_private_key(ec.SECP256R1())
    )
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW + valid_from)
        .not_valid_after(NOW + valid_to)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if dns_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False
        )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), False
        )
    cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    return Issued(cert, key)


@dataclass
class Files:
    """A server certificate/key pair and a client CA, on disk."""

    root: Path
    ca: trustme.CA
    client_ca: trustme.CA

    def server(
        self,
        name: str = "server",
        *,
        rsa_key: bool = False,
        password: bytes | None = None,
    ) -> tuple[Path, Path, Issued]:
        leaf = issue(
            ca_parts(self.ca),
            "localhost",
            ["localhost"],
            rsa_key=rsa_key,
            usage=ExtendedKeyUsageOID.SERVER_AUTH,
        )
        cert = self.root / f"{name}.pem"
        key = self.root / f"{name}-key.pem"
        cert.write_bytes(leaf.cert_pem + self.ca.cert_pem.bytes())
        key.write_bytes(leaf.key_pem(password))
        return cert, key, leaf

    def client_ca_file(self, *cas: trustme.CA, name: str = "client-ca.pem") -> Path:
        path = self.root / name
        path.write_bytes(b"".join(ca.cert_pem.bytes() for ca in (cas or (self.client_ca,))))
        return path

    def settings(self, *, mtls: bool = True, name: str = "server") -> TlsSettings:
        cert, key, _ = self.server(name)
        return TlsSettings(
            cert_file=cert,
            key_file=key,
            client_ca_file=self.client_ca_file() if mtls else None,
            allowed_client_names=(KMS_NAME,) if mtls else (),
        )


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path, trustme.CA(), trustme.CA())


def client_context(
    files: Files,
    client: Issued | None = None,
    *,
    tmp: Path | None = None,
    version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    context = ssl.create_default_context()
    files.ca.configure_trust(context)
    if version is not None:
        context.minimum_version = context.maximum_version = version
    if client is not None:
        path = (tmp or files.root) / f"client-{client.cert.serial_number}.pem"
        path.write_bytes(client.cert_pem + client.key_pem())
        context.load_cert_chain(path)
    return context


class Pair:
    """A client and a server SSLObject talking over memory BIOs."""

    def __init__(self, server: ssl.SSLContext, client: ssl.SSLContext) -> None:
        self.c_in, self.c_out, self.s_in, self.s_out = (ssl.MemoryBIO() for _ in range(4))
        self.client = client.wrap_bio(self.c_in, self.c_out, server_hostname="localhost")
        self.server = server.wrap_bio(self.s_in, self.s_out, server_side=True)

    def pump(self) -> None:
        self.s_in.write(self.c_out.read())
        self.c_in.write(self.s_out.read())

    def handshake(self) -> Pair:
        done = {"client": False, "server": False}
        for _ in range(10):
            for side, obj in (("client", self.client), ("server", self.server)):
                if not done[side]:
                    try:
                        obj.do_handshake()
                        done[side] = True
                    except ssl.SSLWantReadError:
                        pass
            self.pump()
            if all(done.values()):
                return self
        raise AssertionError("handshake did not finish")

    def roundtrip(self, payload: bytes = b"ping") -> bytes:
        self.client.write(payload)
        self.pump()
        data = self.server.read(1024)
        self.server.write(data[::-1])
        self.pump()
        return self.client.read(1024)

    def served_serial(self) -> int:
        der = self.client.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> Pair:
    return Pair(server, client).handshake()


# --------------------------------------------------------------------------- context


def test_context_protocol_settings(files: Files) -> None:
    context = build_server_context(files.settings(mtls=False))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.maximum_version == ssl.TLSVersion.MAXIMUM_SUPPORTED
    for option in (ssl.OP_NO_COMPRESSION, ssl.OP_CIPHER_SERVER_PREFERENCE, ssl.OP_NO_RENEGOTIATION):
        assert context.options & option
    assert context.verify_mode == ssl.CERT_NONE
    tls12 = {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 == {
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    }


def test_tls13_with_alpn_http11_and_aes256(files: Files) -> None:
    server = build_server_context(files.settings(mtls=False))
    client = client_context(files)
    client.set_alpn_protocols(["h2", "http/1.1"])
    pair = handshake(server, client)
    assert pair.client.version() == "TLSv1.3"
    assert pair.client.selected_alpn_protocol() == "http/1.1"
    cipher = pair.client.cipher()
    assert cipher is not None and cipher[0] == "TLS_AES_256_GCM_SHA384"
    assert pair.client.compression() is None
    assert pair.roundtrip(b"abc") == b"cba"


def test_tls12_uses_server_preference_within_allowed_suites(files: Files) -> None:
    server = build_server_context(files.settings(mtls=False))
    client = client_context(files, version=ssl.TLSVersion.TLSv1_2)
    client.set_ciphers("ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES256-GCM-SHA384")
    cipher = handshake(server, client).client.cipher()
    assert cipher is not None and cipher[:2] == ("ECDHE-ECDSA-AES256-GCM-SHA384", "TLSv1.2")


def test_tls12_refuses_other_suites(files: Files) -> None:
    server = build_server_context(files.settings(mtls=False))
    client = client_context(files, version=ssl.TLSVersion.TLSv1_2)
    client.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES128-SHA256")
    with pytest.raises(ssl.SSLError, match=r"HANDSHAKE_FAILURE|NO_SHARED_CIPHER"):
        handshake(server, client)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_old_tls_versions_refused(files: Files, version: ssl.TLSVersion) -> None:
    server = build_server_context(files.settings(mtls=False))
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    client.set_ciphers("DEFAULT:@SECLEVEL=0")
    client.minimum_version = client.maximum_version = version
    pair = Pair(server, client)
    with pytest.raises(ssl.SSLError) as caught:
        pair.handshake()
    # The client was willing; the server refused with a protocol_version alert.
    assert caught.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION"


def test_mtls_context_trusts_only_the_configured_cas(files: Files) -> None:
    settings = files.settings()
    context = build_server_context(settings)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.verify_flags & ssl.VERIFY_X509_STRICT
    cas = context.get_ca_certs(binary_form=True)
    expected = x509.load_pem_x509_certificate(files.client_ca.cert_pem.bytes())
    assert [x509.load_der_x509_certificate(der) for der in cas] == [expected]


def test_mtls_accepts_normal_client_certificates_under_strict_checks(files: Files) -> None:
    server = build_server_context(files.settings())
    trustme_leaf = files.client_ca.issue_cert(KMS_NAME, common_name=KMS_NAME)
    client = client_context(files)
    trustme_leaf.configure_cert(client)
    pair = handshake(server, client)
    assert pair.roundtrip() == b"gnip"
    assert peer_names(pair.server.getpeercert()) == [KMS_NAME]
    cn_only = issue(ca_parts(files.client_ca), KMS_NAME)
    pair = handshake(server, client_context(files, cn_only))
    assert peer_name_allowed(pair.server.getpeercert(), [KMS_NAME])


def test_mtls_handshake_without_client_certificate_fails(
    files: Files, caplog: pytest.LogCaptureFixture
) -> None:
    server = build_server_context(files.settings())
    client = client_context(files, version=ssl.TLSVersion.TLSv1_2)
    with (
        caplog.at_level(logging.WARNING, logger="xks_proxy.tls"),
        pytest.raises(ssl.SSLError) as caught,
    ):
        handshake(server, client)
    assert caught.value.reason == "SSLV3_ALERT_HANDSHAKE_FAILURE"
    assert "client sent no certificate" in caplog.text


def test_failed_server_handshake_queues_the_alert_before_raising(
    files: Files, caplog: pytest.LogCaptureFixture
) -> None:
    """The alert is handed to the event loop (want-read) before the error is raised."""
    server = build_server_context(files.settings())
    expired = issue(ca_parts(files.client_ca), KMS_NAME, valid_to=dt.timedelta(days=-1))
    pair = Pair(server, client_context(files, expired, version=ssl.TLSVersion.TLSv1_2))
    with pytest.raises(ssl.SSLWantReadError):
        pair.client.do_handshake()
    pair.pump()
    with pytest.raises(ssl.SSLWantReadError):
        pair.server.do_handshake()  # ClientHello -> ServerHello...
    pair.pump()
    with pytest.raises(ssl.SSLWantReadError):
        pair.client.do_handshake()  # sends its certificate
    pair.pump()
    with (
        caplog.at_level(logging.WARNING, logger="xks_proxy.tls"),
        pytest.raises(ssl.SSLWantReadError),
    ):
        pair.server.do_handshake()  # verification fails: alert queued, not raised yet
    assert pair.s_out.pending > 0
    # The real reason is logged; the client is told only handshake_failure.
    assert "client certificate refused in the TLS handshake: certificate has expired" in (
        caplog.text
    )
    with pytest.raises(ssl.SSLCertVerificationError):
        pair.server.do_handshake()
    pair.pump()
    with pytest.raises(ssl.SSLError) as caught:
        pair.client.do_handshake()
    assert caught.value.reason == "SSLV3_ALERT_HANDSHAKE_FAILURE"


def test_encrypted_key_with_password(files: Files) -> None:
    cert, key, _ = files.server(password=b"s3cret-pw")
    settings = TlsSettings(cert_file=cert, key_file=key, key_password="s3cret-pw")
    assert "s3cret-pw" not in repr(settings)
    context = build_server_context(settings)
    assert handshake(context, client_context(files)).roundtrip() == b"gnip"


def test_password_for_unencrypted_key_is_ignored(files: Files) -> None:
    cert, key, _ = files.server()
    build_server_context(TlsSettings(cert_file=cert, key_file=key, key_password="unused"))


def test_private_files_fallback_without_memfd(
    files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(os, "memfd_create")
    context = build_server_context(files.settings())
    assert context.get_ca_certs()


# --------------------------------------------------------------------------- file errors


def expect_error(settings: TlsSettings, *fragments: str) -> str:
    with pytest.raises(TlsConfigError) as caught:
        build_server_context(settings)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message
    return message


def test_missing_files(files: Files) -> None:
    cert, key, _ = files.server()
    missing = files.root / "nope.pem"
    expect_error(TlsSettings(missing, key), str(missing), "not found")
    expect_error(TlsSettings(cert, missing), "private key", str(missing), "not found")
    expect_error(
        TlsSettings(cert, key, client_ca_file=missing), "client CA", str(missing), "not found"
    )


def test_unreadable_files(files: Files) -> None:
    cert, key, _ = files.server()
    expect_error(TlsSettings(files.root, key), str(files.root), "is a directory")
    if os.geteuid() != 0:  # root reads anything
        key.chmod(0)
        expect_error(TlsSettings(cert, key), str(key), "permission denied")


def test_garbage_certificate_and_key(files: Files) -> None:
    cert, key, _ = files.server()
    junk = files.root / "junk.pem"
    junk.write_text("not a pem file\n")
    expect_error(TlsSettings(junk, key), str(junk), "no certificate")
    expect_error(TlsSettings(cert, junk), str(junk), "no usable PEM private key")


def test_key_does_not_match_certificate(files: Files) -> None:
    cert, _, _ = files.server("one")
    _, other_key, _ = files.server("two")
    expect_error(TlsSettings(cert, other_key), str(other_key), "does not match", str(cert))


def test_wrong_password_is_named_but_never_shown(files: Files) -> None:
    cert, key, _ = files.server(password=b"right-password")
    message = expect_error(
        TlsSettings(cert, key, key_password="WRONG-pw-123"), str(key), "wrong key password"
    )
    assert "WRONG-pw-123" not in message and "right-password" not in message


def test_encrypted_key_without_password(files: Files) -> None:
    cert, key, _ = files.server(password=b"right-password")
    expect_error(TlsSettings(cert, key), str(key), "encrypted", "no key password")


def test_ca_file_without_certificates(files: Files) -> None:
    cert, key, _ = files.server()
    empty = files.root / "empty-ca.pem"
    empty.write_bytes(files.ca.private_key_pem.bytes())  # a key, no certificate
    expect_error(TlsSettings(cert, key, client_ca_file=empty), str(empty), "no certificate")


# --------------------------------------------------------------------------- reload


def test_reload_serves_new_certificate_to_new_handshakes_only(files: Files) -> None:
    settings = files.settings(mtls=False)
    context = build_server_context(settings)
    client = client_context(files)
    old_pair = handshake(context, client)
    old_serial = old_pair.served_serial()

    new_cert, new_key, new_leaf = files.server("renewed")
    reload_certificates(context, TlsSettings(new_cert, new_key))

    assert handshake(context, client).served_serial() == new_leaf.cert.serial_number
    assert new_leaf.cert.serial_number != old_serial
    # The connection made before the reload goes on, with its certificate.
    assert old_pair.roundtrip(b"still here") == b"ereh llits"
    assert old_pair.served_serial() == old_serial


def test_reload_with_bad_files_keeps_serving_the_old_certificate(files: Files) -> None:
    settings = files.settings(mtls=False)
    context = build_server_context(settings)
    client = client_context(files)
    serial = handshake(context, client).served_serial()

    # Half-renewed: the new certificate is in place, the key is still the old one.
    new_cert, _, _ = files.server("renewed")
    with pytest.raises(TlsConfigError, match="does not match"):
        reload_certificates(context, TlsSettings(new_cert, settings.key_file))
    assert handshake(context, client).served_serial() == serial

    with pytest.raises(TlsConfigError, match="not found"):
        reload_certificates(context, TlsSettings(files.root / "gone.pem", settings.key_file))
    assert handshake(context, client).served_serial() == serial


def weak_chain(files: Files) -> tuple[Path, Path]:
    """A chain cryptography parses but OpenSSL refuses half-way (RSA-1024 intermediate)."""
    root = ca_parts(files.ca)
    weak_key = rsa.generate_private_key(65537, 1024)  # noqa: S505 - deliberately weak
    intermediate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weak intermediate")]))
        .issuer_name(root.cert.subject)
        .public_key(weak_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root.key, hashes.SHA256())
    )
    leaf = issue(
        Issued(intermediate, weak_key),
        "localhost",
        ["localhost"],
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
    )
    cert, key = files.root / "weak.pem", files.root / "weak-key.pem"
    cert.write_bytes(leaf.cert_pem + intermediate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(leaf.key_pem())
    return cert, key


def test_files_openssl_refuses_are_reported(files: Files) -> None:
    cert, key = weak_chain(files)
    expect_error(TlsSettings(cert, key), str(cert), "OpenSSL refused", "CA_KEY_TOO_SMALL")


def test_reload_refused_by_openssl_half_way_keeps_the_old_certificate(files: Files) -> None:
    context = build_server_context(files.settings(mtls=False))
    client = client_context(files)
    serial = handshake(context, client).served_serial()
    with pytest.raises(TlsConfigError, match="CA_KEY_TOO_SMALL"):
        reload_certificates(context, TlsSettings(*weak_chain(files)))
    pair = handshake(context, client)
    assert pair.served_serial() == serial
    assert pair.roundtrip() == b"gnip"


def test_reload_refuses_a_key_type_switch(files: Files) -> None:
    context = build_server_context(files.settings(mtls=False))
    client = client_context(files)
    serial = handshake(context, client).served_serial()
    rsa_cert, rsa_key, _ = files.server("rsa", rsa_key=True)
    with pytest.raises(TlsConfigError, match="key type changes from EC to RSA"):
        reload_certificates(context, TlsSettings(rsa_cert, rsa_key))
    assert handshake(context, client).served_serial() == serial


def test_reload_adds_client_cas_but_refuses_to_remove_one(files: Files) -> None:
    settings = files.settings()
    context = build_server_context(settings)
    second_ca = trustme.CA()
    from_second = issue(ca_parts(second_ca), KMS_NAME)
    with pytest.raises(ssl.SSLError):
        handshake(context, client_context(files, from_second, version=ssl.TLSVersion.TLSv1_2))

    both = files.client_ca_file(files.client_ca, second_ca, name="both.pem")
    reload_certificates(context, TlsSettings(settings.cert_file, settings.key_file, None, both))
    handshake(context, client_context(files, from_second))

    only_second = files.client_ca_file(second_ca, name="second.pem")
    with pytest.raises(TlsConfigError, match=r"1 CA certificate.*removed.*restart"):
        reload_certificates(
            context, TlsSettings(settings.cert_file, settings.key_file, None, only_second)
        )


def test_reload_refuses_to_switch_mtls(files: Files) -> None:
    settings = files.settings()
    context = build_server_context(settings)
    with pytest.raises(TlsConfigError, match="mTLS on or off"):
        reload_certificates(context, TlsSettings(settings.cert_file, settings.key_file))


def test_reload_needs_a_context_from_build_server_context(files: Files) -> None:
    with pytest.raises(TlsConfigError, match="build_server_context"):
        reload_certificates(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), files.settings())


# --------------------------------------------------------------------------- names

PEERCERT: dict[str, Any] = {
    "subject": (
        (("countryName", "US"),),
        (("organizationName", "Amazon"),),
        (("commonName", "CKS.kms.us-east-1.amazonaws.com"),),
    ),
    "subjectAltName": (
        ("DNS", "alt.example.com"),
        ("IP Address", "10.0.0.1"),
        ("DNS", "cks.kms.us-east-1.amazonaws.com"),
    ),
}


def test_peer_names_cn_first_then_dns_sans_deduplicated() -> None:
    assert peer_names(PEERCERT) == [
        "CKS.kms.us-east-1.amazonaws.com",
        "alt.example.com",
        "cks.kms.us-east-1.amazonaws.com",
    ]
    assert peer_names(None) == [] and peer_names({}) == []
    multi_cn = {"subject": ((("commonName", "a"),), (("commonName", "b"), ("commonName", "a")))}
    assert peer_names(multi_cn) == ["a", "b"]


@pytest.mark.parametrize(
    ("allowed", "expected"),
    [
        ([KMS_NAME], True),
        (["CKS.KMS.US-EAST-1.AMAZONAWS.COM"], True),
        (["alt.example.com"], True),
        (["other.example", "alt.example.com"], True),
        (["10.0.0.1"], False),  # IP SANs are not names
        (["cks.kms.eu-west-1.amazonaws.com"], False),
        (["*.amazonaws.com"], False),
        (["kms.us-east-1.amazonaws.com"], False),
        (["cks.kms.us-east-1.amazonaws.com.evil.example"], False),
        ([], False),
    ],
)
def test_peer_name_allowed(allowed: list[str], expected: bool) -> None:
    assert peer_name_allowed(PEERCERT, allowed) is expected


def test_peer_name_allowed_without_certificate() -> None:
    assert not peer_name_allowed(None, [KMS_NAME])
    assert not peer_name_allowed({}, [KMS_NAME])


def test_wildcard_in_the_certificate_is_not_expanded() -> None:
    cert = {"subject": ((("commonName", "*.kms.us-east-1.amazonaws.com"),),)}
    assert not peer_name_allowed(cert, [KMS_NAME])


class _Policy(PeerNamePolicy):
    pass


def allowed_of(policy: type[PeerNamePolicy]) -> tuple[str, ...]:
    return policy.allowed


def test_policy_set_allowed_normalises_and_validates() -> None:
    base = allowed_of(PeerNamePolicy)
    assert allowed_of(_Policy) == base
    _Policy.set_allowed([])
    assert not _Policy.permits(PEERCERT)  # nothing allowed
    _Policy.set_allowed(["CKS.kms.us-east-1.amazonaws.com", KMS_NAME])
    assert allowed_of(_Policy) == (KMS_NAME,)
    assert _Policy.permits(PEERCERT)
    assert allowed_of(PeerNamePolicy) == base  # the base class is untouched
    with pytest.raises(TypeError):
        _Policy.set_allowed(KMS_NAME)
    for bad in ("", "two words", "tab\tname"):
        with pytest.raises(ValueError, match="invalid client certificate name"):
            _Policy.set_allowed([bad])
    assert allowed_of(_Policy) == (KMS_NAME,)  # a refused update changes nothing


def test_policy_refuses_everything_until_configured() -> None:
    class Fresh(PeerNamePolicy):
        allowed = ()

    assert not Fresh.permits(PEERCERT)
    assert not Fresh.permits(None)


# --------------------------------------------------------------------------- protocol


class FakeSslObject:
    def __init__(self, peercert: dict[str, Any] | None) -> None:
        self.peercert = peercert

    def getpeercert(self) -> dict[str, Any] | None:
        return self.peercert


class FakeTransport(asyncio.Transport):
    def __init__(self, peercert: dict[str, Any] | None, *, tls: bool = True) -> None:
        super().__init__()
        self.extra: dict[str, Any] = {
            "peername": ("192.0.2.7", 4711),
            "sockname": ("127.0.0.1", 8443),
            "ssl_object": FakeSslObject(peercert) if tls else None,
        }
        if tls:
            self.extra["sslcontext"] = object()
        self.aborted = False
        self.written: list[bytes] = []

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)

    def abort(self) -> None:
        self.aborted = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.aborted

    def close(self) -> None:
        self.aborted = True


class _ProtoPolicy(PeerNamePolicy):
    pass


class _Proto(MtlsHttpToolsProtocol):
    policy = _ProtoPolicy


def make_protocol(calls: list[str]) -> _Proto:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        calls.append(scope["path"])

    config = uvicorn.Config(app, http=_Proto, lifespan="off", log_config=None)
    config.load()
    assert config.http_protocol_class is _Proto
    return _Proto(config=config, server_state=ServerState(), app_state={}, _loop=None)


REQUEST = b"POST /kms/xks/v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"


def test_protocol_aborts_before_parsing_a_wrong_name(caplog: pytest.LogCaptureFixture) -> None:
    _ProtoPolicy.set_allowed([KMS_NAME])
    names = tuple(("commonName", f"name-{i}-" + "x" * 100) for i in range(5))
    wrong = {"subject": (names,)}
    calls: list[str] = []
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        protocol = make_protocol(calls)
        transport = FakeTransport(wrong)
        with caplog.at_level(logging.WARNING, logger="xks_proxy.tls"):
            protocol.connection_made(transport)
        assert transport.aborted
        protocol.data_received(REQUEST)
        loop.run_until_complete(asyncio.sleep(0))
        assert calls == [] and transport.written == []
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    (record,) = [r for r in caplog.records if r.name == "xks_proxy.tls"]
    message = record.getMessage()
    assert "192.0.2.7:4711" in message and "(+2 more)" in message
    assert message.count("name-") == 3 and "name-3" not in message
    assert "x" * 70 not in message and "..." in message


@pytest.mark.parametrize(
    ("peercert", "tls_on", "allowed", "reason"),
    [
        (PEERCERT, False, [KMS_NAME], "not TLS"),
        (None, True, [KMS_NAME], "are not allowed"),
        (PEERCERT, True, [], "set_allowed was not called"),
    ],
)
def test_protocol_fails_closed(
    caplog: pytest.LogCaptureFixture,
    peercert: dict[str, Any] | None,
    tls_on: bool,
    allowed: list[str],
    reason: str,
) -> None:
    _ProtoPolicy.set_allowed(allowed)
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        protocol = make_protocol([])
        transport = FakeTransport(peercert, tls=tls_on)
        with caplog.at_level(logging.WARNING, logger="xks_proxy.tls"):
            protocol.connection_made(transport)
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    assert transport.aborted
    assert reason in caplog.text


def test_protocol_lets_an_allowed_name_through() -> None:
    _ProtoPolicy.set_allowed(["alt.example.com"])
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        protocol = make_protocol([])
        transport = FakeTransport(PEERCERT)
        protocol.connection_made(transport)
        assert not transport.aborted
        protocol.connection_lost(None)
    finally:
        asyncio.set_event_loop(None)
        loop.close()


# --------------------------------------------------------------------------- expiry


def write_cert(path: Path, not_after: dt.datetime) -> Path:
    leaf = issue(None, "x", valid_from=dt.timedelta(days=-400), valid_to=not_after - NOW)
    path.write_bytes(leaf.cert_pem)
    return path


def test_certificate_expiry(tmp_path: Path) -> None:
    not_after = dt.datetime(2031, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
    path = write_cert(tmp_path / "c.pem", not_after)
    assert certificate_not_after(path) == not_after
    now = dt.datetime(2031, 4, 6, 7, 8, 9, tzinfo=dt.UTC)
    assert certificate_days_to_expiry(path, now) == pytest.approx(30.0)
    assert certificate_days_to_expiry(path, now.replace(tzinfo=None)) == pytest.approx(30.0)
    later = dt.datetime(2031, 5, 7, 19, 8, 9, tzinfo=dt.UTC)
    assert certificate_days_to_expiry(path, later) == pytest.approx(-1.5)
    assert 0 < certificate_days_to_expiry(path) < 366 * 10
    with pytest.raises(TlsConfigError, match="not found"):
        certificate_days_to_expiry(tmp_path / "missing.pem")


@pytest.mark.parametrize(
    ("days", "level", "text"),
    [(10, logging.WARNING, "expires in"), (-2, logging.ERROR, "expired"), (200, None, "")],
)
def test_build_warns_about_expiry(
    files: Files, caplog: pytest.LogCaptureFixture, days: int, level: int | None, text: str
) -> None:
    leaf = issue(
        ca_parts(files.ca),
        "localhost",
        ["localhost"],
        valid_from=dt.timedelta(days=-30),
        valid_to=dt.timedelta(days=days),
    )
    cert, key = files.root / "c.pem", files.root / "k.pem"
    cert.write_bytes(leaf.cert_pem)
    key.write_bytes(leaf.key_pem())
    with caplog.at_level(logging.INFO, logger="xks_proxy.tls"):
        build_server_context(TlsSettings(cert, key))
    records = [r for r in caplog.records if r.name == "xks_proxy.tls" and r.levelno >= 30]
    if level is None:
        assert records == []
    else:
        assert [r.levelno for r in records] == [level] and text in records[0].getMessage()


# --------------------------------------------------------------------------- demo PKI


def test_demo_pki_files_and_extensions(tmp_path: Path) -> None:
    pki = make_demo_pki(tmp_path / "pki", server_names=("localhost", "127.0.0.1", "xks.test"))
    for path in (pki.ca_key, pki.server_key, pki.client_key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    server_chain = x509.load_pem_x509_certificates(pki.server_cert.read_bytes())
    client = x509.load_pem_x509_certificate(pki.client_cert.read_bytes())
    assert server_chain[1] == ca and len(server_chain) == 2
    server = server_chain[0]

    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert ca.not_valid_after_utc - ca.not_valid_before_utc >= dt.timedelta(days=3650)
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest

    for leaf, usage in (
        (server, ExtendedKeyUsageOID.SERVER_AUTH),
        (client, ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        key = leaf.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
        assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [usage]
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == ca_ski
        leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        assert dt.timedelta(days=365) <= lifetime <= dt.timedelta(days=366)
        leaf.verify_directly_issued_by(ca)

    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "xks.test"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == pki.client_cn
    assert pki.client_cn == KMS_NAME


def test_demo_pki_works_for_tls_and_mtls(tmp_path: Path) -> None:
    pki = make_demo_pki(tmp_path)
    server = build_server_context(pki.tls_settings())
    for hostname in ("localhost", "127.0.0.1"):
        client = ssl.create_default_context(cafile=str(pki.ca_cert))
        client.load_cert_chain(pki.client_cert, pki.client_key)
        pair = Pair(server, client)
        pair.client = client.wrap_bio(pair.c_in, pair.c_out, server_hostname=hostname)
        pair.handshake()
        assert peer_name_allowed(pair.server.getpeercert(), [pki.client_cn])


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_demo_pki_is_reused_while_valid(tmp_path: Path) -> None:
    make_demo_pki(tmp_path)
    before = snapshot(tmp_path)
    make_demo_pki(tmp_path)
    make_demo_pki(tmp_path, now=NOW + dt.timedelta(days=300))
    assert snapshot(tmp_path) == before


def test_demo_pki_renews_leaves_that_expire_within_30_days(tmp_path: Path) -> None:
    make_demo_pki(tmp_path)
    before = snapshot(tmp_path)
    make_demo_pki(tmp_path, now=NOW + dt.timedelta(days=340))
    after = snapshot(tmp_path)
    assert after["ca.pem"] == before["ca.pem"] and after["ca-key.pem"] == before["ca-key.pem"]
    for name in ("server.pem", "server-key.pem", "client.pem", "client-key.pem"):
        assert after[name] != before[name]


def test_demo_pki_renews_what_no_longer_fits(tmp_path: Path) -> None:
    make_demo_pki(tmp_path)
    before = snapshot(tmp_path)
    make_demo_pki(tmp_path, server_names=("localhost", "127.0.0.1", "::1"))
    after = snapshot(tmp_path)
    assert after["server.pem"] != before["server.pem"]
    assert after["client.pem"] == before["client.pem"]
    make_demo_pki(tmp_path, server_names=("localhost", "127.0.0.1", "::1"), client_cn="x.test")
    assert snapshot(tmp_path)["client.pem"] != after["client.pem"]

    (tmp_path / "ca-key.pem").unlink()
    make_demo_pki(tmp_path)
    renewed = snapshot(tmp_path)
    for name in ("ca.pem", "server.pem", "client.pem"):
        assert renewed[name] != before[name]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_tls_module_exports() -> None:
    assert set(tls.__all__) <= set(dir(tls))
