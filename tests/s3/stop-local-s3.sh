#!/usr/bin/env bash
# Copied from the shared test tooling's s3/stop-local-s3.sh (../shared/s3 beside the repo), unchanged but
# for this note: CI runs on a clean clone without ../shared. tests/s3/rgw.py runs it.
# stop-local-s3.sh - stop the cluster started by start-local-s3.sh and remove its directory.
#
# Usage: stop-local-s3.sh [DIR]        (DIR defaults to $S3_DIR)
#        S3_KEEP_DIR=1 stop-local-s3.sh DIR   # stop daemons, keep the directory (logs)
#
# Only the PIDs recorded in DIR/pids/* are signalled, and only if that process
# was started with DIR/ceph.conf on its command line (guards against PID reuse).
# Safe to run twice, or on a directory whose daemons are already gone.
set -uo pipefail

log() { printf '[local-s3] %s\n' "$*" >&2; }

DIR="${1:-${S3_DIR:-}}"
[ -n "$DIR" ] || { log "usage: stop-local-s3.sh DIR (or set S3_DIR)"; exit 2; }
if [ ! -d "$DIR" ]; then log "$DIR does not exist: nothing to stop"; exit 0; fi
DIR=$(cd "$DIR" && pwd -P)
if [ ! -f "$DIR/.local-s3-ceph" ]; then
  log "$DIR was not made by start-local-s3.sh (no marker): refusing to touch it"; exit 1
fi
CONF="$DIR/ceph.conf"

ours() { # PID is alive and is one of our daemons
  [ -n "$1" ] && [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -qF -- "$CONF"
}

running() { # process still exists and is not just an unreaped zombie
  local st n
  st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$st" ] || return 1
  [ "$st" != Z ] && return 0
  # a zombie thread-group leader whose other threads are still shutting down
  n=$(find "/proc/$1/task" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
  [ "$n" -gt 1 ]
}

pids=""
# stop the gateway first, then the OSD, the manager and the monitor last
for name in rgw.a osd.0 mgr.x mon.a; do
  f="$DIR/pids/$name"
  [ -f "$f" ] || continue
  p=$(cat "$f")
  if ours "$p"; then
    kill -TERM "$p" 2>/dev/null && pids="$pids $p"
  fi
done

# wait up to 20 s for a clean exit, then SIGKILL whatever is left
for _ in $(seq 1 40); do
  left=""
  for p in $pids; do running "$p" && left="$left $p"; done
  [ -z "$left" ] && break
  sleep 0.5
done
for p in $left; do
  log "PID $p did not stop on SIGTERM: SIGKILL"
  kill -KILL "$p" 2>/dev/null || true
done
if [ -n "$pids" ]; then log "stopped PIDs:$pids"; else log "no running daemons in $DIR"; fi

if [ "${S3_KEEP_DIR:-0}" = 1 ]; then
  log "kept $DIR"
else
  rm -rf -- "$DIR"
  log "removed $DIR"
fi
exit 0
