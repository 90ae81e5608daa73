"""Secondary authorization of XKS requests with Cedar policies (spec: Authorization,
Logging, Appendix B).

The model (docs/authorization.md has the full story and worked examples):

- principal ``XKS::Principal::"<awsPrincipalArn>"`` (no attributes);
- action ``XKS::Action::"Encrypt" | "Decrypt" | "GetKeyMetadata"``; GetHealthStatus is
  never authorized;
- resource ``XKS::Key::"<keyStore>/<externalKeyId>"`` with attributes ``keyStore`` and
  ``externalKeyId``;
- context: requestMetadata under its own camelCase names, plus ``kmsKeyAccount`` and
  ``kmsKeyRegion`` (from kmsKeyArn) and ``principalAccount`` (from an IAM/STS
  awsPrincipalArn). A field absent from the request is absent from the context.
  Future metadata fields are added under their own names when the name is a plain
  Cedar identifier that clashes with nothing above and the value is a string, a bool
  or a 64-bit integer; every other field is dropped, so odd JSON (objects, arrays,
  null, floats, huge integers) can never break evaluation. Objects are dropped on
  purpose: Cedar reads ``{"__entity": ...}`` as an entity reference.

Decisions fail closed: any evaluation error denies, with the error in
``Decision.errors``. Policies are parsed and validated against :data:`SCHEMA` once, at
load. Decisions are cached in a bounded LRU keyed on the inputs the policies can see
(principal, action, resource, and only the context attributes the policies name), so
a decision is reused only where Cedar would compute the same one. An
:class:`Authorizer` never changes: to reload policies, build a new one (which starts
with an empty cache). docs/decisions/authorization-engine.md has the measurements
behind this design.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import cedarpy

from xks_proxy.protocol.models import RequestMetadata, XksOperation

__all__ = [
    "AUTHORIZED_OPERATIONS",
    "CONTEXT_FIELDS",
    "DEFAULT_CACHE_SIZE",
    "SCHEMA",
    "Authorizer",
    "Decision",
    "PolicyError",
    "PolicyInfo",
    "build_context",
    "check_request_file",
    "explain",
    "log_fields",
    "metadata_from_json",
]

PRINCIPAL_TYPE: Final = "XKS::Principal"
ACTION_TYPE: Final = "XKS::Action"
KEY_TYPE: Final = "XKS::Key"

AUTHORIZED_OPERATIONS: Final = frozenset(
    {XksOperation.ENCRYPT, XksOperation.DECRYPT, XksOperation.GET_KEY_METADATA}
)

DEFAULT_CACHE_SIZE: Final = 4096

# Policies are validated against this schema at load. At evaluation the schema is not
# passed, so future metadata fields (undeclared here) still reach the policies.
SCHEMA: Final = """\
namespace XKS {
  // awsPrincipalArn: an IAM ARN, a service principal (ec2.amazonaws.com) or "AWS Internal".
  entity Principal;
  // "<keyStore>/<externalKeyId>"
  entity Key = { keyStore: String, externalKeyId: String };

  type KeyMetadataContext = {
    kmsOperation: String,
    kmsRequestId: String,
    awsPrincipalArn: String,
    principalAccount?: String,
    kmsKeyArn?: String,
    kmsKeyAccount?: String,
    kmsKeyRegion?: String,
    kmsViaService?: String,
    awsSourceVpc?: String,
    awsSourceVpce?: String,
  };

  type CryptoContext = {
    kmsOperation: String,
    kmsRequestId: String,
    awsPrincipalArn: String,
    principalAccount?: String,
    kmsKeyArn: String,
    kmsKeyAccount?: String,
    kmsKeyRegion?: String,
    kmsViaService?: String,
    awsSourceVpc?: String,
    awsSourceVpce?: String,
  };

