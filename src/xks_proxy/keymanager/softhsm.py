"""Provision a SoftHSMv2 token with AES-256 keys, for ``xks-proxy demo`` and the tests.

Idempotent: the configuration file is (re)written, the token is initialised only
if no token carries the label, and only missing keys are created. An existing key
is never regenerated: that would destroy every ciphertext made under it.

Why a subprocess: creating keys needs the PKCS#11 library initialised, and a
process that forks with an initialised library hands its workers a copy of the
library's state they must not use (notes, "Known traps"). The work therefore runs
in a short-lived ``python -m xks_proxy.keymanager.softhsm provision`` child that
reads its request (PINs included) as JSON on stdin, so the calling process never
initialises the library and no PIN of ours appears on a command line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SOFTHSM_MODULE_CANDIDATES: tuple[str, ...] = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
    "/usr/local/opt/softhsm/lib/softhsm/libsofthsm2.so",
)
HEALTH_CHECK_KEY_LABEL = "xks-health-check"
AES_KEY_BYTES = (16, 24, 32)  # key_values may hold any AES size: tests need a non-256-bit key
PROVISION_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True)
class KeySpec:
    """One AES key to create: its label (the external key id) and its usages."""

    label: str
    encrypt: bool
    decrypt: bool


DEMO_KEYS: tuple[KeySpec, ...] = (
    KeySpec("foo", True, True),
    KeySpec("encrypt_only_key", True, False),
    KeySpec("decrypt_only_key", False, True),
    KeySpec("impotent_key", False, False),
)


@dataclass(frozen=True)
class SoftHsmToken:
    """Where a provisioned token lives and how to log in to it."""

    module_path: str
    conf_path: Path
    token_label: str
    pin: str = field(repr=False)

    @property
    def environment(self) -> dict[str, str]:
        """The environment the PKCS#11 module needs (SoftHSM reads it at C_Initialize)."""
        return {"SOFTHSM2_CONF": str(self.conf_path)}

    def files(self) -> Path:
        """The directory of this token's files (SoftHSM's file backend: one directory per
        token under ``tokens/``, its label in ``token.object``)."""
        label = self.token_label.encode("utf-8")
        for directory in (self.conf_path.parent / "tokens").iterdir():
            token_object = directory / "token.object"
            if token_object.is_file() and label in token_object.read_bytes():
                return directory
        raise SoftHsmProvisioningError(f"no files for token {self.token_label!r}")


class SoftHsmProvisioningError(RuntimeError):
    """The token or its keys could not be set up; the message never holds a PIN."""


def find_softhsm_module() -> str | None:
    """Path of an installed libsofthsm2.so, or None."""
    for candidate in SOFTHSM_MODULE_CANDIDATES:
        if Path(candidate).is_file():
            return candidate
    return None


