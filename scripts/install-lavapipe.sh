#!/usr/bin/env bash
# Installs lavapipe (Mesa's CPU Vulkan driver) so the wgpu backend has an adapter on machines
# without a GPU. Idempotent and quiet; run as root (or with sudo) on Debian/Ubuntu.
set -euo pipefail

PACKAGES=(mesa-vulkan-drivers libvulkan1)

missing=()
for p in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install-lavapipe: need root to install ${missing[*]}" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-lavapipe: installed ${missing[*]}"