  action GetKeyMetadata appliesTo {
    principal: Principal, resource: Key, context: KeyMetadataContext
  };
  action Encrypt, Decrypt appliesTo {
    principal: Principal, resource: Key, context: CryptoContext
  };
}
"""

# requestMetadata JSON name -> RequestMetadata attribute.
_METADATA_FIELDS: Final = (
    ("kmsRequestId", "kms_request_id"),
    ("kmsOperation", "kms_operation"),
    ("awsPrincipalArn", "aws_principal_arn"),
    ("kmsKeyArn", "kms_key_arn"),
    ("kmsViaService", "kms_via_service"),
    ("awsSourceVpc", "aws_source_vpc"),
    ("awsSourceVpce", "aws_source_vpce"),
)
_DERIVED_FIELDS: Final = ("kmsKeyAccount", "kmsKeyRegion", "principalAccount")
# Every name the context can hold besides future fields; "extra" is kept free for a
# later context.extra record.
CONTEXT_FIELDS: Final = frozenset(
    [name for name, _ in _METADATA_FIELDS] + list(_DERIVED_FIELDS) + ["extra"]
)

_IDENTIFIER: Final = re.compile(r"[_a-zA-Z][_a-zA-Z0-9]*")
_CEDAR_RESERVED: Final = frozenset(
    {"true", "false", "if", "then", "else", "in", "is", "like", "has", "__cedar"}
)
_LONG_MIN: Final = -(2**63)
_LONG_MAX: Final = 2**63 - 1

# arn:aws:kms:us-east-2:123456789012:key/<id>; the spec's examples write ":/key/".
_KMS_KEY_ARN: Final = re.compile(r"arn:aws[a-z-]*:kms:([a-z0-9-]+):([0-9]{12}):/?key/.+", re.S)
# arn:aws:iam::123456789012:role/x, arn:aws:sts::123456789012:assumed-role/x/y
_IAM_ARN: Final = re.compile(r"arn:aws[a-z-]*:(?:iam|sts)::([0-9]{12}):.+", re.S)


class PolicyError(Exception):
    """A policy file that cannot be used: unreadable, bad syntax, or fails the schema."""

    def __init__(self, problem: str, *, path: str | None = None, line: int | None = None):
        self.problem = problem
        self.path = path
        self.line = line
        where = path if path is not None else ""
        if path is not None and line is not None:
            where = f"{path}:{line}"
        super().__init__(f"{where}: {problem}" if where else problem)


@dataclass(frozen=True)
class Decision:
    """The outcome of one authorization.

    ``policy_ids`` are the policies that determined it: the permits that matched when
    allowed, the forbids that matched when denied (empty when nothing was permitted).
    ``errors`` are evaluation errors; any error denies (fail closed).
    """

    allowed: bool
    policy_ids: tuple[str, ...]
    errors: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PolicyInfo:
    """One loaded policy: its id, effect and where it came from."""

    id: str
    effect: str  # "permit" or "forbid"
    source: str
    index: int  # 0-based position within its file
    line: int | None  # line where the policy (or its annotations) starts


ContextValue = str | bool | int
_CacheKey = tuple[str, str, str, str, tuple[tuple[str, type, ContextValue], ...]]


class _Uncached(Exception):
    """Raised out of the cached evaluator so that lru_cache does not keep the result."""

    def __init__(self, decision: Decision) -> None:
        super().__init__()
        self.decision = decision


@functools.cache
def _schema() -> cedarpy.Schema:
    return cedarpy.Schema.from_str(SCHEMA)


class Authorizer:
    """Cedar policies for one key store, parsed and validated once; thread-safe."""

    def __init__(
        self,
        policy_set: cedarpy.PolicySet,
        policies: Sequence[PolicyInfo],
        context_attributes: frozenset[str] | None,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        """Use :meth:`from_files` or :meth:`from_sources`."""
        self._policy_set = policy_set
        self._policies = tuple(policies)
        self._order = {info.id: position for position, info in enumerate(self._policies)}
        # None: some policy uses ``context`` as a whole value, so every attribute counts.
        self._context_attributes = (
            None if context_attributes is None else tuple(sorted(context_attributes))
        )
        self._cached = functools.lru_cache(maxsize=max(cache_size, 0))(self._evaluate)
        self._entities = functools.lru_cache(maxsize=1024)(_key_entities)

    @classmethod
    def from_files(
        cls, paths: Sequence[Path], *, cache_size: int = DEFAULT_CACHE_SIZE
    ) -> Authorizer:
        """Load, parse and validate the policy files; raise PolicyError if any is bad."""
        sources: list[tuple[str, str]] = []
        for path in paths:
            try:
                text = Path(path).read_bytes().decode("utf-8")
            except OSError as exc:
                raise PolicyError(
                    f"cannot read policy file: {exc.strerror}", path=str(path)
                ) from None
            except UnicodeDecodeError:
                raise PolicyError("policy file is not UTF-8", path=str(path)) from None
            sources.append((str(path), text))
        return cls.from_sources(sources, cache_size=cache_size)

    @classmethod
    def from_sources(
        cls, sources: Sequence[tuple[str, str]], *, cache_size: int = DEFAULT_CACHE_SIZE
    ) -> Authorizer:
        """Like :meth:`from_files`, from ``(name, policy text)`` pairs."""
        if not sources:
            raise PolicyError("no policy files given")
        static: dict[str, Any] = {}
        infos: list[PolicyInfo] = []
        for name, text in sources:
            for info, est in _load_source(name, text):
                if info.id in static:
                    other = next(i for i in infos if i.id == info.id)
                    raise PolicyError(
                        f"duplicate policy id {info.id!r} (also at {_where(other)})",
                        path=name,
                        line=info.line,
                    )
                static[info.id] = est
                infos.append(info)
        document = {"staticPolicies": static, "templates": {}, "templateLinks": []}
        try:
            policy_set = cedarpy.PolicySet.from_json_str(json.dumps(document))
        except ValueError as exc:  # pragma: no cover - every part parsed on its own
            raise PolicyError(f"cannot combine policies: {exc}") from None
        return cls(policy_set, infos, _context_attributes(static.values()), cache_size)

    @property
    def policies(self) -> tuple[PolicyInfo, ...]:
        """The loaded policies, in file order."""
        return self._policies

    @property
    def context_attributes(self) -> tuple[str, ...] | None:
        """Context attributes the policies can observe (None: all of them)."""
        return self._context_attributes

    def cache_info(self) -> functools._CacheInfo:
        """Hits, misses and size of the decision cache."""
        return self._cached.cache_info()

    def authorize(
        self,
        operation: XksOperation,
        key_store: str,
        external_key_id: str,
        metadata: RequestMetadata,
    ) -> Decision:
        """Decide one request. Raises ValueError for GetHealthStatus, which is never
        subject to secondary authorization; everything else returns a Decision."""
        if operation not in AUTHORIZED_OPERATIONS:
            raise ValueError(f"{operation.value} is never subject to secondary authorization")
        principal = metadata.aws_principal_arn
        if principal is None:
            return Decision(False, (), ("requestMetadata.awsPrincipalArn is missing",))
        context = build_context(metadata)
        wanted = self._context_attributes
        if wanted is None:
            items = tuple(sorted((name, type(value), value) for name, value in context.items()))
        else:
            # The type is part of the key: True == 1 in Python, not in Cedar.
            items = tuple(
                (name, type(context[name]), context[name]) for name in wanted if name in context
            )
        key: _CacheKey = (principal, operation.value, key_store, external_key_id, items)
        try:
            return self._cached(key)
        except _Uncached as uncached:
            return uncached.decision

    def _evaluate(self, key: _CacheKey) -> Decision:
        principal, action, key_store, external_key_id, items = key
        request = {
            "principal": {"type": PRINCIPAL_TYPE, "id": principal},
            "action": {"type": ACTION_TYPE, "id": action},
            "resource": {"type": KEY_TYPE, "id": f"{key_store}/{external_key_id}"},
            "context": {name: value for name, _, value in items},
        }
        try:
            entities = self._entities(key_store, external_key_id)
            result = cedarpy.is_authorized(request, self._policy_set, entities)
            errors = tuple(str(error) for error in result.diagnostics.errors)
            reasons = sorted(
                (str(reason) for reason in result.diagnostics.reasons),
                key=lambda policy_id: self._order.get(policy_id, len(self._order)),
            )
            outcome = result.decision
        except Exception as exc:  # an engine failure, not a decision: deny, do not cache
            raise _Uncached(
                Decision(False, (), (f"authorization engine failed: {type(exc).__name__}: {exc}",))
            ) from None
        if outcome is cedarpy.Decision.Allow:
            if errors:  # a forbid that errored might have matched: fail closed
                return Decision(False, (), errors)
            return Decision(True, tuple(reasons), ())
        if outcome is cedarpy.Decision.Deny:
            return Decision(False, tuple(reasons), errors)
        return Decision(False, (), errors or (f"no decision from the engine ({outcome.value})",))


def _key_entities(key_store: str, external_key_id: str) -> cedarpy.Entities:
    entity = {
        "uid": {"type": KEY_TYPE, "id": f"{key_store}/{external_key_id}"},
        "attrs": {"keyStore": key_store, "externalKeyId": external_key_id},
        "parents": [],
    }
    return cedarpy.Entities.from_json_str(json.dumps([entity]))


def build_context(metadata: RequestMetadata) -> dict[str, ContextValue]:
    """The Cedar context for ``metadata`` (see the module docstring for the rules)."""
    context: dict[str, ContextValue] = {}
    for name, attribute in _METADATA_FIELDS:
        value = getattr(metadata, attribute)
        if value is not None:
            context[name] = value
    if metadata.kms_key_arn is not None:
        parsed = _parse_kms_key_arn(metadata.kms_key_arn)
        if parsed is not None:
            context["kmsKeyRegion"], context["kmsKeyAccount"] = parsed
    if metadata.aws_principal_arn is not None:
        account = _principal_account(metadata.aws_principal_arn)
        if account is not None:
            context["principalAccount"] = account
    for name, value in metadata.extra.items():
        if _usable_extra(name, value):
            context[name] = value
    return context


@functools.lru_cache(maxsize=1024)
def _parse_kms_key_arn(arn: str) -> tuple[str, str] | None:
    match = _KMS_KEY_ARN.fullmatch(arn)
    return None if match is None else (match.group(1), match.group(2))


@functools.lru_cache(maxsize=1024)
def _principal_account(arn: str) -> str | None:
    match = _IAM_ARN.fullmatch(arn)
    return None if match is None else match.group(1)


def _usable_extra(name: Any, value: Any) -> bool:
    if not isinstance(name, str) or name in CONTEXT_FIELDS or name in _CEDAR_RESERVED:
        return False
    if name.startswith("__cedar") or _IDENTIFIER.fullmatch(name) is None:
        return False
    kind = type(value)
    if kind is bool:
        return True
    if kind is int:
        return bool(_LONG_MIN <= value <= _LONG_MAX)
    if kind is str:
        return _is_utf8(value)
    return False


def _is_utf8(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: Cedar's JSON reader rejects them
        return False
    return True


def metadata_from_json(document: Mapping[str, Any]) -> RequestMetadata:
    """RequestMetadata from a request body (``{"requestMetadata": {...}, ...}``) or
    from the requestMetadata object itself, with the server's rules: kmsRequestId and
    kmsOperation required, known fields must be strings, unknown fields kept in extra.
    Raises ValueError."""
    raw = document.get("requestMetadata", document)
    if not isinstance(raw, Mapping):
        raise ValueError("requestMetadata must be a JSON object")
    known = dict(_METADATA_FIELDS)
    values: dict[str, str] = {}
    extra: dict[str, Any] = {}
    for name, value in raw.items():
        attribute = known.get(name)
        if attribute is None:
            extra[name] = value
        elif not isinstance(value, str):
            raise ValueError(f"requestMetadata.{name} must be a string")
        else:
            values[attribute] = value
    for name in ("kmsRequestId", "kmsOperation"):
        if known[name] not in values:
            raise ValueError(f"requestMetadata.{name} is required")
    return RequestMetadata(**values, extra=extra)


def check_request_file(
    policy_paths: Sequence[Path],
    key_store: str,
    external_key_id: str,
    operation: XksOperation | str,
    request_json: Mapping[str, Any],
) -> Decision:
    """What the proxy would decide for this request: the core of ``xks-proxy authz
    check``. ``operation`` is an XksOperation or its name ("Encrypt"). Raises
    PolicyError for bad policies, ValueError for a bad operation or request."""
    authorizer = Authorizer.from_files(policy_paths, cache_size=0)
    op = operation if isinstance(operation, XksOperation) else XksOperation(operation)
    return authorizer.authorize(op, key_store, external_key_id, metadata_from_json(request_json))


def explain(decision: Decision) -> str:
    """One line for logs and the CLI: the decision and what decided it."""
    ids = ", ".join(f'"{policy_id}"' for policy_id in decision.policy_ids)
    if decision.allowed:
        return f"allow: permitted by {ids}"
    if decision.errors:
        text = "deny (fail closed): evaluation error: " + "; ".join(decision.errors)
        return f"{text}; forbidden by {ids}" if ids else text
    if ids:
        return f"deny: forbidden by {ids}"
    return "deny: no permit matched"


def log_fields(decision: Decision) -> dict[str, Any]:
    """Fields for the request log line (camelCase like the rest of it)."""
    fields: dict[str, Any] = {
        "authzDecision": "allow" if decision.allowed else "deny",
        "authzPolicyIds": list(decision.policy_ids),
        "authzReason": explain(decision),
    }
    if decision.errors:
        fields["authzErrors"] = list(decision.errors)
    return fields


# --- loading -------------------------------------------------------------------------


def _where(info: PolicyInfo) -> str:
    return f"{info.source}:{info.line}" if info.line is not None else info.source


def _load_source(name: str, text: str) -> list[tuple[PolicyInfo, dict[str, Any]]]:
    """Parse and validate one file: (PolicyInfo, policy as Cedar JSON) per policy."""
    chunks = _split_policies(text)
    try:
        document = json.loads(cedarpy.policies_to_json_str(text))
    except ValueError as exc:
        raise _locate_parse_error(name, chunks, exc) from None
    static: dict[str, Any] = document.get("staticPolicies") or {}
    templates: dict[str, Any] = document.get("templates") or {}
    count = len(static) + len(templates)
    lines = [line for line, _ in chunks] if len(chunks) == count else None

    def line_of(index: int) -> int | None:
        return lines[index] if lines is not None and 0 <= index < len(lines) else None

    if templates:
        index = min(_position(policy_id) for policy_id in templates)
        raise PolicyError(
            "policy templates (?principal / ?resource slots) are not supported",
            path=name,
            line=line_of(index),
        )
    loaded: list[tuple[PolicyInfo, dict[str, Any]]] = []
    positional: dict[str, str] = {}
    for index in range(count):
        est = static[f"policy{index}"]
        annotated = (est.get("annotations") or {}).get("id")
        policy_id = annotated if isinstance(annotated, str) and annotated else f"{name}:{index}"
        positional[f"policy{index}"] = policy_id
        info = PolicyInfo(policy_id, str(est.get("effect")), name, index, line_of(index))
        loaded.append((info, est))
    result = cedarpy.validate_policies(text, _schema())
    if not result.validation_passed:
        # One line per (policy, problem); Cedar repeats a problem once per action.
        problems: dict[tuple[str, str], list[str]] = {}
        first_line = None
        for error in result.errors:
            where = line_of(_position(error.policy_id))
            first_line = first_line if first_line is not None else where
            prefix = f"line {where}: " if where is not None else ""
            policy = positional.get(error.policy_id, error.policy_id)
            message = re.sub(r"^for policy `[^`]*`, ", "", error.error)
            actions = re.findall(r' for XKS::Action::"([^"]*)"', message)
            message = re.sub(r' for XKS::Action::"[^"]*"', "", message)
            if "optional attribute" in message:
                message += " (guard it with `context has <name> && ...`)"
            problems.setdefault((f"{prefix}policy {policy!r}", message), []).extend(actions)
        messages = [
            f"{where}: {message}" + (f" [{', '.join(actions)}]" if actions else "")
            for (where, message), actions in problems.items()
        ]
        raise PolicyError(
            "does not match the XKS schema: " + "; ".join(messages), path=name, line=first_line
        )
    return loaded


def _position(policy_id: str) -> int:
    match = re.fullmatch(r"policy(\d+)", policy_id)
    return int(match.group(1)) if match else -1


def _locate_parse_error(name: str, chunks: list[tuple[int, str]], exc: ValueError) -> PolicyError:
    """Cedar's parse errors carry no position: find the first policy that fails alone."""
    for index, (line, chunk) in enumerate(chunks):
        try:
            cedarpy.PolicySet.from_str(chunk)
        except ValueError as chunk_exc:
            return PolicyError(
                f"syntax error in policy #{index}: {chunk_exc}", path=name, line=line
            )
    return PolicyError(f"syntax error: {exc}", path=name)


