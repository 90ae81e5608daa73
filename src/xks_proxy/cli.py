"""The ``xks-proxy`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from xks_proxy import __version__
from xks_proxy.config import ConfigError, HsmConfig, ProxyConfig, load_config
from xks_proxy.credentials import kms_console_config, new_credential
from xks_proxy.observability.logging import configure_logging

logger = logging.getLogger("xks_proxy.cli")

EXIT_CONFIG = 2
EXIT_STARTUP = 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return EXIT_CONFIG
    result: int = args.run(args)
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xks-proxy", description="AWS KMS External Key Store proxy for PKCS#11 HSMs"
    )
    parser.add_argument("--version", action="version", version=f"xks-proxy {__version__}")
    commands = parser.add_subparsers(title="commands")

    serve = commands.add_parser("serve", help="serve the XKS API from a TOML config file")
    serve.add_argument("--config", required=True, type=Path, help="path of the TOML config")
    serve.set_defaults(run=_serve)

    demo = commands.add_parser(
        "demo", help="provision a SoftHSMv2 token with demo keys under DIR and serve it"
    )
    demo.add_argument("--dir", required=True, type=Path, help="directory for token and config")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", default=8000, type=int)
    demo.add_argument("--workers", default=1, type=int)
    demo.add_argument("--uri-prefix", default="demo", help="URI path prefix of the key store")
    demo.add_argument("--access-key-id", help="SigV4 access key id (default: generated)")
    demo.add_argument("--secret-access-key", help="SigV4 secret access key (default: generated)")
    demo.add_argument(
        "--tls", action="store_true", help="serve HTTPS with a certificate from a local demo CA"
    )
    demo.add_argument(
        "--mtls",
        action="store_true",
        help="also require a client certificate (the demo writes one for "
        "cks.kms.us-east-1.amazonaws.com)",
    )
    demo.add_argument(
        "--prepare-only", action="store_true", help="provision and write the config, do not serve"
    )
    demo.set_defaults(run=_demo)

    reload = commands.add_parser(
        "reload", help="make a running proxy re-read its config file (like SIGHUP) and report"
    )
    reload.add_argument("--config", required=True, type=Path)
    reload.add_argument("--timeout", type=float, default=20.0)
    reload.set_defaults(run=_reload)

    for action in ("disable", "enable"):
        switch = commands.add_parser(
            action,
            help=f"{action} the whole proxy, a key store, or one key (kill switch, in force "
            "on every worker within a second, persisted)",
        )
        switch.add_argument("--config", required=True, type=Path)
        switch.add_argument("--key-store", help="key store name (omit for the whole proxy)")
        switch.add_argument("--key", help="external key id within --key-store")
        switch.add_argument("--reason", default="", help="recorded in the kill switch log")
        switch.set_defaults(run=_switch, disable=action == "disable")

    status = commands.add_parser("status", help="show kill switch state and last reload")
    status.add_argument("--config", required=True, type=Path)
    status.set_defaults(run=_status)

    keys = commands.add_parser("keys", help="create, list and show keys on the configured HSM(s)")
    key_commands = keys.add_subparsers(title="key commands")
    create = key_commands.add_parser(
        "create", help="create an AES-256 key: sensitive, non-extractable, chosen usages"
    )
    create.add_argument("--config", required=True, type=Path)
    create.add_argument("--label", required=True, help="the external key id (CKA_LABEL)")
    create.add_argument(
        "--usage",
        choices=("encrypt-decrypt", "encrypt", "decrypt", "none"),
        default="encrypt-decrypt",
    )
    create.add_argument(
        "--health-check",
        action="store_true",
        help="create the health-check key named in the config instead",
    )
    create.add_argument("--hsm", help="which [[hsm]] by name (required with several)")
    create.set_defaults(run=_keys_create)
    for name, helptext in (
        ("list", "list the secret keys and whether XKS can use them"),
        ("show", "show one key"),
    ):
        command = key_commands.add_parser(name, help=helptext)
        command.add_argument("--config", required=True, type=Path)
        command.add_argument("--hsm", help="only this [[hsm]] (default: all)")
        if name == "show":
            command.add_argument("--label", required=True)
        command.set_defaults(run=_keys_list if name == "list" else _keys_show)

    imported = commands.add_parser(
        "import-config",
        help="convert the AWS sample proxy's settings.toml (config to stdout, report to stderr)",
    )
    imported.add_argument("settings", type=Path)
    imported.add_argument("--token-label", help="label of the token the sample used")
    imported.add_argument(
        "--working-dir", type=Path, help="directory the sample ran in, for its relative paths"
    )
    imported.set_defaults(run=_import_config)

    audit = commands.add_parser("audit", help="tamper-evident audit log tools")
    audit_commands = audit.add_subparsers(title="audit commands")
    verify = audit_commands.add_parser(
        "verify", help="check the hash chains of audit files; say where one is broken"
    )
    verify.add_argument(
        "files",
        nargs="+",
        type=Path,
        help="audit files (rotated ones too) or directories of them; one chain per worker",
    )
    verify.add_argument("--chain-key-file", type=Path, help="HMAC chain key (hex) if keyed")
    verify.set_defaults(run=_audit_verify)

    authz_parser = commands.add_parser("authz", help="secondary authorization tools")
    authz_commands = authz_parser.add_subparsers(title="authz commands")
    check = authz_commands.add_parser(
        "check", help="explain offline what a key store's Cedar policies decide for a request"
    )
    check.add_argument("--config", required=True, type=Path)
    check.add_argument("--request", required=True, type=Path, help="request body JSON file")
    check.add_argument("--key-store", help="key store name (default: the only one)")
    check.add_argument("--key", required=True, help="external key id")
    check.add_argument(
        "--operation", required=True, choices=("Encrypt", "Decrypt", "GetKeyMetadata")
    )
    check.set_defaults(run=_authz_check)

    credentials = commands.add_parser("credentials", help="SigV4 credential tools")
    credential_commands = credentials.add_subparsers(title="credential commands")
    new = credential_commands.add_parser("new", help="print a fresh access key id and secret")
    new.add_argument("--json", action="store_true", help="print as JSON")
    new.set_defaults(run=_credentials_new)

    kms_config = commands.add_parser(
        "kms-config", help="write the JSON file the KMS console accepts for a key store"
    )
    kms_config.add_argument("--config", required=True, type=Path)
    kms_config.add_argument("--key-store", required=True, help="name of the key store")
    kms_config.add_argument(
        "--access-key-id", help="which credential (default: the key store's first)"
    )
    kms_config.add_argument("--output", type=Path, help="file to write (default: stdout)")
    kms_config.set_defaults(run=_kms_config)
    return parser


def _load(path: Path) -> ProxyConfig | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"xks-proxy: invalid configuration: {exc}", file=sys.stderr)
        return None


def _serve(args: argparse.Namespace) -> int:
    configure_logging("info")
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    configure_logging(config.log_level)
    return _run_server(config)


def _run_server(config: ProxyConfig) -> int:
    from xks_proxy.keymanager.pkcs11 import KeyManagerStartupError
    from xks_proxy.server.runner import StartupError, serve

    try:
        return serve(config)
    except (StartupError, KeyManagerStartupError) as exc:
        print(f"xks-proxy: cannot start: {exc}", file=sys.stderr)
        return EXIT_STARTUP


def _demo(args: argparse.Namespace) -> int:
    from xks_proxy.demo import prepare_demo

    if bool(args.access_key_id) != bool(args.secret_access_key):
        print(
            "xks-proxy: give both --access-key-id and --secret-access-key, or neither",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    configure_logging("info")
    try:
        setup = prepare_demo(
            args.dir,
            host=args.host,
            port=args.port,
            uri_prefix=args.uri_prefix,
            access_key_id=args.access_key_id,
            secret_access_key=args.secret_access_key,
            workers=args.workers,
            tls=args.tls,
            mtls=args.mtls,
        )
    except Exception as exc:  # provisioning talks to softhsm2-util and the HSM
        print(f"xks-proxy: demo set-up failed: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    config = _load(setup.config_path)
    if config is None:
        return EXIT_CONFIG
    _print_demo_banner(config, setup.config_path)
    if args.prepare_only:
        return 0
    return _run_server(config)


def _print_demo_banner(config: ProxyConfig, config_path: Path) -> None:
    store = config.key_stores[0]
    credential = store.credentials[0]
    host = config.server.host
    scheme = "https" if config.tls else "http"
    endpoint = f"{scheme}://{host}:{config.server.port}"
    curl_tls = ""
    trust = ""
    if config.tls is not None:
        ca = config.tls.cert_file.parent / "ca.pem"
        curl_tls = f"--cacert {shlex.quote(str(ca))} "
        trust = (
            f"\n  TLS: certificate from the demo CA {ca}; trust it with curl --cacert, or "
            f"add it to your trust store (e.g. /usr/local/share/ca-certificates + "
            f"update-ca-certificates)"
        )
        if config.tls.client_ca_file is not None:
            client = config.tls.cert_file.parent
            curl_tls += (
                f"--cert {shlex.quote(str(client / 'client.pem'))} "
                f"--key {shlex.quote(str(client / 'client-key.pem'))} "
            )
            trust += (
                f"\n  mTLS: client certificate {client / 'client.pem'} "
                f"(CN={', '.join(config.tls.client_names)}) is required"
            )
    url = f"{endpoint}{store.uri_path}/keys/foo/encrypt"
    body = json.dumps(
        {
            "requestMetadata": {
                "awsPrincipalArn": "arn:aws:iam::123456789012:user/Alice",
                "kmsKeyArn": "arn:aws:kms:us-east-1:123456789012:key/demo",
                "kmsOperation": "Encrypt",
                "kmsRequestId": "demo-request-1",
            },
            "plaintext": "SGVsbG8gV29ybGQh",
            "encryptionAlgorithm": "AES_GCM",
        },
        separators=(",", ":"),
    )
    curl = (
        f'curl {curl_tls}--aws-sigv4 "aws:amz:us-east-1:kms-xks-proxy" '
        f"--user {shlex.quote(credential.access_key_id + ':' + credential.secret_access_key)} "
        f'-H "Content-Type:application/json" --data {shlex.quote(body)} {url}'
    )
    keys = ", ".join(sorted(store.external_key_ids or ()))
    print(
        f"""
