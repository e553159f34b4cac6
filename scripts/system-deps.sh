#!/usr/bin/env bash
# Debian packages the tests drive as real peers; installed only when missing.
set -euo pipefail
declare -A need=(
  [ffmpeg]=ffmpeg          # RTP sender (μ-law, A-law, Opus, L16)
  [sipp]=sip-tester        # SIP/SIPREC caller
  [baresip]=baresip        # SIP softphone
  [espeak-ng]=espeak-ng    # extra speech
  [sox]=sox                # audio checks
  [chromium]=chromium      # WebRTC + dashboard browser tests
  [chromedriver]=chromium-driver
  [redis-server]=redis-server
  [kamailio]=kamailio          # SIP proxy in front of two instances (tests/lab)
)
missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${need[$cmd]}")
done
# docker-compose only validates docker-compose.yml (no daemon): skip its recommended engine.
bare=()
command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || bare+=(docker-compose)
[ ${#missing[@]} -eq 0 ] && [ ${#bare[@]} -eq 0 ] && exit 0
echo "installing Debian packages: ${missing[*]} ${bare[*]}" >&2
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
$SUDO apt-get update -qq
[ ${#missing[@]} -eq 0 ] || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
[ ${#bare[@]} -eq 0 ] || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${bare[@]}"
