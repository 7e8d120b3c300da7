#!/usr/bin/env bash
# The demo's tests: native unit tests of its logic, then the page end to end in headless
# Chromium on SwiftShader's WebGPU (build, serve on a free localhost port, drive it with
# playwright-core, stop the server). Needs scripts/install-web-test-deps.sh first.
# Ends with `web-demo: N passed, M failed`; exits non-zero on any failure.
set -uo pipefail
cd "$(dirname "$0")"

fail() {
    echo "test.sh: $*" >&2
    echo "web-demo: 0 passed, 1 failed"
    exit 1
}

[ -x "${CHROMIUM:-/usr/bin/chromium}" ] || fail "no chromium; run scripts/install-web-test-deps.sh"
[ -d node_modules/playwright-core ] || fail "no playwright-core; run scripts/install-web-test-deps.sh"

# Native unit tests (config, heatmap, report): the wasm build does not run them.
unit_log=$(mktemp)
cargo test 2>&1 | tee "$unit_log" | grep -E '^(test |error|failures)' >&2
unit_rc=${PIPESTATUS[0]}
unit_passed=$(awk '/^test result:/ { s += $4 } END { print s + 0 }' "$unit_log")
unit_failed=$(awk '/^test result:/ { s += $6 } END { print s + 0 }' "$unit_log")
rm -f "$unit_log"
if [ "$unit_rc" -ne 0 ] && [ "$unit_failed" -eq 0 ]; then
    fail "cargo test failed to build or run"
fi

./build.sh || fail "build failed"

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -m http.server "$port" --bind 127.0.0.1 --directory www >/dev/null 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null' EXIT
for _ in $(seq 1 50); do
    python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/index.html', timeout=1)" \
        2>/dev/null && break
    sleep 0.2
done

e2e_log=$(mktemp)
node tests/e2e.mjs "http://127.0.0.1:$port/" 2>&1 | tee "$e2e_log"
e2e_rc=${PIPESTATUS[0]}
e2e_passed=$(sed -n 's/^e2e: \([0-9]*\) passed, \([0-9]*\) failed$/\1/p' "$e2e_log")
e2e_failed=$(sed -n 's/^e2e: \([0-9]*\) passed, \([0-9]*\) failed$/\2/p' "$e2e_log")
rm -f "$e2e_log"
if [ -z "$e2e_passed" ]; then
    e2e_passed=0
    e2e_failed=1 # the runner died before its summary
elif [ "$e2e_rc" -ne 0 ] && [ "$e2e_failed" -eq 0 ]; then
    e2e_failed=1
fi

echo "unit: $unit_passed passed, $unit_failed failed; e2e: $e2e_passed passed, $e2e_failed failed"
passed=$((unit_passed + e2e_passed))
failed=$((unit_failed + e2e_failed))
echo "web-demo: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
