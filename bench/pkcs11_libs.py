"""Measure python-pkcs11 against PyKCS11 for the proxy's one hot path: AES-256-GCM in SoftHSM.

Run:  .venv/bin/python bench/pkcs11_libs.py [--ops 20000] [--threads 8] [--stress-ops 2000]

It provisions a throwaway SoftHSMv2 token in a temporary directory (its own
softhsm2.conf and tokendir, via SOFTHSM2_CONF), then runs every measurement in a
fresh subprocess per library so that the two bindings never share one
initialised copy of libsofthsm2 and a crash (segfault) is reported, not fatal.

Measured per library:
  * single-thread encrypt and decrypt ops/s of 32 bytes with 100 bytes AAD and a
    fresh 12-byte IV, including IV generation, parameter construction and the
    tag split, as the adapter's call path does;
  * a stress run: T threads x N encrypt+decrypt round trips, one session per
    thread, every plaintext verified; crashes, exceptions and corruptions counted;
  * quirks: the return value for a bad tag, whether a 16-byte IV works, empty plaintext.

Results are printed as Markdown (for docs/decisions/pkcs11-library.md) and as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
TOKEN_LABEL = "bench"
PIN = "1234"
SO_PIN = "123456"
KEY_LABEL = "bench-aes256"
PLAINTEXT_BYTES = 32
LARGE_PLAINTEXT_BYTES = 4300  # the spec's largest plaintext a proxy must accept
AAD_BYTES = 100
IV_BYTES = 12
TAG_BYTES = 16

# One encrypt (or decrypt) function per library variant, built inside a worker.
EncryptFn = Callable[[bytes, bytes], tuple[bytes, bytes, bytes]]
DecryptFn = Callable[[bytes, bytes, bytes, bytes], bytes]


# --------------------------------------------------------------------------- PyKCS11


class PyKcs11Variant:
    """PyKCS11 through its low-level API: one C_EncryptInit + one C_Encrypt per call.

    The high-level Session.encrypt/decrypt call C_Encrypt twice (size query, then
    data) and refuse empty input; the adapter uses the single-call form measured here.
    """

    def __init__(self, module: str, *, high_level: bool = False) -> None:
        import PyKCS11

        self.pk = PyKCS11
        self.lib = PyKCS11.PyKCS11Lib().load(module)
        self.high_level = high_level
        slots = self.lib.getSlotList(tokenPresent=True)
        self.slot = next(s for s in slots if self.lib.getTokenInfo(s).label.strip() == TOKEN_LABEL)

    def open_session(self) -> Any:
        pk = self.pk
        session = self.lib.openSession(self.slot, pk.CKF_SERIAL_SESSION | pk.CKF_RW_SESSION)
        try:
            session.login(PIN)
        except pk.PyKCS11Error as exc:
            if exc.value != pk.CKR_USER_ALREADY_LOGGED_IN:
                raise
        return session

    def ensure_key(self) -> None:
        pk = self.pk
        session = self.open_session()
        if not session.findObjects([(pk.CKA_LABEL, KEY_LABEL)]):
            session.generateKey(
                [
                    (pk.CKA_CLASS, pk.CKO_SECRET_KEY),
                    (pk.CKA_KEY_TYPE, pk.CKK_AES),
                    (pk.CKA_VALUE_LEN, 32),
                    (pk.CKA_LABEL, KEY_LABEL),
                    (pk.CKA_TOKEN, True),
                    (pk.CKA_PRIVATE, True),
                    (pk.CKA_SENSITIVE, True),
                    (pk.CKA_EXTRACTABLE, False),
                    (pk.CKA_ENCRYPT, True),
                    (pk.CKA_DECRYPT, True),
                ],
                pk.Mechanism(pk.CKM_AES_KEY_GEN),
            )
        session.closeSession()

    def functions(self, session: Any) -> tuple[EncryptFn, DecryptFn]:
        pk = self.pk
        ll = pk.LowLevel
        found = session.findObjects([(pk.CKA_LABEL, KEY_LABEL), (pk.CKA_CLASS, pk.CKO_SECRET_KEY)])
        key = ll.CK_OBJECT_HANDLE()
        key.assign(found[0].value())
        handle = session.session
        low = session.lib

        if self.high_level:

            def encrypt_hl(plaintext: bytes, aad: bytes) -> tuple[bytes, bytes, bytes]:
                iv = os.urandom(IV_BYTES)
                out = bytes(session.encrypt(key, plaintext, pk.AES_GCM_Mechanism(iv, aad, 128)))
                return iv, out[:-TAG_BYTES], out[-TAG_BYTES:]

            def decrypt_hl(ciphertext: bytes, iv: bytes, tag: bytes, aad: bytes) -> bytes:
                mech = pk.AES_GCM_Mechanism(iv, aad, 128)
                return bytes(session.decrypt(key, ciphertext + tag, mech))

            return encrypt_hl, decrypt_hl

        def encrypt(plaintext: bytes, aad: bytes) -> tuple[bytes, bytes, bytes]:
            iv = os.urandom(IV_BYTES)
            # keep the Python mechanism alive: its native struct points into it
            mechanism = pk.AES_GCM_Mechanism(iv, aad, 128)
            rv = low.C_EncryptInit(handle, mechanism.to_native(), key)
            if rv != pk.CKR_OK:
                raise pk.PyKCS11Error(rv)
            out = ll.ckbytelist(len(plaintext) + TAG_BYTES)
            rv = low.C_Encrypt(handle, ll.ckbytelist(plaintext), out)
            if rv != pk.CKR_OK:
                raise pk.PyKCS11Error(rv)
            raw = bytes(out)
            return iv, raw[:-TAG_BYTES], raw[-TAG_BYTES:]

        def decrypt(ciphertext: bytes, iv: bytes, tag: bytes, aad: bytes) -> bytes:
            mechanism = pk.AES_GCM_Mechanism(iv, aad, 128)
            rv = low.C_DecryptInit(handle, mechanism.to_native(), key)
            if rv != pk.CKR_OK:
                raise pk.PyKCS11Error(rv)
            out = ll.ckbytelist(len(ciphertext) + TAG_BYTES)  # SoftHSM wants room for the tag too
            rv = low.C_Decrypt(handle, ll.ckbytelist(ciphertext + tag), out)
            if rv != pk.CKR_OK:
                raise pk.PyKCS11Error(rv)
            return bytes(out)

        return encrypt, decrypt

    def quirks(self) -> dict[str, Any]:
        pk = self.pk
        session = self.open_session()
        encrypt, decrypt = self.functions(session)
        aad = os.urandom(AAD_BYTES)
        iv, ct, tag = encrypt(b"q" * PLAINTEXT_BYTES, aad)
        result: dict[str, Any] = {}
        try:
            decrypt(ct, iv, bytes(a ^ 1 for a in tag), aad)
            result["bad_tag"] = "accepted (!)"
        except pk.PyKCS11Error as exc:
            result["bad_tag"] = pk.CKR[exc.value]
        try:
            iv16 = os.urandom(16)
            found = session.findObjects([(pk.CKA_LABEL, KEY_LABEL)])[0]
            mech = pk.AES_GCM_Mechanism(iv16, aad, 128)
            out = bytes(session.encrypt(found, b"r" * PLAINTEXT_BYTES, mech))
            back = decrypt(out[:-TAG_BYTES], iv16, out[-TAG_BYTES:], aad)
            result["iv16"] = "encrypt+decrypt ok" if back == b"r" * 32 else "wrong plaintext"
        except pk.PyKCS11Error as exc:
            result["iv16"] = pk.CKR[exc.value]
        try:
            found = session.findObjects([(pk.CKA_LABEL, KEY_LABEL)])[0]
            session.encrypt(found, b"", pk.AES_GCM_Mechanism(os.urandom(12), aad, 128))
            result["empty_plaintext_high_level"] = "ok"
        except pk.PyKCS11Error as exc:
            # the wrapper refuses empty input after C_EncryptInit: the operation stays active
            result["empty_plaintext_high_level"] = pk.CKR[exc.value]
        session.closeSession()
        return result


# ----------------------------------------------------------------------- python-pkcs11


class PythonPkcs11Variant:
    """python-pkcs11: SecretKey.encrypt with GCMParams, optionally behind one global lock."""

    def __init__(self, module: str, *, locked: bool) -> None:
        import pkcs11

        self.p11 = pkcs11
        self.lib = pkcs11.lib(module)
        self.token = self.lib.get_token(token_label=TOKEN_LABEL)
        self.lock = threading.Lock() if locked else None
        self.logged_in = False

    def open_session(self) -> Any:
        # Login state is per application, not per session: log in on the first one only.
        if self.logged_in:
            return self.token.open(rw=True)
        self.logged_in = True
        return self.token.open(user_pin=PIN, rw=True)

    def functions(self, session: Any) -> tuple[EncryptFn, DecryptFn]:
        p11 = self.p11
        from pkcs11.mechanisms import GCMParams

        key = session.get_key(label=KEY_LABEL, object_class=p11.ObjectClass.SECRET_KEY)
        mechanism = p11.Mechanism.AES_GCM
        lock = self.lock

        def encrypt(plaintext: bytes, aad: bytes) -> tuple[bytes, bytes, bytes]:
            iv = os.urandom(IV_BYTES)
            params = GCMParams(iv, aad, 128)
            if lock is None:
                out = key.encrypt(plaintext, mechanism=mechanism, mechanism_param=params)
            else:
                with lock:
                    out = key.encrypt(plaintext, mechanism=mechanism, mechanism_param=params)
            return iv, out[:-TAG_BYTES], out[-TAG_BYTES:]

        def decrypt(ciphertext: bytes, iv: bytes, tag: bytes, aad: bytes) -> bytes:
            params = GCMParams(iv, aad, 128)
            if lock is None:
                return bytes(
                    key.decrypt(ciphertext + tag, mechanism=mechanism, mechanism_param=params)
                )
            with lock:
                return bytes(
                    key.decrypt(ciphertext + tag, mechanism=mechanism, mechanism_param=params)
                )

        return encrypt, decrypt

    def quirks(self) -> dict[str, Any]:
        from pkcs11.mechanisms import GCMParams

        session = self.open_session()
        encrypt, decrypt = self.functions(session)
        aad = os.urandom(AAD_BYTES)
        iv, ct, tag = encrypt(b"q" * PLAINTEXT_BYTES, aad)
        result: dict[str, Any] = {}
        try:
            decrypt(ct, iv, bytes(a ^ 1 for a in tag), aad)
            result["bad_tag"] = "accepted (!)"
        except self.p11.PKCS11Error as exc:
            result["bad_tag"] = type(exc).__name__
        try:
            GCMParams(os.urandom(16), aad, 128)
            result["iv16"] = "GCMParams accepts 16 bytes"
        except Exception as exc:
            result["iv16"] = f"GCMParams refuses ({exc})"

            # The Cython layer only checks isinstance(param, GCMParams): a subclass
            # that skips the length check gets a 16-byte IV through.
            class LongIvGcmParams(GCMParams):
                def __init__(self, nonce: bytes, aad: bytes) -> None:
                    self.nonce, self.aad, self.tag_bits = nonce, aad, 128

            key = session.get_key(label=KEY_LABEL, object_class=self.p11.ObjectClass.SECRET_KEY)
            iv16 = os.urandom(16)
            params = LongIvGcmParams(iv16, aad)
            mech = self.p11.Mechanism.AES_GCM
            out = key.encrypt(b"r" * 32, mechanism=mech, mechanism_param=params)
            back = key.decrypt(out, mechanism=mech, mechanism_param=params)
            result["iv16"] += "; via subclass: " + ("ok" if back == b"r" * 32 else "wrong")
        try:
            encrypt(b"", aad)
            result["empty_plaintext_high_level"] = "ok"
        except Exception as exc:
            result["empty_plaintext_high_level"] = type(exc).__name__
        session.close()
        return result


# ------------------------------------------------------------------ the adapter itself


class AdapterVariant:
    """xks_proxy's Pkcs11KeyManager (python-pkcs11 + module lock + pool of 4 sessions).

    Measures the whole adapter call path; every thread shares the one pool, as the
    proxy's worker threads do.
    """

    def __init__(self, module: str) -> None:
        from xks_proxy.keymanager.pkcs11 import Pkcs11KeyManager, Pkcs11Settings

        self.manager = Pkcs11KeyManager.open(
            Pkcs11Settings(
                module_path=module,
                token_label=TOKEN_LABEL,
                slot=None,
                pin=PIN,
                health_check_key_label=KEY_LABEL,
                sessions=4,
                environment={"SOFTHSM2_CONF": os.environ["SOFTHSM2_CONF"]},
            )
        )

    def open_session(self) -> Any:
        return None  # the adapter lends its own pooled sessions

    def functions(self, session: Any) -> tuple[EncryptFn, DecryptFn]:
        manager = self.manager

        def encrypt(plaintext: bytes, aad: bytes) -> tuple[bytes, bytes, bytes]:
            sealed = manager.encrypt(KEY_LABEL, plaintext, aad)
            return sealed.iv, sealed.ciphertext, sealed.tag

        def decrypt(ciphertext: bytes, iv: bytes, tag: bytes, aad: bytes) -> bytes:
            return manager.decrypt(KEY_LABEL, ciphertext, iv, tag, aad)

        return encrypt, decrypt

    def quirks(self) -> dict[str, Any]:
        encrypt, decrypt = self.functions(None)
        aad = os.urandom(AAD_BYTES)
        iv, ct, tag = encrypt(b"q" * PLAINTEXT_BYTES, aad)
        result: dict[str, Any] = {}
        for name, bad_iv, bad_tag in (
            ("bad_tag", iv, bytes(a ^ 1 for a in tag)),
            ("iv16", os.urandom(16), tag),
        ):
            try:
                decrypt(ct, bad_iv, bad_tag, aad)
                result[name] = "accepted (!)"
            except Exception as exc:
                result[name] = type(exc).__name__
        result["iv16"] = f"accepted; wrong 16-byte IV -> {result['iv16']}"
        iv0, ct0, tag0 = encrypt(b"", aad)
        result["empty_plaintext_high_level"] = "ok" if decrypt(ct0, iv0, tag0, aad) == b"" else "!"
        return result


Variant = PyKcs11Variant | PythonPkcs11Variant | AdapterVariant
VARIANTS = ("pykcs11", "pykcs11-highlevel", "python-pkcs11", "python-pkcs11+lock", "xks-adapter")


def make_variant(name: str, module: str) -> Variant:
    if name == "pykcs11":
        return PyKcs11Variant(module)
    if name == "pykcs11-highlevel":
        return PyKcs11Variant(module, high_level=True)
    if name == "python-pkcs11":
        return PythonPkcs11Variant(module, locked=False)
    if name == "python-pkcs11+lock":
        return PythonPkcs11Variant(module, locked=True)
    if name == "xks-adapter":
        return AdapterVariant(module)
    raise SystemExit(f"unknown variant {name}")


# ---------------------------------------------------------------------------- workers


def worker_single(variant: Variant, ops: int, size: int = PLAINTEXT_BYTES) -> dict[str, Any]:
    session = variant.open_session()
    encrypt, decrypt = variant.functions(session)
    plaintext = os.urandom(size)
    aad = os.urandom(AAD_BYTES)
    for _ in range(200):  # warm-up
        encrypt(plaintext, aad)
    start = time.perf_counter()
    for _ in range(ops):
        encrypt(plaintext, aad)
    enc_s = time.perf_counter() - start
    iv, ct, tag = encrypt(plaintext, aad)
    start = time.perf_counter()
    for _ in range(ops):
        decrypt(ct, iv, tag, aad)
    dec_s = time.perf_counter() - start
    if decrypt(ct, iv, tag, aad) != plaintext:
        raise SystemExit("round trip failed")
    return {
        "encrypt_ops_s": round(ops / enc_s),
        "decrypt_ops_s": round(ops / dec_s),
        "encrypt_us": round(enc_s / ops * 1e6, 1),
        "decrypt_us": round(dec_s / ops * 1e6, 1),
    }


def worker_stress(variant: Variant, threads: int, ops: int) -> dict[str, Any]:
    sessions = [variant.open_session() for _ in range(threads)]
    functions = [variant.functions(s) for s in sessions]
    errors: list[str] = []
    mismatches = [0] * threads
    barrier = threading.Barrier(threads + 1)

    def run(index: int) -> None:
        encrypt, decrypt = functions[index]
        barrier.wait()
        for _ in range(ops):
            plaintext = os.urandom(PLAINTEXT_BYTES)
            aad = os.urandom(AAD_BYTES)
            try:
                iv, ct, tag = encrypt(plaintext, aad)
                if decrypt(ct, iv, tag, aad) != plaintext:
                    mismatches[index] += 1
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in pool:
        thread.join()
    elapsed = time.perf_counter() - start
    return {
        "round_trips": threads * ops,
        "round_trips_s": round(threads * ops / elapsed),
        "mismatches": sum(mismatches),
        "exceptions": len(errors),
        "first_exceptions": sorted(set(errors))[:3],
    }


def worker_main(args: argparse.Namespace) -> None:
    variant = make_variant(args.worker, args.module)
    if args.scenario == "setup":
        assert isinstance(variant, PyKcs11Variant)
        variant.ensure_key()
        result: dict[str, Any] = {"ok": True}
    elif args.scenario == "single":
        result = worker_single(variant, args.ops)
    elif args.scenario == "large":
        result = worker_single(variant, max(args.ops // 20, 100), LARGE_PLAINTEXT_BYTES)
    elif args.scenario == "stress":
        result = worker_stress(variant, args.threads, args.stress_ops)
    else:
        result = variant.quirks()
    print(json.dumps(result))


# ------------------------------------------------------------------------------ main


def run_worker(
    variant: str, scenario: str, args: argparse.Namespace, env: dict[str, str]
) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        "--scenario",
        scenario,
        "--module",
        args.module,
        "--ops",
        str(args.ops),
        "--threads",
        str(args.threads),
        "--stress-ops",
        str(args.stress_ops),
    ]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return {"failed": "timed out (deadlock?)"}
    if done.returncode != 0:
        how = (
            f"killed by signal {-done.returncode}"
            if done.returncode < 0
            else f"exit {done.returncode}"
        )
        tail = done.stderr.strip().splitlines()[-1:] if done.stderr.strip() else []
        return {"failed": how + (f": {tail[0]}" if tail else "")}
    parsed: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return parsed


def provision(directory: Path, module: str) -> dict[str, str]:
    tokens = directory / "tokens"
    tokens.mkdir()
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    env = dict(os.environ, SOFTHSM2_CONF=str(conf))
    # Throwaway token: PINs on the command line are fine here.
    subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            TOKEN_LABEL,
            "--pin",
            PIN,
            "--so-pin",
            SO_PIN,
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=20000, help="single-thread ops per measurement")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--stress-ops", type=int, default=2000, help="round trips per thread")
    parser.add_argument("--stress-repeats", type=int, default=3)
    parser.add_argument(
        "--module", default=next((m for m in MODULE_CANDIDATES if Path(m).exists()), "")
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--scenario", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return
    if not args.module or shutil.which("softhsm2-util") is None:
        raise SystemExit("SoftHSMv2 (libsofthsm2.so and softhsm2-util) is required")

    report: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": f"{platform.machine()} x{os.cpu_count()}",
        "softhsm": subprocess.run(
            ["softhsm2-util", "--version"], capture_output=True, text=True, check=False
        ).stdout.strip(),
        "module": args.module,
        "ops": args.ops,
        "threads": args.threads,
        "stress_ops": args.stress_ops,
        "results": {},
    }
    with tempfile.TemporaryDirectory(prefix="xks-bench-") as tmp:
        env = provision(Path(tmp), args.module)
        setup = run_worker("pykcs11", "setup", args, env)
        if "failed" in setup:
            raise SystemExit(f"key setup failed: {setup['failed']}")
        for variant in VARIANTS:
            entry: dict[str, Any] = {
                "single": run_worker(variant, "single", args, env),
                "large": run_worker(variant, "large", args, env),
                "stress": [
                    run_worker(variant, "stress", args, env) for _ in range(args.stress_repeats)
                ],
                "quirks": run_worker(variant, "quirks", args, env),
            }
            report["results"][variant] = entry
            print(f"# {variant}: {json.dumps(entry)}", file=sys.stderr)
    print_markdown(report)
    print("\n```json\n" + json.dumps(report, indent=1) + "\n```")


def print_markdown(report: dict[str, Any]) -> None:
    print(
        f"Python {report['python']}, {report['machine']}, SoftHSM {report['softhsm']}; "
        f"{AAD_BYTES} B AAD, {IV_BYTES} B random IV; {report['ops']} ops single-threaded "
        f"({PLAINTEXT_BYTES} B plaintext) and {max(report['ops'] // 20, 100)} ops "
        f"({LARGE_PLAINTEXT_BYTES} B); stress {report['threads']} threads x "
        f"{report['stress_ops']} encrypt+decrypt round trips of {PLAINTEXT_BYTES} B, "
        "one session per thread, every plaintext checked.\n"
    )
    print(
        f"| variant | encrypt ops/s ({PLAINTEXT_BYTES} B) | decrypt ops/s ({PLAINTEXT_BYTES} B) "
        f"| encrypt ops/s ({LARGE_PLAINTEXT_BYTES} B) | decrypt ops/s ({LARGE_PLAINTEXT_BYTES} B) "
        "| stress round trips/s | stress outcome (per run) |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for variant, entry in report["results"].items():
        single, large = entry["single"], entry["large"]
        outcomes = []
        rates = []
        for run in entry["stress"]:
            if "failed" in run:
                outcomes.append(run["failed"])
                continue
            rates.append(run["round_trips_s"])
            if run["mismatches"] + run["exceptions"] == 0:
                outcomes.append("ok")
            else:
                first = "; ".join(run["first_exceptions"])
                outcomes.append(
                    f"{run['mismatches']} wrong plaintexts, {run['exceptions']} exceptions"
                    + (f" ({first})" if first else "")
                )
        print(
            f"| {variant} | {single.get('encrypt_ops_s', single.get('failed'))} "
            f"| {single.get('decrypt_ops_s', '-')} "
            f"| {large.get('encrypt_ops_s', large.get('failed'))} "
            f"| {large.get('decrypt_ops_s', '-')} "
            f"| {max(rates) if rates else '-'} | {' / '.join(outcomes)} |"
        )
    print("\n| variant | bad tag reported as | 16-byte IV | empty plaintext (library's own call) |")
    print("|---|---|---|---|")
    for variant, entry in report["results"].items():
        quirks = entry["quirks"]
        print(
            f"| {variant} | {quirks.get('bad_tag', quirks.get('failed'))} "
            f"| {quirks.get('iv16', '-')} | {quirks.get('empty_plaintext_high_level', '-')} |"
        )


if __name__ == "__main__":
    main()
