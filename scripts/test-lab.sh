#!/usr/bin/env bash
# Run the lab suite (tests/lab, marker `lab`): real peers in real processes (Asterisk built from
# ../shared/vendor by scripts/asterisk.sh, cached) against a real `callscribe serve`. Fails when
# a lab test is skipped or none ran: a silent skip here would hide that the real PBX never ran.
# Prints what the lab measured (per-path WER, hangup -> leg.ended latency) from the report.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
# Build before any test's clock starts (first run on a machine: several minutes).
scripts/asterisk.sh >/dev/null
report=$(mktemp -t callscribe-lab-XXXXXX.xml)
trap 'rm -f "$report"' EXIT
status=0
# junit_family=legacy keeps the tests' record_property figures in the report.
timeout 1800 .venv/bin/python -m pytest -q -p no:cacheprovider -rs -m lab \
  -o junit_family=legacy --junitxml="$report" "$@" tests/lab || status=$?
if [ "$status" -ne 0 ]; then exit "$status"; fi
.venv/bin/python - "$report" <<'PY'
import sys
import xml.etree.ElementTree as ET

suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
tests, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
for case in suite.iter("testcase"):
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    if props:
        print(f"  {case.get('name')}: " + ", ".join(f"{k}={v}" for k, v in props.items()))
if tests == 0 or skipped:
    sys.exit(f"test-lab: {tests} tests, {skipped} skipped: the lab tests must all run")
print(f"test-lab: {tests} lab tests ran against real peers, none skipped")
PY
