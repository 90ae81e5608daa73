"""Secondary authorization with Cedar (spec: Authorization, Logging, Appendix B).

The example policies below are the ones docs/authorization.md shows; a test checks
that each appears there verbatim.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cedarpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xks_proxy import authz
from xks_proxy.authz import (
    Authorizer,
    Decision,
    PolicyError,
    build_context,
    check_request_file,
    explain,
    log_fields,
    metadata_from_json,
)
from xks_proxy.protocol.models import RequestMetadata, XksOperation

ENCRYPT = XksOperation.ENCRYPT
DECRYPT = XksOperation.DECRYPT
METADATA = XksOperation.GET_KEY_METADATA

ACCOUNT = "111122223333"
OTHER = "444455556666"
ALICE = f"arn:aws:iam::{ACCOUNT}:user/Alice"
MALLORY = f"arn:aws:iam::{ACCOUNT}:user/Mallory"
READER = f"arn:aws:iam::{ACCOUNT}:role/Reader"
BOB = f"arn:aws:iam::{OTHER}:user/Bob"
VPCE = "vpce-0123456789abcdef0"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "authorization.md"


def key_arn(account: str = ACCOUNT, region: str = "us-east-2") -> str:
    return f"arn:aws:kms:{region}:{account}:/key/1234abcd-12ab-34cd-56ef-1234567890ab"


def md(
    operation: XksOperation = ENCRYPT,
    principal: str | None = ALICE,
    key: str | None = "default",
    **fields: Any,
) -> RequestMetadata:
    """requestMetadata as the service parses it; key="default" means key_arn()."""
    extra = fields.pop("extra", {})
    if key == "default":
        key = None if operation is METADATA else key_arn()
    return RequestMetadata(
        kms_request_id=fields.pop("request_id", "4112f4d6-db54-4af4-ae30-c55a22a8dfae"),
        kms_operation=fields.pop(
            "kms_operation", "CreateKey" if operation is METADATA else "Encrypt"
        ),
        aws_principal_arn=principal,
        kms_key_arn=key,
        extra=extra,
        **fields,
    )


def load(text: str, name: str = "policies.cedar", **kwargs: Any) -> Authorizer:
    return Authorizer.from_sources([(name, text)], **kwargs)


# --- the documented examples --------------------------------------------------------

KEY_ACCOUNT = """\
@id("crypto-only-from-key-account")
permit (
  principal,
  action in [XKS::Action::"Encrypt", XKS::Action::"Decrypt"],
  resource
)
when { context has kmsKeyAccount && context.kmsKeyAccount == "111122223333" };

@id("create-only-by-account")
permit (principal, action == XKS::Action::"GetKeyMetadata", resource)
when { context has principalAccount && context.principalAccount == "111122223333" };
"""

VIA_EBS = """\
@id("crypto-only-via-ebs")
permit (
  principal,
  action in [XKS::Action::"Encrypt", XKS::Action::"Decrypt"],
  resource
)
when { context has kmsViaService && context.kmsViaService == "ebs" };

@id("metadata-for-anyone")
permit (principal, action == XKS::Action::"GetKeyMetadata", resource);
"""

READER_DECRYPT = """\
@id("reader-role-may-decrypt")
permit (
  principal == XKS::Principal::"arn:aws:iam::111122223333:role/Reader",
  action == XKS::Action::"Decrypt",
  resource
);
"""

BLOCK_PRINCIPAL = """\
@id("allow-everyone")
permit (principal, action, resource);

@id("block-mallory")
forbid (
  principal == XKS::Principal::"arn:aws:iam::111122223333:user/Mallory",
  action,
  resource
);
"""

VPC_ENDPOINT = """\
@id("allow-everyone")
permit (principal, action, resource);

@id("crypto-only-through-vpce")
forbid (
  principal,
  action in [XKS::Action::"Encrypt", XKS::Action::"Decrypt"],
  resource
)
unless {
  context has awsSourceVpce && context.awsSourceVpce == "vpce-0123456789abcdef0"
};
"""

PROD_KEY_STORE = """\
@id("allow-everyone")
permit (principal, action, resource);

@id("prod-only-for-prod-account")
forbid (principal, action, resource)
when { resource.keyStore == "prod" }
unless { context has principalAccount && context.principalAccount == "111122223333" };
"""

FUTURE_FIELD = """\
@id("allow-everyone")
permit (principal, action, resource);

