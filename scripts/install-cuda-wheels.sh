#!/usr/bin/env bash
# Installs NVIDIA's CUDA compile-check tools from PyPI wheels (no GPU, no driver, no CUDA toolkit):
# NVRTC (run-time compiler library), cuobjdump and nvdisasm (SASS disassembly).
#
# Usage:
#   scripts/install-cuda-wheels.sh [DIR]        # install (idempotent) and print `export` lines
#   eval "$(scripts/install-cuda-wheels.sh)"    # ... and apply them to this shell
#   source scripts/install-cuda-wheels.sh       # same, when sourced
#
# DIR defaults to $FLASHATTN_CUDA_WHEELS or ~/.cache/flashattn/cuda-wheels. The exports are
# FLASHATTN_NVRTC_PATH (folder holding libnvrtc.so.*), FLASHATTN_CUOBJDUMP and PATH; the
# flashattn-cuda crate reads the first two. Progress goes to stderr, exports to stdout.

_fa_install_cuda_wheels() {
    local dir="${1:-${FLASHATTN_CUDA_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/flashattn/cuda-wheels}}"
    # NVRTC 13.0 matches the drivers (580) of the GPUs we test on; the disassemblers exist from 13.2
    # on and read any sm_90 cubin.
    local pkgs="nvidia-cuda-nvrtc==13.0.* nvidia-cuda-cuobjdump>=13.2,<14 nvidia-cuda-nvdisasm>=13.2,<14"
    local py="${PYTHON:-python3}"
    command -v "$py" >/dev/null || { echo "install-cuda-wheels: $py not found" >&2; return 1; }
    mkdir -p "$dir" || return 1
    local stamp="$dir/.installed"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$pkgs" ]; then
        echo "install-cuda-wheels: installing $pkgs into $dir" >&2
        # --target keeps it out of the system's site-packages (Debian's pip refuses those).
        "$py" -m pip install --quiet --disable-pip-version-check --no-deps --upgrade \
            --target "$dir" $pkgs >&2 || return 1
        echo "$pkgs" >"$stamp"
    fi
    local nvrtc cuobjdump nvdisasm
    nvrtc="$(find "$dir/nvidia" -name 'libnvrtc.so.*' ! -name '*builtins*' -print -quit 2>/dev/null)"
    cuobjdump="$(find "$dir/nvidia" -name cuobjdump -type f -print -quit 2>/dev/null)"
    nvdisasm="$(find "$dir/nvidia" -name nvdisasm -type f -print -quit 2>/dev/null)"
    if [ -z "$nvrtc" ] || [ -z "$cuobjdump" ] || [ -z "$nvdisasm" ]; then
        echo "install-cuda-wheels: missing files under $dir (nvrtc='$nvrtc' cuobjdump='$cuobjdump' nvdisasm='$nvdisasm')" >&2
        return 1
    fi
    chmod +x "$cuobjdump" "$nvdisasm"
    FLASHATTN_NVRTC_PATH="$(dirname "$nvrtc")"
    FLASHATTN_CUOBJDUMP="$cuobjdump"
    # cuobjdump runs nvdisasm from PATH for sm_90 SASS.
    PATH="$(dirname "$cuobjdump"):$(dirname "$nvdisasm"):$PATH"
    export FLASHATTN_NVRTC_PATH FLASHATTN_CUOBJDUMP PATH
    echo "export FLASHATTN_NVRTC_PATH='$FLASHATTN_NVRTC_PATH'"
    echo "export FLASHATTN_CUOBJDUMP='$FLASHATTN_CUOBJDUMP'"
    echo "export PATH='$(dirname "$cuobjdump"):$(dirname "$nvdisasm"):'\"\$PATH\""
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    _fa_install_cuda_wheels "$@"
else
    _fa_install_cuda_wheels "$@"
fi
