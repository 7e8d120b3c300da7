#!/usr/bin/env bash
# Installs what web-demo/test.sh needs beyond Rust: Debian's chromium (its bundled SwiftShader
# gives headless WebGPU without a GPU), Node.js if absent, and playwright-core from
# web-demo/package-lock.json. Idempotent: does nothing when everything is in place.
# Run as root or with sudo on Debian/Ubuntu.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
fi

missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ] && [ -z "$SUDO" ]; then
        echo "install-web-test-deps: need root to install ${missing[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq >/dev/null
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    echo "install-web-test-deps: installed ${missing[*]}"
fi

# npm ci only when the lockfile changed since the last install (it wipes node_modules).
cd "$root/web-demo"
stamp=node_modules/.flashattn-lock.sha256
want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ] || [ ! -d node_modules/playwright-core ]; then
    # playwright-core drives the system chromium; never download a browser.
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error
    echo "$want" >"$stamp"
    echo "install-web-test-deps: installed playwright-core ($(node -p "require('./node_modules/playwright-core/package.json').version"))"
fi