@id("decrypt-needs-corporate-identity")
forbid (principal, action == XKS::Action::"Decrypt", resource)
unless { context has sourceIdentity && context.sourceIdentity like "*@example.com" };
"""

EXAMPLES = {
    "key-account": KEY_ACCOUNT,
    "via-ebs": VIA_EBS,
    "reader-decrypt": READER_DECRYPT,
    "block-principal": BLOCK_PRINCIPAL,
    "vpc-endpoint": VPC_ENDPOINT,
    "prod-key-store": PROD_KEY_STORE,
    "future-field": FUTURE_FIELD,
}

# (example, operation, key store, metadata, allowed, policy ids)
CASES: list[tuple[str, XksOperation, str, RequestMetadata, bool, tuple[str, ...]]] = [
    # (1) usable only from one account: the KMS key's account for crypto ...
    ("key-account", ENCRYPT, "prod", md(), True, ("crypto-only-from-key-account",)),
    ("key-account", DECRYPT, "prod", md(DECRYPT), True, ("crypto-only-from-key-account",)),
    # ... Bob's KMS key in another account over the same external key is refused
    ("key-account", DECRYPT, "prod", md(DECRYPT, BOB, key_arn(OTHER)), False, ()),
    ("key-account", ENCRYPT, "prod", md(key="arn:aws:kms:us-east-2:bad"), False, ()),
    # ... and the caller's account for GetKeyMetadata (CreateKey has no kmsKeyArn)
    ("key-account", METADATA, "prod", md(METADATA), True, ("create-only-by-account",)),
    ("key-account", METADATA, "prod", md(METADATA, BOB), False, ()),
    ("key-account", METADATA, "prod", md(METADATA, "AWS Internal"), False, ()),
    # (2) only via EBS
    ("via-ebs", ENCRYPT, "prod", md(kms_via_service="ebs"), True, ("crypto-only-via-ebs",)),
    (
        "via-ebs",
        DECRYPT,
        "prod",
        md(DECRYPT, kms_via_service="ebs"),
        True,
        ("crypto-only-via-ebs",),
    ),
    ("via-ebs", ENCRYPT, "prod", md(kms_via_service="rds"), False, ()),
    ("via-ebs", DECRYPT, "prod", md(DECRYPT), False, ()),
    ("via-ebs", METADATA, "prod", md(METADATA), True, ("metadata-for-anyone",)),
    # (3) only Decrypt, only for one role
    ("reader-decrypt", DECRYPT, "prod", md(DECRYPT, READER), True, ("reader-role-may-decrypt",)),
    ("reader-decrypt", ENCRYPT, "prod", md(ENCRYPT, READER), False, ()),
    ("reader-decrypt", METADATA, "prod", md(METADATA, READER), False, ()),
    ("reader-decrypt", DECRYPT, "prod", md(DECRYPT, ALICE), False, ()),
    ("reader-decrypt", DECRYPT, "prod", md(DECRYPT, READER + "2"), False, ()),
    # (4) one principal denied everywhere
    ("block-principal", ENCRYPT, "prod", md(principal=MALLORY), False, ("block-mallory",)),
    ("block-principal", DECRYPT, "dev", md(DECRYPT, MALLORY), False, ("block-mallory",)),
    ("block-principal", METADATA, "prod", md(METADATA, MALLORY), False, ("block-mallory",)),
    ("block-principal", ENCRYPT, "prod", md(), True, ("allow-everyone",)),
    # (5) crypto only through one VPC endpoint
    ("vpc-endpoint", ENCRYPT, "prod", md(aws_source_vpce=VPCE), True, ("allow-everyone",)),
    (
        "vpc-endpoint",
        DECRYPT,
        "prod",
        md(DECRYPT, aws_source_vpc="vpc-1", aws_source_vpce="vpce-1"),
        False,
        ("crypto-only-through-vpce",),
    ),
    ("vpc-endpoint", ENCRYPT, "prod", md(), False, ("crypto-only-through-vpce",)),
    ("vpc-endpoint", METADATA, "prod", md(METADATA), True, ("allow-everyone",)),
    # resource attributes: one file shared by several key stores
    ("prod-key-store", ENCRYPT, "prod", md(), True, ("allow-everyone",)),
    ("prod-key-store", ENCRYPT, "prod", md(principal=BOB), False, ("prod-only-for-prod-account",)),
    ("prod-key-store", ENCRYPT, "dev", md(principal=BOB), True, ("allow-everyone",)),
    # a metadata field KMS may add later, used before this proxy knows its name
    (
        "future-field",
        DECRYPT,
        "prod",
        md(DECRYPT, extra={"sourceIdentity": "alice@example.com"}),
        True,
        ("allow-everyone",),
    ),
    (
        "future-field",
        DECRYPT,
        "prod",
        md(DECRYPT, extra={"sourceIdentity": "mallory@evil.test"}),
        False,
        ("decrypt-needs-corporate-identity",),
    ),
    ("future-field", DECRYPT, "prod", md(DECRYPT), False, ("decrypt-needs-corporate-identity",)),
    ("future-field", ENCRYPT, "prod", md(), True, ("allow-everyone",)),
]


@pytest.mark.parametrize(
    ("example", "operation", "key_store", "metadata", "allowed", "policy_ids"),
    CASES,
    ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)],
)
def test_documented_examples(
    example: str,
    operation: XksOperation,
    key_store: str,
    metadata: RequestMetadata,
    allowed: bool,
    policy_ids: tuple[str, ...],
) -> None:
    decision = load(EXAMPLES[example]).authorize(operation, key_store, "key-1", metadata)
    assert decision == Decision(allowed, policy_ids, ())


def test_every_example_is_in_the_docs_verbatim() -> None:
    docs = DOCS.read_text(encoding="utf-8")
    for name, text in EXAMPLES.items():
        assert text in docs, f"example {name} differs from docs/authorization.md"


def test_every_example_has_both_outcomes() -> None:
    for name in EXAMPLES:
        outcomes = {case[4] for case in CASES if case[0] == name}
        assert outcomes == {True, False}, name


def test_examples_load_from_files(tmp_path: Path) -> None:
    paths = []
    for name, text in EXAMPLES.items():
        path = tmp_path / f"{name}.cedar"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    for path in paths:
        assert Authorizer.from_files([path]).policies


# --- loading and policy errors ----------------------------------------------------


def test_policy_ids_default_to_file_and_index(tmp_path: Path) -> None:
    first = tmp_path / "first.cedar"
    first.write_text(
        "// blocked callers\n"
        f'forbid (principal == XKS::Principal::"{MALLORY}", action, resource);\n'
        '@id("everyone") permit (principal, action, resource);\n'
        'permit (principal, action == XKS::Action::"Decrypt", resource);\n'
    )
    second = tmp_path / "second.cedar"
    second.write_text('@id("") permit (principal, action, resource);\n')
    authorizer = Authorizer.from_files([first, second])
    assert [(p.id, p.effect, p.index, p.line) for p in authorizer.policies] == [
        (f"{first}:0", "forbid", 0, 2),
        ("everyone", "permit", 1, 3),
        (f"{first}:2", "permit", 2, 4),
        (f"{second}:0", "permit", 0, 1),
    ]
    denied = authorizer.authorize(DECRYPT, "ks", "k", md(DECRYPT, MALLORY))
    assert denied == Decision(False, (f"{first}:0",), ())
    allowed = authorizer.authorize(DECRYPT, "ks", "k", md(DECRYPT))
    assert allowed == Decision(True, ("everyone", f"{first}:2", f"{second}:0"), ())


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.cedar"
    path.write_text(
        '@id("ok")\npermit (principal, action, resource);\n\n'
        "// the next one is broken; the semicolon in this comment is not an end\n"
        'permit (principal, action, resource)\n  when { context.kmsOperation == "a;b" &&  };\n'
    )
    with pytest.raises(PolicyError) as caught:
        Authorizer.from_files([path])
    assert caught.value.path == str(path)
    assert caught.value.line == 5
    assert str(caught.value).startswith(f"{path}:5: syntax error in policy #1: ")


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("permit (principal, action, resource)", 1, "syntax error"),
        ("permit (principal, acton, resource);", 1, "acton"),
        ('\n\npermit (principal, action, resource) when { "unterminated };', 3, "syntax"),
        ("permit (principal == ?principal, action, resource);", 1, "templates"),
        # schema: misspelt attribute, unguarded optional attribute, unknown action/type
        (
            'permit (principal, action, resource) when { context.kmsViaServce == "ebs" };',
            1,
            "kmsViaServce",
        ),
        (
            'permit (principal, action, resource) when { context.kmsViaService == "ebs" };',
            1,
            "context has",
        ),
        ('\npermit (principal, action == XKS::Action::"Sign", resource);', 2, "Sign"),
        ('permit (principal == XKS::User::"x", action, resource);', 1, "XKS::User"),
        ("permit (principal, action, resource) when { resource.keyStore == 1 };", 1, "Long"),
        # kmsKeyArn is absent from GetKeyMetadata requests: it must be guarded there
        (
            'permit (principal, action, resource) when { context.kmsKeyArn like "*" };',
            1,
            "kmsKeyArn",
        ),
    ],
)
def test_bad_policies_raise_policy_error(text: str, line: int, fragment: str) -> None:
    with pytest.raises(PolicyError) as caught:
        load(text, name="bad.cedar")
    assert caught.value.path == "bad.cedar"
    assert caught.value.line == line
    assert str(caught.value).startswith(f"bad.cedar:{line}: ")
    assert fragment in str(caught.value)


def test_kms_key_arn_needs_no_guard_for_crypto_only_policies() -> None:
    text = (
        'permit (principal, action in [XKS::Action::"Encrypt", XKS::Action::"Decrypt"], '
        'resource) when { context.kmsKeyArn like "*:111122223333:*" };'
    )
    authorizer = load(text)
    assert authorizer.authorize(ENCRYPT, "ks", "k", md()).allowed
    assert not authorizer.authorize(ENCRYPT, "ks", "k", md(key=key_arn(OTHER))).allowed


def test_duplicate_ids_across_files_are_refused() -> None:
    with pytest.raises(
        PolicyError, match=r"b\.cedar:2: duplicate policy id 'x' \(also at a\.cedar:1\)"
    ):
        Authorizer.from_sources(
            [
                ("a.cedar", '@id("x") permit (principal, action, resource);'),
                ("b.cedar", '\n@id("x") forbid (principal, action, resource);'),
            ]
        )


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.cedar"
    with pytest.raises(PolicyError, match=r"missing\.cedar: cannot read policy file"):
        Authorizer.from_files([missing])
    binary = tmp_path / "binary.cedar"
    binary.write_bytes(b"\xff\xfe permit")
    with pytest.raises(PolicyError, match=r"binary\.cedar: policy file is not UTF-8"):
        Authorizer.from_files([binary])


def test_no_files_is_an_error_not_deny_all() -> None:
    with pytest.raises(PolicyError):
        Authorizer.from_files([])


def test_a_file_without_policies_denies_everything() -> None:
    authorizer = load("// nothing here yet\n")
    assert authorizer.authorize(ENCRYPT, "ks", "k", md()) == Decision(False, (), ())


def test_split_policies_ignores_semicolons_in_strings_and_comments() -> None:
    text = (
        "// a; b\n"
        '@id("x;y") permit (principal, action, resource)\n'
        '  when { context.kmsOperation == "a\\";b" };\n'
        "\n"
        "forbid (principal, action, resource); // trailing; comment\n"
        "  permit"
    )
    chunks = authz._split_policies(text)
    assert [line for line, _ in chunks] == [2, 5, 6]
    assert chunks[1][1].strip() == "forbid (principal, action, resource);"


# --- the context ----------------------------------------------------------------------


def test_context_has_metadata_and_derived_fields_only_when_present() -> None:
    full = md(
        kms_via_service="ebs",
        aws_source_vpc="vpc-1",
        aws_source_vpce="vpce-1",
        key="arn:aws:kms:eu-west-1:111122223333:key/1234",
    )
    assert build_context(full) == {
        "kmsRequestId": "4112f4d6-db54-4af4-ae30-c55a22a8dfae",
        "kmsOperation": "Encrypt",
        "awsPrincipalArn": ALICE,
        "kmsKeyArn": "arn:aws:kms:eu-west-1:111122223333:key/1234",
        "kmsViaService": "ebs",
        "awsSourceVpc": "vpc-1",
        "awsSourceVpce": "vpce-1",
        "kmsKeyRegion": "eu-west-1",
        "kmsKeyAccount": ACCOUNT,
        "principalAccount": ACCOUNT,
    }
    minimal = RequestMetadata(kms_request_id="r", kms_operation="CreateKey")
    assert build_context(minimal) == {"kmsRequestId": "r", "kmsOperation": "CreateKey"}


@pytest.mark.parametrize(
    ("arn", "derived"),
    [
        (key_arn(), {"kmsKeyRegion": "us-east-2", "kmsKeyAccount": ACCOUNT}),  # spec's ":/key/"
        (
            "arn:aws:kms:us-east-2:111122223333:key/k",
            {"kmsKeyRegion": "us-east-2", "kmsKeyAccount": ACCOUNT},
        ),
        (
            "arn:aws-cn:kms:cn-north-1:111122223333:key/k",
            {"kmsKeyRegion": "cn-north-1", "kmsKeyAccount": ACCOUNT},
        ),
        ("arn:aws:kms:us-east-2:1111:key/k", {}),
        ("arn:aws:kms:us-east-2:111122223333:alias/k", {}),
        ("not an arn", {}),
    ],
)
def test_key_arn_parsing(arn: str, derived: dict[str, str]) -> None:
    context = build_context(md(key=arn, principal=None))
    assert {k: context[k] for k in ("kmsKeyRegion", "kmsKeyAccount") if k in context} == derived


@pytest.mark.parametrize(
    ("arn", "account"),
    [
        (ALICE, ACCOUNT),
        (f"arn:aws:iam::{ACCOUNT}:root", ACCOUNT),
        (f"arn:aws:sts::{OTHER}:assumed-role/Admin/session", OTHER),
        (f"arn:aws-us-gov:iam::{OTHER}:role/x", OTHER),
        ("AWS Internal", None),
        ("ec2.amazonaws.com", None),
        (f"arn:aws:kms:us-east-2:{ACCOUNT}:key/k", None),
    ],
)
def test_principal_account(arn: str, account: str | None) -> None:
    assert build_context(md(principal=arn)).get("principalAccount") == account


WEIRD_EXTRA: dict[str, Any] = {
    "sourceIdentity": "alice@example.com",  # kept
    "attestationVerified": True,  # kept
    "pcrCount": 24,  # kept
    "nested": {"__entity": {"type": "XKS::Principal", "id": "root"}},  # dropped
    "list": [1, "a", None],
    "nothing": None,
    "ratio": 1.5,
    "huge": 2**64,
    "tooNegative": -(2**63) - 1,
    "lone": "\ud800",
    "kmsRecipientAttestationImage Sha384": "abc",  # not an identifier
    "kmsKeyAccount": OTHER,  # would overwrite a derived field
    "kmsOperation": "Spoofed",
    "extra": "reserved",
    "has": "reserved word",
    "__cedar_x": "reserved prefix",
    "9lives": "starts with a digit",
    "": "empty",
}


def test_unknown_metadata_fields_are_filtered() -> None:
    context = build_context(md(extra=WEIRD_EXTRA))
    extras = {k: v for k, v in context.items() if k not in authz.CONTEXT_FIELDS}
    assert extras == {
        "sourceIdentity": "alice@example.com",
        "attestationVerified": True,
        "pcrCount": 24,
    }
    assert context["kmsKeyAccount"] == ACCOUNT
    assert context["kmsOperation"] == "Encrypt"


WHOLE_CONTEXT = "permit (principal, action, resource) when { context == context };"


def test_unknown_metadata_fields_never_break_evaluation() -> None:
    authorizer = load(WHOLE_CONTEXT, cache_size=0)
    assert authorizer.context_attributes is None  # every attribute reaches Cedar
    decision = authorizer.authorize(ENCRYPT, "ks", "k", md(extra=WEIRD_EXTRA))
    assert decision == Decision(True, ("policies.cedar:0",), ())


_WHOLE = load(WHOLE_CONTEXT, cache_size=64)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(max_size=12), json_values, max_size=6))
def test_any_json_in_future_fields_never_breaks_evaluation(extra: dict[str, Any]) -> None:
    decision = _WHOLE.authorize(DECRYPT, "ks", "k", md(DECRYPT, extra=extra))
    assert decision.errors == ()
    assert decision.allowed


def test_future_fields_usable_as_strings_bools_and_ints() -> None:
    authorizer = load(
        "permit (principal, action, resource) when {\n"
        "  context has attestationVerified && context.attestationVerified == true &&\n"
        "  context has pcrCount && context.pcrCount == 24\n"
        "};"
    )
    assert authorizer.authorize(ENCRYPT, "ks", "k", md(extra=WEIRD_EXTRA)).allowed
    # True == 1 in Python, not in Cedar: the cache must keep them apart
    assert not authorizer.authorize(
        ENCRYPT, "ks", "k", md(extra={"attestationVerified": 1, "pcrCount": 24})
    ).allowed
    assert authorizer.authorize(
        ENCRYPT, "ks", "k", md(extra={"attestationVerified": True, "pcrCount": 24})
    ).allowed
    assert not authorizer.authorize(
        ENCRYPT, "ks", "k", md(extra={"attestationVerified": True, "pcrCount": True})
    ).allowed


# --- refusals and failing closed ------------------------------------------------------


def test_health_status_is_never_authorized() -> None:
    authorizer = load(BLOCK_PRINCIPAL)
    with pytest.raises(ValueError, match="GetHealthStatus"):
        authorizer.authorize(
            XksOperation.GET_HEALTH_STATUS,
            "ks",
            "k",
            RequestMetadata(kms_request_id="r", kms_operation="CreateCustomKeyStore"),
        )


def test_missing_principal_denies() -> None:
    decision = load(BLOCK_PRINCIPAL).authorize(ENCRYPT, "ks", "k", md(principal=None))
    assert not decision.allowed
    assert decision.errors == ("requestMetadata.awsPrincipalArn is missing",)


def test_evaluation_error_fails_closed() -> None:
    # The forbid compares a number, and a future field arrives as a string: Cedar
    # skips the erroring forbid and would allow. We deny and say why.
    authorizer = load(
        '@id("allow-everyone") permit (principal, action, resource);\n'
        '@id("low-risk-only") forbid (principal, action, resource)\n'
        "  when { context has riskScore && context.riskScore > 50 };\n"
    )
    assert authorizer.authorize(ENCRYPT, "ks", "k", md(extra={"riskScore": 10})).allowed
    high = authorizer.authorize(ENCRYPT, "ks", "k", md(extra={"riskScore": 90}))
    assert high == Decision(False, ("low-risk-only",), ())
    broken = authorizer.authorize(ENCRYPT, "ks", "k", md(extra={"riskScore": "high"}))
    assert not broken.allowed
    assert broken.policy_ids == ()
    assert len(broken.errors) == 1
    assert "low-risk-only" in broken.errors[0]
    assert explain(broken).startswith("deny (fail closed): evaluation error: ")


def test_engine_failure_denies_and_is_not_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    authorizer = load(BLOCK_PRINCIPAL)

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("engine exploded")

    monkeypatch.setattr(cedarpy, "is_authorized", boom)
    failed = authorizer.authorize(ENCRYPT, "ks", "k", md())
    assert failed == Decision(
        False, (), ("authorization engine failed: RuntimeError: engine exploded",)
    )
    monkeypatch.undo()
    assert authorizer.authorize(ENCRYPT, "ks", "k", md()) == Decision(True, ("allow-everyone",), ())


def test_odd_principals_and_key_ids_are_plain_data() -> None:
    authorizer = load(BLOCK_PRINCIPAL)
    for principal in ['a"b', "line\nbreak", 'XKS::Principal::"x"', "\u00e9\u4e2d", ""]:
        decision = authorizer.authorize(ENCRYPT, 'ks"', "k/\n1", md(principal=principal))
        assert decision == Decision(True, ("allow-everyone",), ()), principal
    lone = authorizer.authorize(ENCRYPT, "ks", "k", md(principal="\ud800"))
    assert not lone.allowed and lone.errors


# --- caching --------------------------------------------------------------------------


def test_cache_ignores_attributes_no_policy_reads() -> None:
    authorizer = load(VIA_EBS)
    assert authorizer.context_attributes == ("kmsViaService",)
    for i in range(50):
        decision = authorizer.authorize(
            ENCRYPT, "ks", "k", md(kms_via_service="ebs", request_id=f"request-{i}")
        )
        assert decision.allowed
    info = authorizer.cache_info()
    assert (info.hits, info.misses) == (49, 1)
    assert not authorizer.authorize(ENCRYPT, "ks", "k", md(kms_via_service="rds")).allowed


def test_cache_keeps_key_store_and_key_id_apart() -> None:
    authorizer = load('permit (principal, action, resource) when { resource.keyStore == "a" };')
    assert authorizer.authorize(ENCRYPT, "a", "b/c", md()).allowed
    assert not authorizer.authorize(ENCRYPT, "a/b", "c", md()).allowed


def test_resource_attributes() -> None:
    authorizer = load(
        "permit (principal, action, resource) when {\n"
        '  resource == XKS::Key::"prod/key-1" && resource.keyStore == "prod" &&\n'
        '  resource.externalKeyId == "key-1"\n'
        "};"
    )
    assert authorizer.authorize(ENCRYPT, "prod", "key-1", md()).allowed
    assert not authorizer.authorize(ENCRYPT, "prod", "key-2", md()).allowed


@pytest.mark.parametrize(
    ("condition", "attributes"),
    [
        ("true", ()),
        ('context.kmsOperation == "Encrypt"', ("kmsOperation",)),
        (
            'context has kmsViaService && context["kmsViaService"] like "e*" '
            '|| (context has awsSourceVpc && context.awsSourceVpc == "v")',
            ("awsSourceVpc", "kmsViaService"),
        ),
        ('if context has foo then context.kmsRequestId == "x" else false', ("foo", "kmsRequestId")),
        ('context == {"kmsOperation": "Encrypt"}', None),
        ('[context].contains({"a": "b"})', None),
        ('{"c": context}.c has kmsOperation', None),
    ],
)
def test_context_attribute_analysis(condition: str, attributes: tuple[str, ...] | None) -> None:
    text = (
        "permit (principal, action, resource) when { context has kmsOperation };\n"
        f"permit (principal, action, resource) when {{ {condition} }};"
    )
    expected = None if attributes is None else tuple(sorted({"kmsOperation", *attributes}))
    est = json.loads(cedarpy.policies_to_json_str(text))["staticPolicies"].values()
    found = authz._context_attributes(est)
    assert (None if found is None else tuple(sorted(found))) == expected


# Every example in one set (ids prefixed to keep them unique).
ALL_EXAMPLES = "\n".join(text.replace('@id("', f'@id("{name}/') for name, text in EXAMPLES.items())
_CACHED = load(ALL_EXAMPLES)
_PLAIN_SET = cedarpy.PolicySet.from_str(ALL_EXAMPLES)

principals = st.sampled_from([ALICE, BOB, READER, MALLORY, "AWS Internal"])
optional = st.none() | st.sampled_from(["ebs", "rds", VPCE, "vpce-1", "vpc-1"])
extras = st.dictionaries(
    st.sampled_from(["sourceIdentity", "riskScore", "flag"]),
    st.sampled_from(["a@example.com", "b@evil.test", 1, True, 2.5, None]),
    max_size=2,
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([ENCRYPT, DECRYPT, METADATA]),
    st.sampled_from(["prod", "dev"]),
    principals,
    st.sampled_from([None, key_arn(), key_arn(OTHER), "arn:aws:kms:x"]),
    optional,
    optional,
    st.text(max_size=4),
    extras,
)
def test_cached_projected_decisions_equal_plain_cedar(
    operation: XksOperation,
    key_store: str,
    principal: str,
    kms_key: str | None,
    via: str | None,
    vpce: str | None,
    request_id: str,
    extra: dict[str, Any],
) -> None:
    """The cache and the context projection never change a decision: compare with
    Cedar on the full context, policies re-parsed, no cache."""
    metadata = md(
        operation,
        principal,
        kms_key,
        kms_via_service=via,
        aws_source_vpce=vpce,
        request_id=request_id,
        extra=extra,
    )
    decision = _CACHED.authorize(operation, key_store, "k1", metadata)
    plain = cedarpy.is_authorized(
        {
            "principal": {"type": "XKS::Principal", "id": principal},
            "action": {"type": "XKS::Action", "id": operation.value},
            "resource": {"type": "XKS::Key", "id": f"{key_store}/k1"},
            "context": build_context(metadata),
        },
        _PLAIN_SET,
        [
            {
                "uid": {"type": "XKS::Key", "id": f"{key_store}/k1"},
                "attrs": {"keyStore": key_store, "externalKeyId": "k1"},
                "parents": [],
            }
        ],
    )
    plain_allowed = plain.allowed and not plain.diagnostics.errors
    assert decision.allowed == plain_allowed
    assert bool(decision.errors) == bool(plain.diagnostics.errors)
    if plain_allowed or not plain.diagnostics.errors:
        positional = {f"policy{i}": p.id for i, p in enumerate(_CACHED.policies)}
        assert set(decision.policy_ids) == {positional[r] for r in plain.diagnostics.reasons}


# --- explain, log fields, the CLI helper ---------------------------------------------


@pytest.mark.parametrize(
    ("decision", "text"),
    [
        (Decision(True, ("a", "b"), ()), 'allow: permitted by "a", "b"'),
        (Decision(False, ("block-mallory",), ()), 'deny: forbidden by "block-mallory"'),
        (Decision(False, (), ()), "deny: no permit matched"),
        (Decision(False, (), ("e1", "e2")), "deny (fail closed): evaluation error: e1; e2"),
        (
            Decision(False, ("f",), ("e1",)),
            'deny (fail closed): evaluation error: e1; forbidden by "f"',
        ),
    ],
)
def test_explain(decision: Decision, text: str) -> None:
    assert explain(decision) == text


def test_log_fields() -> None:
    assert log_fields(Decision(False, ("block-mallory",), ())) == {
        "authzDecision": "deny",
        "authzPolicyIds": ["block-mallory"],
        "authzReason": 'deny: forbidden by "block-mallory"',
    }
    assert log_fields(Decision(False, (), ("boom",)))["authzErrors"] == ["boom"]
    assert log_fields(Decision(True, ("p",), ()))["authzDecision"] == "allow"


@pytest.fixture
def policy_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "block.cedar"
    path.write_text(BLOCK_PRINCIPAL, encoding="utf-8")
    yield path


def test_check_request_file(policy_file: Path) -> None:
    body: dict[str, Any] = {
        "requestMetadata": {
            "awsPrincipalArn": MALLORY,
            "kmsKeyArn": key_arn(),
            "kmsOperation": "Encrypt",
            "kmsRequestId": "4112f4d6-db54-4af4-ae30-c55a22a8dfae",
            "futureThing": {"nested": [1, 2]},
        },
        "plaintext": "SGVsbG8gV29ybGQh",
        "encryptionAlgorithm": "AES_GCM",
    }
    denied = check_request_file([policy_file], "ks", "k", "Encrypt", body)
    assert denied == Decision(False, ("block-mallory",), ())
    alice = {**body["requestMetadata"], "awsPrincipalArn": ALICE}
    allowed = check_request_file([policy_file], "ks", "k", XksOperation.ENCRYPT, alice)
    assert allowed == Decision(True, ("allow-everyone",), ())
    with pytest.raises(ValueError):
        check_request_file([policy_file], "ks", "k", "Sign", body)
    with pytest.raises(ValueError, match="GetHealthStatus"):
        check_request_file([policy_file], "ks", "k", "GetHealthStatus", body)
    with pytest.raises(PolicyError):
        check_request_file([policy_file.with_name("nope.cedar")], "ks", "k", "Encrypt", body)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"requestMetadata": []}, "must be a JSON object"),
        ({"requestMetadata": {"kmsOperation": "Encrypt"}}, "kmsRequestId is required"),
        ({"kmsRequestId": "r"}, "kmsOperation is required"),
        ({"kmsRequestId": "r", "kmsOperation": "Encrypt", "kmsKeyArn": 5}, "must be a string"),
    ],
)
def test_metadata_from_json_errors(document: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        metadata_from_json(document)


def test_metadata_from_json_keeps_unknown_fields() -> None:
    metadata = metadata_from_json(
        {"kmsRequestId": "r", "kmsOperation": "Decrypt", "awsSourceVpce": "v", "x": [1]}
    )
    assert metadata == dataclasses.replace(
        RequestMetadata(kms_request_id="r", kms_operation="Decrypt", aws_source_vpce="v"),
        extra={"x": [1]},
    )
