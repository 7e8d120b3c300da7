#!/usr/bin/env bash
# Builds the demo into www/ (www/pkg: the wasm module and its JS bindings).
# On a fresh machine it first installs the wasm32 target and the wasm-bindgen-cli whose
# version matches the wasm-bindgen crate in Cargo.lock (compiled from crates.io, once:
# a matching `wasm-bindgen` already on PATH or in $CARGO_HOME/bin is reused).
set -euo pipefail
cd "$(dirname "$0")"

log() { echo "build.sh: $*" >&2; }

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
export PATH="$PATH:$cargo_bin"
have=$(wasm-bindgen --version 2>/dev/null | awk '{print $2}' || true)
if [ "$have" != "$version" ]; then
    log "installing wasm-bindgen-cli $version (found '${have:-none}'; takes a few minutes, once)"
    # Its own target dir: the install must not fight a workspace build for the lock.
    CARGO_TARGET_DIR="${WASM_BINDGEN_BUILD_DIR:-target/wasm-bindgen-cli}" \
        cargo install wasm-bindgen-cli --version "$version" --locked
    hash -r
fi

target_dir="${CARGO_TARGET_DIR:-target}"
log "building the wasm module (release)"
cargo build --locked --release --target wasm32-unknown-unknown
wasm-bindgen --target web --no-typescript --out-dir www/pkg \
    "$target_dir/wasm32-unknown-unknown/release/flashattn_web_demo.wasm"
log "built www/pkg ($(du -h www/pkg/flashattn_web_demo_bg.wasm | cut -f1) of wasm)"
