#!/usr/bin/env bash
# Builds the demo into www/ (www/pkg: the wasm module and its JS bindings).
# On a fresh machine it first installs the wasm32 target and the wasm-bindgen-cli whose
# version matches the wasm-bindgen crate in Cargo.lock (compiled from the cargo registry, once:
# a matching `wasm-bindgen` already on PATH or in $CARGO_HOME/bin is reused).
set -euo pipefail
cd "$(dirname "$0")"

log() { echo "build.sh: $*" >&2; }

for tool in rustup cargo; do
    command -v "$tool" >/dev/null 2>&1 || { log "needs $tool on PATH (install Rust with rustup)"; exit 1; }
done

if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
    log "adding the wasm32-unknown-unknown target"
    rustup target add wasm32-unknown-unknown
fi

version=$(awk '$0 == "name = \"wasm-bindgen\"" { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
if [ -z "$version" ]; then
    log "no wasm-bindgen in Cargo.lock"
    exit 1
fi
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
version_of() { "$1" --version 2>/dev/null | awk '{print $2}' || true; }
wasm_bindgen=""
for candidate in "$(command -v wasm-bindgen || true)" "$cargo_bin/wasm-bindgen"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] && [ "$(version_of "$candidate")" = "$version" ]; then
        wasm_bindgen="$candidate"
        break
    fi
done
if [ -z "$wasm_bindgen" ]; then
    log "installing wasm-bindgen-cli $version into $cargo_bin (a few minutes, once)"
    # Its own target dir: the install must not wait on a workspace build's lock.
    CARGO_TARGET_DIR="${WASM_BINDGEN_BUILD_DIR:-target/wasm-bindgen-cli}" \
        cargo install wasm-bindgen-cli --version "$version" --locked
    wasm_bindgen="$cargo_bin/wasm-bindgen"
fi

target_dir="${CARGO_TARGET_DIR:-target}"
log "building the wasm module (release)"
# No --locked: the backend's dependencies may move ahead of this lockfile; wasm-bindgen
# itself is pinned exactly in Cargo.toml, so it still matches the CLI.
cargo build --release --target wasm32-unknown-unknown
"$wasm_bindgen" --target web --no-typescript --out-dir www/pkg \
    "$target_dir/wasm32-unknown-unknown/release/flashattn_web_demo.wasm"
log "built www/pkg ($(du -h www/pkg/flashattn_web_demo_bg.wasm | cut -f1) of wasm)"
