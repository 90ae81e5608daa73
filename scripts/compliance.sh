#!/usr/bin/env bash
# Run the official AWS XKS compliance client (a checkout of
# aws-samples/aws-kms-xksproxy-test-client, not part of this repository) against
# `xks-proxy demo` on loopback, with the client's default credentials and prefix.
#   scripts/compliance.sh CLIENT_DIR [http|tls|mtls] [PORT]
# http: 49 tests over plain HTTP; tls: the same 49 over HTTPS; mtls: HTTPS with a
# client certificate, plus the client's two negative mTLS tests (51 in all).
set -euo pipefail
cd "$(dirname "$0")/.."
client_dir=$(cd "${1:?usage: scripts/compliance.sh CLIENT_DIR [http|tls|mtls] [PORT]}" && pwd)
mode=${2:-http}
port=${3:-8765}
workdir=$(mktemp -d)
log="$workdir/proxy.log"
./scripts/bootstrap.sh
flags=()
scheme=""
secure=""
mtls=""
case "$mode" in
    http) ;;
    tls) flags=(--tls); scheme="https://"; secure="--cacert $workdir/demo/pki/ca.pem" ;;
    mtls) flags=(--mtls); scheme="https://"; secure="--cacert $workdir/demo/pki/ca.pem"
          mtls="--cert $workdir/demo/pki/client.pem --key $workdir/demo/pki/client-key.pem" ;;
    *) echo "mode must be http, tls or mtls" >&2; exit 2 ;;
esac
.venv/bin/xks-proxy demo --dir "$workdir/demo" --port "$port" "${flags[@]}" \
    --uri-prefix example/uri/path/prefix \
    --access-key-id BETWEEN2TENAND3TENCHARACTERS \
    --secret-access-key PleaseReplaceThisWithSomeSecretOfLength43To64 >"$log" 2>&1 &
proxy_pid=$!
trap 'kill $proxy_pid 2>/dev/null; wait $proxy_pid 2>/dev/null; rm -rf "$workdir"' EXIT
for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
done
sleep 1  # the worker opens its HSM sessions after the port is bound
cd "$client_dir"
output=$(XKS_PROXY_HOST="127.0.0.1:$port" SCHEME="$scheme" SECURE="$secure" MTLS="$mtls" \
    ANSI_ESCAPE=0 ./test-xks-proxy -a 2>&1) || true
echo "$output" | grep -a -E "^=> Test" || true
summary=$(echo "$output" | tail -n 1)
echo "$summary"
case "$summary" in
    *"All "*" tests PASSED."*) exit 0 ;;
    *) exit 1 ;;
esac
