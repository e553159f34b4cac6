#!/usr/bin/env bash
# Start the local Redis the tests and the demo use, unless one already answers on 127.0.0.1:PORT
# (REDIS_PORT, default 6379).
set -euo pipefail
PORT="${REDIS_PORT:-6379}"
if redis-cli -h 127.0.0.1 -p "$PORT" ping 2>/dev/null | grep -q PONG; then exit 0; fi
if ! command -v redis-server >/dev/null; then
  echo "installing redis-server" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools
fi
mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$PORT" --save "" --appendonly no \
  --dir /tmp --logfile "/tmp/callscribe-redis-$PORT.log"
for _ in $(seq 50); do
  redis-cli -h 127.0.0.1 -p "$PORT" ping 2>/dev/null | grep -q PONG && { echo "started redis on 127.0.0.1:$PORT" >&2; exit 0; }
  sleep 0.1
done
echo "redis did not start; see /tmp/callscribe-redis-$PORT.log" >&2
exit 1
