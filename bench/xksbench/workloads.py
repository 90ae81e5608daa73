"""XKS requests as KMS sends them, SigV4-signed in advance with botocore.

Why pre-signed: signing costs the load generator ~100 us of Python per request, more
than the proxy spends verifying it, and on a 2-core box that CPU comes out of the
proxy's share. So each phase signs a pool of distinct requests (distinct
kmsRequestIds, plaintexts and AADs) just before it starts and the generators replay
the pool cyclically. The proxy accepts a signature for 5 minutes either side of its
X-Amz-Date (spec Appendix A; sigv4.MAX_CLOCK_SKEW_SECONDS) and keeps no replay cache,
so every phase must finish within PHASE_LIMIT_SECONDS of its signing.
"""

from __future__ import annotations

import base64
import http.client
import json
import random
import ssl
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

REGION = "us-east-1"
SERVICE = "kms-xks-proxy"
PRINCIPAL = "arn:aws:iam::123456789012:role/bench-application"
KEY_ARN = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
KEY_ID = "foo"  # DEMO_KEYS: the encrypt+decrypt key
PLAINTEXT_BYTES = 32  # a data key: the case KMS sends most
AAD_BYTES = 40  # KMS's own AAD (ciphertext blob header, encryption context digest)
PHASE_LIMIT_SECONDS = 240.0  # signatures are valid for 300 s; keep a minute's margin

OPERATIONS = ("encrypt", "decrypt", "metadata", "health")
DEFAULT_MIX = {"encrypt": 45.0, "decrypt": 45.0, "metadata": 5.0, "health": 5.0}
WORKLOADS = ("encrypt", "decrypt", "metadata", "health", "mix")


@dataclass(frozen=True, slots=True)
class Target:
    """Where the requests go and who signs them."""

    scheme: str  # http or https
    host: str
    port: int
    uri_prefix: str  # "bench" -> /bench/kms/xks/v1
    access_key_id: str
    secret_access_key: str
    ca_file: str | None = None  # https: the CA to verify the server with

    @property
    def host_header(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def path(self, tail: str) -> str:
        return f"/{self.uri_prefix}/kms/xks/v1/{tail}"

    def connection(self, timeout: float = 10.0) -> http.client.HTTPConnection:
        if self.scheme == "https":
            context = ssl.create_default_context(cafile=self.ca_file)
            return http.client.HTTPSConnection(
                self.host, self.port, timeout=timeout, context=context
            )
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)