def softhsm_conf_text(token_dir: Path) -> str:
    """A softhsm2.conf keeping tokens in ``token_dir`` with the file backend."""
    return (
        "# Written by xks-proxy; SoftHSMv2 reads it through SOFTHSM2_CONF.\n"
        f"directories.tokendir = {token_dir}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )


def provision_softhsm_token(
    directory: Path,
    *,
    token_label: str,
    pin: str,
    so_pin: str,
    keys: Sequence[KeySpec],
    health_check_key_label: str,
    key_values: Mapping[str, bytes] | None = None,
    module_path: str | None = None,
) -> SoftHsmToken:
    """Write DIR/softhsm2.conf, make sure the token and every key exist; return the token.

    ``key_values`` (tests only) gives some labels a known key value, imported with
    C_CreateObject instead of generated; the key is still sensitive and not extractable.
    """
    module = module_path or find_softhsm_module()
    if module is None:
        raise SoftHsmProvisioningError(
            "libsofthsm2.so not found; install SoftHSMv2 (e.g. apt-get install softhsm2)"
        )
    if shutil.which("softhsm2-util") is None:
        raise SoftHsmProvisioningError("softhsm2-util not found on PATH; install SoftHSMv2")
    specs = [*keys]
    if health_check_key_label not in {spec.label for spec in specs}:
        specs.append(KeySpec(health_check_key_label, True, True))
    labels = [spec.label for spec in specs]
    if len(set(labels)) != len(labels):
        raise ValueError("key labels must be unique")
    values = dict(key_values or {})
    unknown = set(values) - set(labels)
    if unknown:
        raise ValueError(f"key_values names labels not in keys: {sorted(unknown)}")
    for label, value in values.items():
        if len(value) not in AES_KEY_BYTES:
            raise ValueError(f"key value for {label!r} must be 16, 24 or 32 bytes")

    directory = directory.resolve()
    token_dir = directory / "tokens"
    token_dir.mkdir(parents=True, exist_ok=True)
    conf_path = directory / "softhsm2.conf"
    conf_text = softhsm_conf_text(token_dir)
    if not conf_path.exists() or conf_path.read_text() != conf_text:
        staging = conf_path.with_suffix(".conf.tmp")
        staging.write_text(conf_text)
        staging.replace(conf_path)

    request = {
        "module_path": module,
        "token_label": token_label,
        "pin": pin,
        "so_pin": so_pin,
        "keys": [
            {
                "label": spec.label,
                "encrypt": spec.encrypt,
                "decrypt": spec.decrypt,
                "value": values[spec.label].hex() if spec.label in values else None,
            }
            for spec in specs
        ],
    }
    _run_provisioning_child(request, conf_path)
    return SoftHsmToken(module_path=module, conf_path=conf_path, token_label=token_label, pin=pin)


def _run_provisioning_child(request: dict[str, Any], conf_path: Path) -> None:
    source_root = str(Path(__file__).resolve().parents[2])  # .../src, holding xks_proxy
    python_path = os.pathsep.join(p for p in (source_root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, SOFTHSM2_CONF=str(conf_path), PYTHONPATH=python_path)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "xks_proxy.keymanager.softhsm", "provision"],
            input=json.dumps(request),
            env=env,
            capture_output=True,
            text=True,
            timeout=PROVISION_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise SoftHsmProvisioningError("SoftHSM provisioning timed out") from exc
    if done.returncode != 0:
        detail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise SoftHsmProvisioningError(f"SoftHSM provisioning failed: {detail[0]}")


# --------------------------------------------------------------------------------------
# The child process. Everything below runs in `python -m xks_proxy.keymanager.softhsm`.


def _provision_in_this_process(request: Mapping[str, Any]) -> None:
    import pkcs11
    from pkcs11 import Attribute, KeyType, MechanismFlag, ObjectClass, TokenFlag

    module = str(request["module_path"])
    token_label = str(request["token_label"])
    pin = str(request["pin"])

    lib = pkcs11.lib(module)

    def find_token() -> pkcs11.Token | None:
        for slot in lib.get_slots(token_present=True):
            token = slot.get_token()
            if token.label == token_label and token.flags & TokenFlag.TOKEN_INITIALIZED:
                return token
        return None

    token = find_token()
    if token is None:
        # Finalize first: the tool is a separate process, and this one should not fork
        # with an initialised library. SoftHSM rescans its token directory only at
        # C_Initialize, so initialise again afterwards to see the new token.
        lib.finalize()
        _init_token(module, token_label, pin, str(request["so_pin"]))
        lib.initialize()
        token = find_token()
        if token is None:
            raise SoftHsmProvisioningError(f"token {token_label!r} missing after initialisation")

    try:
        session = token.open(user_pin=pin, rw=True)
    except pkcs11.exceptions.PinIncorrect:
        raise SoftHsmProvisioningError(
            f"token {token_label!r} exists but rejected the PIN (CKR_PIN_INCORRECT)"
        ) from None
    try:
        for key in request["keys"]:
            label = str(key["label"])
            search = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label}
            if list(session.get_objects(search)):
                continue  # never regenerate an existing key
            template: dict[Attribute, Any] = {
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.ENCRYPT: bool(key["encrypt"]),
                Attribute.DECRYPT: bool(key["decrypt"]),
                # SoftHSM defaults these to true; XKS keys do GCM and nothing else.
                Attribute.SIGN: False,
                Attribute.VERIFY: False,
                Attribute.WRAP: False,
                Attribute.UNWRAP: False,
                Attribute.DERIVE: False,
            }
            if key["value"] is None:
                session.generate_key(
                    KeyType.AES,
                    256,
                    label=label,
                    store=True,
                    capabilities=MechanismFlag(0),
                    template=template,
                )
            else:
                session.create_object(
                    {
                        **template,
                        Attribute.CLASS: ObjectClass.SECRET_KEY,
                        Attribute.KEY_TYPE: KeyType.AES,
                        Attribute.LABEL: label,
                        Attribute.VALUE: bytes.fromhex(str(key["value"])),
                    }
                )
    finally:
        session.close()
        lib.finalize()


def _init_token(module: str, token_label: str, pin: str, so_pin: str) -> None:
    # softhsm2-util takes the PINs only as arguments (it reads a terminal, not a pipe,
    # when they are missing), so they are briefly visible in the process list. That is
    # acceptable for demo and test tokens; production tokens are provisioned by the
    # operator with the HSM vendor's tools.
    done = subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            token_label,
            "--pin",
            pin,
            "--so-pin",
            so_pin,
            "--module",
            module,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        output = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:]
        reason = output[0] if output else f"exit status {done.returncode}"
        raise SoftHsmProvisioningError(f"softhsm2-util --init-token failed: {reason}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the provisioning child: ``provision`` with a JSON request on stdin."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["provision"]:
        print("usage: python -m xks_proxy.keymanager.softhsm provision < request.json")
        return 2
    try:
        _provision_in_this_process(json.loads(sys.stdin.read()))
    except SoftHsmProvisioningError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except Exception as exc:  # report the failure's kind, never the request (it holds PINs)
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