def _split_policies(text: str) -> list[tuple[int, str]]:
    """Cut policy text after each ``;`` outside strings and ``//`` comments.

    Returns (line where the policy starts, text up to and including its ``;``) per
    policy, plus any unterminated tail. In Cedar ``;`` only ends a policy, so this
    lines up with the parser's policy0, policy1, ...
    """
    chunks: list[tuple[int, str]] = []
    start = 0
    line = 1
    first_line: int | None = None
    in_string = False
    i = 0
    n = len(text)
    while i < n:
        char = text[i]
        if in_string:
            if char == "\\":
                if i + 1 < n and text[i + 1] == "\n":
                    line += 1
                i += 2
                continue
            if char == '"':
                in_string = False
            elif char == "\n":
                line += 1
        elif char == "/" and text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end == -1 else end
            continue
        elif char == "\n":
            line += 1
        elif not char.isspace():
            if first_line is None:
                first_line = line
            if char == '"':
                in_string = True
            elif char == ";":
                chunks.append((first_line, text[start : i + 1]))
                start = i + 1
                first_line = None
        i += 1
    if first_line is not None:
        chunks.append((first_line, text[start:]))
    return chunks


def _context_attributes(policies: Any) -> frozenset[str] | None:
    """The context attributes the policies read (``context.x``, ``context has x``), or
    None if some policy uses ``context`` any other way (then all attributes matter)."""
    attributes: set[str] = set()
    for est in policies:
        if not _scan(est.get("conditions", []), attributes):
            return None
    return frozenset(attributes)


def _scan(node: Any, attributes: set[str]) -> bool:
    if isinstance(node, list):
        return all(_scan(item, attributes) for item in node)
    if not isinstance(node, dict):
        return True
    if node.get("Var") == "context":
        return False
    ok = True
    for op, value in node.items():
        if (
            op in (".", "has")
            and isinstance(value, dict)
            and value.get("left") == {"Var": "context"}
            and isinstance(value.get("attr"), str)
        ):
            attributes.add(value["attr"])
            rest = {k: v for k, v in value.items() if k != "left"}
            ok = _scan(rest, attributes) and ok
        else:
            ok = _scan(value, attributes) and ok
    return ok
