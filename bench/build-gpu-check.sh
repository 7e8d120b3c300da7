#!/usr/bin/env bash
# Builds here (x86-64; the device image has no cargo) exactly what bench/gpu-check.sh runs,
# into .device/gpu-check/ (git-ignored):
#   flashattn        the CLI, release (cuda feature on: `run`, `bench`, `cuda compile`)
#   cuda_bench       backends/cuda/examples/cuda_bench.rs (kernel and tile sweeps)
#   tests/gpu*       every GPU test executable of flashattn-cuda (tests/gpu*.rs), release
# Then call the device tool with carry [".device"] and the command `bash bench/gpu-check.sh`
# (timeout_s 540). Prints the sizes: the carried tree must stay under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
out=.device/gpu-check
rm -rf "$out"
mkdir -p "$out/tests"

cargo build --release --bin flashattn
cp target/release/flashattn "$out/"
cargo build --release -p flashattn-cuda --example cuda_bench
cp target/release/examples/cuda_bench "$out/"

# The test executables cargo builds, read from its JSON messages (target name gpu*).
cargo test --release -p flashattn-cuda --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in t.get("kind", []) \
            and t.get("name", "").startswith("gpu"):
        print(t["name"], m["executable"])
' | while read -r name exe; do
    cp "$exe" "$out/tests/$name"
done
ls "$out/tests/"gpu* >/dev/null # fails the build when no GPU test was found

if command -v strip >/dev/null; then
    strip "$out/flashattn" "$out/cuda_bench" "$out"/tests/*
fi
du -sh "$out"
ls -l "$out" "$out/tests"
echo "carry: [\".device\"]   command: bash bench/gpu-check.sh   timeout_s: 540"