xks-proxy demo
  config:            {config_path}
  endpoint:          {endpoint}
  URI path:          {store.uri_path}
  access key id:     {credential.access_key_id}
  secret access key: {credential.secret_access_key}
  external keys:     {keys}{trust}

Try it:
  {curl}
""",
        flush=True,
    )


def _reload(args: argparse.Namespace) -> int:
    import os
    import signal
    import time

    from xks_proxy.config import state_dir_of
    from xks_proxy.server import reload as reload_files
    from xks_proxy.statefiles import read_json

    state_dir = state_dir_of(args.config)
    try:
        pid = int((state_dir / reload_files.PID_FILE).read_text(encoding="ascii").strip())
        status_path = state_dir / reload_files.STATUS_FILE
        before = reload_files.read_generation(status_path)
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        print(f"xks-proxy: no running proxy found for {args.config}: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        status = read_json(status_path)
        if status and isinstance(status.get("generation"), int) and status["generation"] > before:
            if status.get("ok"):
                print(f"reloaded (generation {status['generation']})")
                return 0
            print(
                f"xks-proxy: reload failed, still running the previous configuration: "
                f"{status.get('error')}",
                file=sys.stderr,
            )
            return EXIT_STARTUP
        time.sleep(0.05)
    print("xks-proxy: the proxy did not report a reload result in time", file=sys.stderr)
    return EXIT_STARTUP


def _switch(args: argparse.Namespace) -> int:
    from xks_proxy import killswitch
    from xks_proxy.config import state_dir_of

    if args.key and not args.key_store:
        print("xks-proxy: --key needs --key-store", file=sys.stderr)
        return EXIT_CONFIG
    # The kill switch must work even while the config file is being edited: only
    # check names when the file validates.
    try:
        config = load_config(args.config)
    except ConfigError:
        config = None
    if config is not None and args.key_store:
        names = [store.name for store in config.key_stores]
        if args.key_store not in names:
            print(
                f"xks-proxy: no key store named {args.key_store!r} (have: {', '.join(names)})",
                file=sys.stderr,
            )
            return EXIT_CONFIG
    state_dir = config.server.state_dir if config else state_dir_of(args.config)
    state = killswitch.change(
        state_dir,
        disable=args.disable,
        key_store=args.key_store,
        key=args.key,
        reason=args.reason,
    )
    target = (
        f"key {args.key} of key store {args.key_store}"
        if args.key
        else f"key store {args.key_store}"
        if args.key_store
        else "the whole proxy"
    )
    print(
        f"{'disabled' if args.disable else 'enabled'} {target}; "
        f"in force on every worker within {killswitch.POLL_SECONDS * 4:g} s"
    )
    print(json.dumps(state.to_json(), indent=2))
    return 0


def _status(args: argparse.Namespace) -> int:
    from xks_proxy import killswitch
    from xks_proxy.config import state_dir_of
    from xks_proxy.server import reload as reload_files
    from xks_proxy.statefiles import read_json

    state_dir = state_dir_of(args.config)
    state = killswitch.KillSwitchState.from_json(read_json(state_dir / killswitch.STATE_FILE))
    report = {
        "killSwitch": state.to_json(),
        "lastReload": read_json(state_dir / reload_files.STATUS_FILE),
    }
    print(json.dumps(report, indent=2))
    return 0


def _selected_hsms(config: ProxyConfig, name: str | None) -> list[HsmConfig] | None:
    if name is None:
        return list(config.hsms)
    chosen = [hsm for hsm in config.hsms if hsm.name == name]
    if not chosen:
        names = ", ".join(hsm.name for hsm in config.hsms)
        print(f"xks-proxy: no HSM named {name!r} (have: {names})", file=sys.stderr)
        return None
    return chosen


def _keys_create(args: argparse.Namespace) -> int:
    from xks_proxy.keymanager import tooling
    from xks_proxy.keymanager.pkcs11 import KeyManagerStartupError
    from xks_proxy.server.runner import pkcs11_settings

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    if args.hsm is None and len(config.hsms) > 1:
        print(
            "xks-proxy: name the HSM with --hsm: keys are created on one HSM and "
            "replicated by the HSM cluster (separately created keys would differ)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    hsms = _selected_hsms(config, args.hsm)
    if hsms is None:
        return EXIT_CONFIG
    settings = pkcs11_settings(hsms[0])
    try:
        if args.health_check:
            row = tooling.create_health_check_key(settings, hsms[0].health_check_key_label)
        else:
            row = tooling.create_key(
                settings,
                args.label,
                encrypt=args.usage in ("encrypt-decrypt", "encrypt"),
                decrypt=args.usage in ("encrypt-decrypt", "decrypt"),
            )
    except (tooling.KeyToolingError, KeyManagerStartupError) as exc:
        print(f"xks-proxy: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    print(tooling.format_key_table([row]))
    return 0


def _keys_list(args: argparse.Namespace, label: str | None = None) -> int:
    from xks_proxy.keymanager import tooling
    from xks_proxy.keymanager.pkcs11 import KeyManagerStartupError
    from xks_proxy.protocol.errors import KeyNotFoundException
    from xks_proxy.server.runner import pkcs11_settings

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    hsms = _selected_hsms(config, args.hsm)
    if hsms is None:
        return EXIT_CONFIG
    status = 0
    for hsm in hsms:
        settings = pkcs11_settings(hsm)
        try:
            if label is None:
                rows = tooling.list_keys(settings)
            else:
                rows = [tooling.show_key(settings, label)]
        except KeyNotFoundException:
            print(f"{hsm.name}: no key labelled {label!r}", file=sys.stderr)
            status = EXIT_STARTUP
            continue
        except (tooling.KeyToolingError, KeyManagerStartupError) as exc:
            print(f"xks-proxy: {hsm.name}: {exc}", file=sys.stderr)
            status = EXIT_STARTUP
            continue
        if len(hsms) > 1:
            print(f"== {hsm.name}")
        print(tooling.format_key_table(rows))
    return status


def _keys_show(args: argparse.Namespace) -> int:
    return _keys_list(args, label=args.label)


def _import_config(args: argparse.Namespace) -> int:
    from xks_proxy.migration import SampleSettingsError, import_sample_settings

    try:
        result = import_sample_settings(
            args.settings, token_label=args.token_label, working_dir=args.working_dir
        )
    except SampleSettingsError as exc:
        print(f"xks-proxy: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    sys.stdout.write(result.config_toml)
    for line in result.report:
        print(line, file=sys.stderr)
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    from xks_proxy.observability.audit import main_verify

    return main_verify(args.files, args.chain_key_file)


def _authz_check(args: argparse.Namespace) -> int:
    from xks_proxy import authz
    from xks_proxy.protocol.models import XksOperation

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    stores = {store.name: store for store in config.key_stores}
    name = args.key_store or (next(iter(stores)) if len(stores) == 1 else None)
    store = stores.get(name) if name else None
    if store is None:
        print(
            f"xks-proxy: name a key store with --key-store (have: {', '.join(stores)})",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    if not store.policy_sources:
        print(f"allow: key store {store.name!r} has no policy files (no secondary authorization)")
        return 0
    try:
        request = json.loads(args.request.read_text(encoding="utf-8"))
        metadata = authz.metadata_from_json(request)
        decision = authz.Authorizer.from_sources(store.policy_sources, cache_size=0).authorize(
            XksOperation(args.operation), store.name, args.key, metadata
        )
    except (OSError, ValueError) as exc:
        print(f"xks-proxy: cannot check that request: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(authz.explain(decision))
    return 0 if decision.allowed else 1


def _credentials_new(args: argparse.Namespace) -> int:
    credential = new_credential()
    if args.json:
        print(
            json.dumps(
                {
                    "AccessKeyId": credential.access_key_id,
                    "RawSecretAccessKey": credential.secret_access_key,
                }
            )
        )
    else:
        print(f'access_key_id = "{credential.access_key_id}"')
        print(f'secret_access_key = "{credential.secret_access_key}"')
    return 0


def _kms_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    stores = {store.name: store for store in config.key_stores}
    store = stores.get(args.key_store)
    if store is None:
        print(
            f"xks-proxy: no key store named {args.key_store!r} (have: {', '.join(stores)})",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    credentials = {c.access_key_id: c for c in store.credentials}
    credential = credentials.get(args.access_key_id) if args.access_key_id else store.credentials[0]
    if credential is None:
        print(
            f"xks-proxy: key store {store.name!r} has no access key id {args.access_key_id!r}",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    text = json.dumps(kms_console_config(store, credential), indent=2) + "\n"
    if args.output:
        from xks_proxy.demo import write_private

        write_private(args.output, text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
