#!/usr/bin/env bash
# Make sure a Redis answers at 127.0.0.1:6379: use the running one, else start one
# (installing Debian's redis-server if missing). Keeps nothing on disk.
set -euo pipefail
ping() { (exec 3<>/dev/tcp/127.0.0.1/6379 && printf 'PING\r\n' >&3 && timeout 2 head -c 5 <&3 | grep -q PONG) 2>/dev/null; }
if ping; then echo "== redis: using 127.0.0.1:6379"; exit 0; fi
if ! command -v redis-server >/dev/null; then
  echo "== redis: installing Debian's redis-server"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
echo "== redis: starting redis-server on 127.0.0.1:6379"
redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
  --dir /tmp --logfile /tmp/ponder-redis.log
for _ in $(seq 50); do ping && exit 0; sleep 0.1; done
echo "redis did not come up"; exit 1