@dataclass(frozen=True, slots=True)
class SignedRequest:
    operation: str
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]  # Host first; signed host;x-amz-date like KMS
    body: bytes

    def raw(self) -> bytes:
        """The request as HTTP/1.1 bytes (what the open-loop generator writes)."""
        lines = [f"{self.method} {self.path} HTTP/1.1"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body

    def as_json(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "method": self.method,
            "path": self.path,
            "headers": [list(pair) for pair in self.headers],
            "body": self.body.decode("ascii"),
        }


@dataclass(frozen=True, slots=True)
class Ciphertext:
    """One Encrypt answer (plus its AAD), to build Decrypt requests from."""

    ciphertext: str
    iv: str
    tag: str
    aad: str


def parse_mix(text: str) -> dict[str, float]:
    """``encrypt=45,decrypt=45,metadata=5,health=5`` -> weights."""
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, _, value = part.strip().partition("=")
        if name not in OPERATIONS:
            raise ValueError(f"unknown operation {name!r} in mix (use {', '.join(OPERATIONS)})")
        weights[name] = float(value)
        if weights[name] < 0:
            raise ValueError("mix weights must be >= 0")
    if sum(weights.values()) <= 0:
        raise ValueError("mix weights must add up to more than 0")
    return weights


def workload_weights(workload: str, mix: Mapping[str, float]) -> dict[str, float]:
    if workload == "mix":
        return dict(mix)
    if workload not in OPERATIONS:
        raise ValueError(f"unknown workload {workload!r}")
    return {workload: 1.0}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _metadata(operation: str) -> dict[str, str]:
    return {
        "awsPrincipalArn": PRINCIPAL,
        "kmsKeyArn": KEY_ARN,
        "kmsOperation": operation,
        "kmsRequestId": str(uuid.uuid4()),
        "kmsViaService": "s3",
    }


def request_body(operation: str, rng: random.Random, ciphertext: Ciphertext | None) -> bytes:
    document: dict[str, Any]
    if operation == "encrypt":
        document = {
            "requestMetadata": _metadata("GenerateDataKey"),
            "plaintext": _b64(rng.randbytes(PLAINTEXT_BYTES)),
            "additionalAuthenticatedData": _b64(rng.randbytes(AAD_BYTES)),
            "encryptionAlgorithm": "AES_GCM",
        }
    elif operation == "decrypt":
        assert ciphertext is not None
        document = {
            "requestMetadata": _metadata("Decrypt"),
            "ciphertext": ciphertext.ciphertext,
            "initializationVector": ciphertext.iv,
            "authenticationTag": ciphertext.tag,
            "additionalAuthenticatedData": ciphertext.aad,
            "encryptionAlgorithm": "AES_GCM",
        }
    elif operation == "metadata":
        metadata = _metadata("DescribeKey")
        del metadata["kmsKeyArn"], metadata["kmsViaService"]
        document = {"requestMetadata": metadata}
    elif operation == "health":
        document = {
            "requestMetadata": {"kmsRequestId": str(uuid.uuid4()), "kmsOperation": "KmsHealthCheck"}
        }
    else:
        raise ValueError(operation)
    return json.dumps(document, separators=(",", ":")).encode("ascii")


def request_path(target: Target, operation: str) -> str:
    if operation == "health":
        return target.path("health")
    return target.path(f"keys/{KEY_ID}/{operation}")


class Signer:
    """botocore's SigV4 signer, as the e2e tests use it (an implementation independent
    of the proxy's verifier). Signs Host and X-Amz-Date only, like KMS."""

    def __init__(self, target: Target) -> None:
        from botocore.auth import SigV4Auth
        from botocore.credentials import Credentials

        self.target = target
        self._auth = SigV4Auth(
            Credentials(target.access_key_id, target.secret_access_key), SERVICE, REGION
        )

    def sign(self, operation: str, body: bytes) -> SignedRequest:
        from botocore.awsrequest import AWSRequest

        path = request_path(self.target, operation)
        request = AWSRequest(
            method="POST",
            url=self.target.base_url + path,
            data=body,
            headers={"Host": self.target.host_header},
        )
        self._auth.add_auth(request)
        headers = [(name, str(value)) for name, value in request.headers.items()]
        headers.append(("Content-Type", "application/json"))  # unsigned, as KMS sends it
        return SignedRequest(operation, "POST", path, tuple(headers), body)


def operation_sequence(weights: Mapping[str, float], size: int, rng: random.Random) -> list[str]:
    """``size`` operations in the given proportions (largest remainders), shuffled."""
    total = sum(weights.values())
    exact = {name: size * weight / total for name, weight in weights.items() if weight > 0}
    counts = {name: int(value) for name, value in exact.items()}
    short = size - sum(counts.values())
    for name in sorted(exact, key=lambda n: exact[n] - counts[n], reverse=True)[:short]:
        counts[name] += 1
    sequence = [name for name, count in counts.items() for _ in range(count)]
    rng.shuffle(sequence)
    return sequence


def build_pool(
    target: Target,
    weights: Mapping[str, float],
    size: int,
    ciphertexts: Sequence[Ciphertext],
    seed: int,
) -> list[SignedRequest]:
    """A pool of distinct signed requests (fresh kmsRequestId, data and signature each)."""
    rng = random.Random(seed)
    signer = Signer(target)
    pool = []
    for index, operation in enumerate(operation_sequence(weights, size, rng)):
        ciphertext = ciphertexts[index % len(ciphertexts)] if operation == "decrypt" else None
        if operation == "decrypt" and not ciphertexts:
            raise ValueError("a decrypt workload needs pre-encrypted ciphertexts")
        pool.append(signer.sign(operation, request_body(operation, rng, ciphertext)))
    return pool


def send(target: Target, request: SignedRequest, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send one signed request on a fresh connection (checks and set-up, not load)."""
    connection = target.connection(timeout)
    try:
        connection.request(request.method, request.path, request.body, dict(request.headers))
        reply = connection.getresponse()
        return reply.status, reply.read()
    finally:
        connection.close()


def pre_encrypt(target: Target, count: int, seed: int) -> list[Ciphertext]:
    """Ask the running proxy for ``count`` ciphertexts under KEY_ID (for Decrypt pools)."""
    rng = random.Random(seed)
    signer = Signer(target)
    connection = target.connection()
    result = []
    try:
        for _ in range(count):
            aad = _b64(rng.randbytes(AAD_BYTES))
            document = {
                "requestMetadata": _metadata("GenerateDataKey"),
                "plaintext": _b64(rng.randbytes(PLAINTEXT_BYTES)),
                "additionalAuthenticatedData": aad,
                "encryptionAlgorithm": "AES_GCM",
            }
            request = signer.sign("encrypt", json.dumps(document).encode("ascii"))
            connection.request(request.method, request.path, request.body, dict(request.headers))
            reply = connection.getresponse()
            body = reply.read()
            if reply.status != 200:
                raise RuntimeError(f"pre-encrypt failed: {reply.status} {body[:200]!r}")
            answer = json.loads(body)
            result.append(
                Ciphertext(
                    answer["ciphertext"],
                    answer["initializationVector"],
                    answer["authenticationTag"],
                    aad,
                )
            )
    finally:
        connection.close()
    return result


def check_pool(target: Target, pool: Sequence[SignedRequest]) -> None:
    """Send one request of each operation in the pool; every one must get 200.

    Catches a signing, host or config mistake before a phase reports errors only.
    The requests stay valid for the phase: the proxy keeps no replay cache.
    """
    seen: set[str] = set()
    for request in pool:
        if request.operation in seen:
            continue
        seen.add(request.operation)
        status, body = send(target, request)
        if status != 200:
            raise RuntimeError(
                f"{request.operation} check got HTTP {status} from {target.base_url}: "
                f"{body[:300].decode('utf-8', 'replace')}"
            )
