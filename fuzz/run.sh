#!/usr/bin/env bash
# fuzz/run.sh SECONDS [TARGET...]: each target (default: all) for SECONDS under atheris, seeded
# from real messages; exits non-zero if any target crashed (crash-* inputs land in fuzz/out/TARGET).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
SECONDS_EACH=${1:-30}
shift || true
PY=${PYTHON:-$ROOT/.venv/bin/python}
WORK=fuzz/out
mkdir -p "$WORK"
"$PY" -m fuzz.corpus "$WORK/seeds"
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
  mapfile -t TARGETS < <("$PY" -c 'from fuzz.targets import TARGETS; print("\n".join(TARGETS))')
fi
failed=()
for target in "${TARGETS[@]}"; do
  mkdir -p "$WORK/$target/corpus"
  echo "== $target (${SECONDS_EACH}s)"
  # corpus dir first: new interesting inputs are kept there for longer runs on demand
  if ! (cd "$WORK/$target" && timeout $((SECONDS_EACH + 60)) "$PY" -m fuzz.fuzz "$target" \
        corpus "$ROOT/$WORK/seeds/$target" -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 \
        -timeout=10 -print_final_stats=1 > log.txt 2>&1); then
    failed+=("$target")
    tail -30 "$WORK/$target/log.txt"
  else
    grep -E "stat::number_of_executed_units|Done" "$WORK/$target/log.txt" | tail -2 || true
  fi
done
if [ ${#failed[@]} -ne 0 ]; then
  echo "FUZZ FAILED: ${failed[*]}"
  exit 1
fi
echo "fuzz: ${#TARGETS[@]} targets, ${SECONDS_EACH}s each, 0 crashes"
