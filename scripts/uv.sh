#!/usr/bin/env bash
# Run the project's uv: the one on PATH if it is the pinned version, else the pinned version
# installed once into ~/.cache/mmserve/uv-$UV_VERSION (pip's configuration plays no part after
# that: uv reads PyPI only, so these machines' local torch+cpu wheels never stand in).
set -euo pipefail
UV_VERSION=0.13.9
PYTHON=${PYTHON:-python3}
if command -v uv >/dev/null 2>&1 && [ "$(uv --version | cut -d' ' -f2)" = "$UV_VERSION" ]; then
  exec uv "$@"
fi
tool="${MMSERVE_CACHE_DIR:-$HOME/.cache/mmserve}/uv-$UV_VERSION"
if [ ! -x "$tool/bin/uv" ]; then
  "$PYTHON" -m venv "$tool" >&2
  "$tool/bin/python" -m pip install -q "uv==$UV_VERSION" >&2
fi
exec "$tool/bin/uv" "$@"
