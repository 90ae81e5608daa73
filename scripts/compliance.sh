#!/usr/bin/env bash
# Run the official AWS XKS compliance client (a checkout of
# aws-samples/aws-kms-xksproxy-test-client, not part of this repository) against
# `xks-proxy demo` on loopback, with the client's default credentials and prefix.
#   scripts/compliance.sh CLIENT_DIR [PORT]
set -euo pipefail
cd "$(dirname "$0")/.."
client_dir=$(cd "${1:?usage: scripts/compliance.sh CLIENT_DIR [PORT]}" && pwd)
port=${2:-8765}
workdir=$(mktemp -d)
log="$workdir/proxy.log"
./scripts/bootstrap.sh
.venv/bin/xks-proxy demo --dir "$workdir/demo" --port "$port" \
    --uri-prefix example/uri/path/prefix \
    --access-key-id BETWEEN2TENAND3TENCHARACTERS \
    --secret-access-key PleaseReplaceThisWithSomeSecretOfLength43To64 >"$log" 2>&1 &
proxy_pid=$!
trap 'kill $proxy_pid 2>/dev/null; wait $proxy_pid 2>/dev/null; rm -rf "$workdir"' EXIT
for _ in $(seq 1 100); do
    curl -s -o /dev/null "http://127.0.0.1:$port/" && break
    sleep 0.1
done
cd "$client_dir"
output=$(XKS_PROXY_HOST="127.0.0.1:$port" SCHEME= ANSI_ESCAPE=0 ./test-xks-proxy -a 2>&1) || true
echo "$output" | grep -E "^=> Test" || true
summary=$(echo "$output" | tail -n 1)
echo "$summary"
case "$summary" in
    *"All "*" tests PASSED."*) exit 0 ;;
    *) exit 1 ;;
esac
