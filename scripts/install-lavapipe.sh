#!/usr/bin/env bash
# Installs lavapipe (Mesa's CPU Vulkan driver) and the Vulkan loader, so the wgpu backend has
# an adapter on machines without a GPU, and g++ for the CUDA kernel emulator tests. Idempotent and quiet (prints one line when it installs,
# the apt log only on failure). Run as root, or as a user with sudo, on Debian or Ubuntu.
set -euo pipefail

PACKAGES=(mesa-vulkan-drivers libvulkan1 g++)

missing=()
for p in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        echo "install-lavapipe: need root to install ${missing[*]}" >&2
        exit 1
    fi
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
if ! { "${SUDO[@]}" apt-get update -qq && \
       "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "install-lavapipe: apt-get failed installing ${missing[*]}" >&2
    exit 1
fi
echo "install-lavapipe: installed ${missing[*]}"
