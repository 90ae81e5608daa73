"""The verify callback that turns every refused client certificate into alert 40."""

import ssl

from xks_proxy.server import handshake_alert


def test_installs_only_on_contexts_requiring_client_certificates() -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert handshake_alert.install(context) is False  # CERT_NONE: nothing to verify
    context.verify_mode = ssl.CERT_REQUIRED
    assert handshake_alert.install(context) is True
    assert context.verify_mode == ssl.CERT_REQUIRED  # Python's view is unchanged


def test_the_callback_never_accepts_what_openssl_refused() -> None:
    assert handshake_alert._reject_with_handshake_failure(0, None) == 0
    assert handshake_alert._reject_with_handshake_failure(1, None) == 1
