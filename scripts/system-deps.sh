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
  [docker-compose]=docker-compose  # validates docker-compose.yml (no daemon needed)
)
missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${need[$cmd]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing Debian packages: ${missing[*]}" >&2
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
