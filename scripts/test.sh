#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine with only the Rust toolchain:
# installs what the tests need (lavapipe for wgpu, NVRTC/cuobjdump wheels for the CUDA
# compile checks, Chromium + playwright-core for the browser demo), then lints and tests.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "installing test dependencies"
bash scripts/install-lavapipe.sh
# Sourced: exports the NVRTC library and cuobjdump locations for the CUDA compile checks.
# shellcheck source=/dev/null
. scripts/install-cuda-wheels.sh
bash scripts/install-web-test-deps.sh

step "format and lint"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

step "flashattn-cuda next to candle-core's CUDA feature (cudarc features, check only)"
bash scripts/check-cudarc-joint.sh

step "unit, property and integration tests (every backend available here)"
cargo test --workspace

step "browser demo, end to end in headless Chromium"
bash web-demo/test.sh
