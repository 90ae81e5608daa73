"""What one Cedar authorization decision costs with cedarpy, done several ways.

    .venv/bin/python bench/authz_cost.py [--calls 10000] [--repeats 5] [--forbids 20]

Every variant decides the same realistic requests (Encrypt/Decrypt/GetKeyMetadata
from 20 principals on 10 keys, a fresh kmsRequestId each) against the same policy
set: the five examples of docs/authorization.md plus ``--forbids`` forbid policies
for blocked principals. Reported: microseconds per decision, best and median of
``--repeats`` runs, single thread. Variants:

  naive            is_authorized(request, policy TEXT, entities LIST): policies and
                   entities parsed again on every call
  policyset        PolicySet parsed once; entities still given as a list per call
  policyset+ents   PolicySet and an Entities handle per key, both parsed once
  +schema          as above, plus a pre-parsed Schema handle (request validation on)
  +projected       as policyset+ents, context cut to the attributes policies read
  batch64          is_authorized_batch, 64 requests per call, per-decision cost
  authorizer-miss  xks_proxy.authz.Authorizer.authorize with its cache off: the
                   full per-request path (context building included) on a miss
  authorizer-hit   Authorizer.authorize with its LRU decision cache on
  build_context    building the context dict alone
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from importlib.metadata import version

import cedarpy

from xks_proxy.authz import SCHEMA, Authorizer, build_context
from xks_proxy.protocol.models import RequestMetadata, XksOperation

ACCOUNT = "111122223333"
OTHER_ACCOUNT = "444455556666"
EXAMPLES = f"""
@id("crypto-from-account")
permit (principal, action in [XKS::Action::"Encrypt", XKS::Action::"Decrypt"], resource)
when {{ context has kmsKeyAccount && context.kmsKeyAccount == "{ACCOUNT}" }};

@id("metadata-from-account")
permit (principal, action == XKS::Action::"GetKeyMetadata", resource)
when {{ context has principalAccount && context.principalAccount == "{ACCOUNT}" }};

@id("not-via-rds")
forbid (principal, action, resource)
when {{ context has kmsViaService && context.kmsViaService == "rds" }};

@id("reader-decrypt-only")
forbid (principal == XKS::Principal::"arn:aws:iam::{ACCOUNT}:role/Reader", action, resource)
unless {{ action == XKS::Action::"Decrypt" }};

