#!/usr/bin/env bash
# Serves the built demo on http://localhost:PORT/ (default 8000). WebGPU needs a secure
# context, which localhost is; run build.sh first.
set -euo pipefail
cd "$(dirname "$0")/www"
if [ ! -f pkg/flashattn_web_demo.js ]; then
    echo "serve.sh: www/pkg is missing; run web-demo/build.sh first" >&2
    exit 1
fi
port="${1:-8000}"
echo "serve.sh: open http://localhost:$port/ (Ctrl-C stops)" >&2
exec python3 -m http.server "$port" --bind 127.0.0.1
