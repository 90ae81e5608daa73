"""The PKCS#11 ceiling: single-thread AES-256-GCM encrypt ops/s on the bench's token.

    python -m xksbench.hsm --mode bare|manager --module LIB --token-label L \
        --pin-file F --conf SOFTHSM2_CONF [--key foo] [--seconds 3]

``bare``: python-pkcs11 only (``key.encrypt`` with a fresh 12-byte IV and GCMParams).
``manager``: the proxy's adapter, ``Pkcs11KeyManager.encrypt`` (session pool, module
lock, key cache, IV generation, tag split). Same payload as the bench's Encrypt
requests: 32 bytes of plaintext and 40 bytes of AAD. Each mode runs in its own
process so the two never share one initialised module.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from .workloads import AAD_BYTES, PLAINTEXT_BYTES


def measure(operation: Callable[[], Any], seconds: float, warmup: float = 0.3) -> dict[str, Any]:
    """Call ``operation`` in a tight loop; ops/s over ``seconds`` after a warm-up."""
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        operation()
    count = 0
    started = time.perf_counter()
    end = started + seconds
    while True:
        for _ in range(200):
            operation()
        count += 200
        now = time.perf_counter()
        if now >= end:
            break
    elapsed = now - started
    return {
        "ops": count,
        "seconds": round(elapsed, 3),
        "ops_per_s": round(count / elapsed, 1),
        "us_per_op": round(elapsed / count * 1e6, 2),
    }


def bare(args: argparse.Namespace, pin: str) -> dict[str, Any]:
    import pkcs11
    from pkcs11 import Mechanism, ObjectClass
    from pkcs11.mechanisms import GCMParams

    lib = pkcs11.lib(args.module)
    token = lib.get_token(token_label=args.token_label)
    plaintext = os.urandom(PLAINTEXT_BYTES)
    aad = os.urandom(AAD_BYTES)
    with token.open(user_pin=pin) as session:
        key = session.get_key(object_class=ObjectClass.SECRET_KEY, label=args.key)

        def encrypt() -> bytes:
            params = GCMParams(os.urandom(12), aad, 128)
            result: bytes = key.encrypt(
                plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=params
            )
            return result

        assert len(encrypt()) == PLAINTEXT_BYTES + 16
        return measure(encrypt, args.seconds)


def open_key_manager(module: str, token_label: str, pin: str, conf: str) -> Any:
    """The proxy's PKCS#11 adapter on the bench's token, one session."""
    from xks_proxy.keymanager.pkcs11 import Pkcs11KeyManager, Pkcs11Settings
    from xks_proxy.keymanager.softhsm import HEALTH_CHECK_KEY_LABEL

    settings = Pkcs11Settings(
        module_path=module,
        token_label=token_label,
        slot=None,
        pin=pin,
        health_check_key_label=HEALTH_CHECK_KEY_LABEL,
        sessions=1,
        environment={"SOFTHSM2_CONF": conf},
    )
    return Pkcs11KeyManager.open(settings)


def manager(args: argparse.Namespace, pin: str) -> dict[str, Any]:
    key_manager = open_key_manager(args.module, args.token_label, pin, args.conf)
    plaintext = os.urandom(PLAINTEXT_BYTES)
    aad = os.urandom(AAD_BYTES)
    try:
        assert len(key_manager.encrypt(args.key, plaintext, aad).ciphertext) == PLAINTEXT_BYTES
        return measure(lambda: key_manager.encrypt(args.key, plaintext, aad), args.seconds)
    finally:
        key_manager.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("bare", "manager"), required=True)
    parser.add_argument("--module", required=True)
    parser.add_argument("--token-label", required=True)
    parser.add_argument("--pin-file", required=True)
    parser.add_argument("--conf", required=True, help="SOFTHSM2_CONF")
    parser.add_argument("--key", default="foo")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    os.environ["SOFTHSM2_CONF"] = args.conf
    with open(args.pin_file, encoding="utf-8") as handle:
        pin = handle.read().strip()
    result = bare(args, pin) if args.mode == "bare" else manager(args, pin)
    print(json.dumps({"mode": args.mode, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