@id("crypto-via-vpce")
forbid (principal, action in [XKS::Action::"Encrypt", XKS::Action::"Decrypt"], resource)
when {{ resource.keyStore == "prod" }}
unless {{ context has awsSourceVpce && context.awsSourceVpce == "vpce-0123456789abcdef0" }};
"""


def policy_text(forbids: int) -> str:
    blocked = "".join(
        f'@id("blocked-{i}")\nforbid (principal == '
        f'XKS::Principal::"arn:aws:iam::{OTHER_ACCOUNT}:user/blocked{i}", action, resource);\n'
        for i in range(forbids)
    )
    return EXAMPLES + blocked


def workload(calls: int) -> list[tuple[XksOperation, str, str, RequestMetadata]]:
    operations = [XksOperation.ENCRYPT, XksOperation.DECRYPT, XksOperation.GET_KEY_METADATA]
    requests = []
    for i in range(calls):
        operation = operations[i % 3]
        account = ACCOUNT if i % 5 else OTHER_ACCOUNT
        principal = f"arn:aws:iam::{account}:role/app{i % 20}"
        key_arn = None
        if operation is not XksOperation.GET_KEY_METADATA:
            key_arn = f"arn:aws:kms:us-east-2:{account}:/key/1234abcd-12ab-34cd-56ef-{i % 10:012d}"
        metadata = RequestMetadata(
            kms_request_id=f"4112f4d6-db54-4af4-ae30-{i:012d}",
            kms_operation=operation.value,
            aws_principal_arn=principal,
            kms_key_arn=key_arn,
            kms_via_service="ebs" if i % 2 else None,
            aws_source_vpc="vpc-0123456789abcdef0",
            aws_source_vpce="vpce-0123456789abcdef0",
        )
        requests.append((operation, "prod", f"key-{i % 10}", metadata))
    return requests


def cedar_request(
    operation: XksOperation,
    key_store: str,
    key_id: str,
    context: Mapping[str, object],
    principal: str,
) -> dict[str, object]:
    return {
        "principal": {"type": "XKS::Principal", "id": principal},
        "action": {"type": "XKS::Action", "id": operation.value},
        "resource": {"type": "XKS::Key", "id": f"{key_store}/{key_id}"},
        "context": context,
    }


def key_entity(key_store: str, key_id: str) -> dict[str, object]:
    return {
        "uid": {"type": "XKS::Key", "id": f"{key_store}/{key_id}"},
        "attrs": {"keyStore": key_store, "externalKeyId": key_id},
        "parents": [],
    }


def measure(name: str, run: Callable[[], int], repeats: int) -> tuple[str, float, float]:
    """``run`` makes some decisions and returns how many; µs per decision."""
    run()  # warm up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        decisions = run()
        samples.append((time.perf_counter() - start) / decisions * 1e6)
    return name, min(samples), statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10000, help="decisions per run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--forbids", type=int, default=20, help="extra forbid policies")
    args = parser.parse_args(argv)

    text = policy_text(args.forbids)
    authorizer = Authorizer.from_sources([("bench.cedar", text)])
    uncached = Authorizer.from_sources([("bench.cedar", text)], cache_size=0)
    policy_set = cedarpy.PolicySet.from_str(text)
    schema = cedarpy.Schema.from_str(SCHEMA)
    wanted = authorizer.context_attributes
    assert wanted is not None

    work = workload(args.calls)
    full = []
    projected = []
    entity_lists = []
    for operation, key_store, key_id, metadata in work:
        context = build_context(metadata)
        principal = metadata.aws_principal_arn or ""
        full.append(cedar_request(operation, key_store, key_id, context, principal))
        cut = {k: v for k, v in context.items() if k in wanted}
        projected.append(cedar_request(operation, key_store, key_id, cut, principal))
        entity_lists.append([key_entity(key_store, key_id)])
    handles = {
        key_id: cedarpy.Entities.from_json_str(json.dumps([key_entity("prod", key_id)]))
        for _, _, key_id, _ in work
    }
    handle_for = [handles[key_id] for _, _, key_id, _ in work]

    # All variants must agree (schema variant included) before any is timed.
    expected = [uncached.authorize(*request).allowed for request in work]
    for i in range(0, len(work), max(1, len(work) // 200)):
        assert cedarpy.is_authorized(full[i], text, entity_lists[i]).allowed == expected[i]
        assert cedarpy.is_authorized(projected[i], policy_set, handle_for[i]).allowed == expected[i]
        checked = cedarpy.is_authorized(full[i], policy_set, handle_for[i], schema=schema)
        assert checked.allowed == expected[i], checked.diagnostics.errors
        assert authorizer.authorize(*work[i]).allowed == expected[i]
    allowed = sum(expected)

    n = len(work)

    def naive() -> int:
        for i in range(n):
            cedarpy.is_authorized(full[i], text, entity_lists[i])
        return n

    def policyset() -> int:
        for i in range(n):
            cedarpy.is_authorized(full[i], policy_set, entity_lists[i])
        return n

    def policyset_entities() -> int:
        for i in range(n):
            cedarpy.is_authorized(full[i], policy_set, handle_for[i])
        return n

    def with_schema() -> int:
        for i in range(n):
            cedarpy.is_authorized(full[i], policy_set, handle_for[i], schema=schema)
        return n

    def projected_context() -> int:
        for i in range(n):
            cedarpy.is_authorized(projected[i], policy_set, handle_for[i])
        return n

    def batch64() -> int:
        # One Entities handle for every key: a batch shares one entity set.
        everything = cedarpy.Entities.from_json_str(
            json.dumps([key_entity("prod", key_id) for key_id in handles])
        )
        for start in range(0, n, 64):
            cedarpy.is_authorized_batch(projected[start : start + 64], policy_set, everything)
        return n

    def authorizer_miss() -> int:
        for request in work:
            uncached.authorize(*request)
        return n

    def authorizer_hit() -> int:
        for request in work:
            authorizer.authorize(*request)
        return n

    def context_only() -> int:
        for _, _, _, metadata in work:
            build_context(metadata)
        return n

    naive_calls = max(1, n // 4)

    def naive_quarter() -> int:  # the slow one: fewer calls, same per-call figure
        for i in range(naive_calls):
            cedarpy.is_authorized(full[i], text, entity_lists[i])
        return naive_calls

    del naive
    rows = [
        measure("naive", naive_quarter, args.repeats),
        measure("policyset", policyset, args.repeats),
        measure("policyset+ents", policyset_entities, args.repeats),
        measure("+schema", with_schema, args.repeats),
        measure("+projected", projected_context, args.repeats),
        measure("batch64", batch64, args.repeats),
        measure("authorizer-miss", authorizer_miss, args.repeats),
        measure("authorizer-hit", authorizer_hit, args.repeats),
        measure("build_context", context_only, args.repeats),
    ]
    info = authorizer.cache_info()
    print(
        f"python {platform.python_version()} {platform.machine()}, "
        f"cedarpy {version('cedarpy')}, {os.cpu_count()} CPUs"
    )
    print(
        f"policies: {len(authorizer.policies)} ({len(text)} bytes), "
        f"context attributes read: {', '.join(wanted)}"
    )
    print(f"requests: {n} per run, {allowed} allowed; decision cache {info}")
    print(f"{'variant':<18}{'best µs':>10}{'median µs':>11}{'decisions/s':>14}")
    for name, best, median in rows:
        print(f"{name:<18}{best:>10.1f}{median:>11.1f}{1e6 / median:>14,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
