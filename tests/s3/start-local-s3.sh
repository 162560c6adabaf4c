#!/usr/bin/env bash
# Copied from the shared test tooling's s3/start-local-s3.sh (../shared/s3 beside the repo), unchanged but
# for this note: CI runs on a clean clone without ../shared. tests/s3/rgw.py runs it.
# start-local-s3.sh - start a real, single-node Ceph cluster with an S3 endpoint
# (Ceph RADOS Gateway) on 127.0.0.1, for tests. Debian 12 (bookworm) packages.
#
#   1 ceph-mon, 1 ceph-mgr, 1 ceph-osd (BlueStore on a sparse file, or MemStore)
#   and 1 radosgw (beast frontend), no systemd, all state under one directory.
#
# Usage:
#   eval "$(start-local-s3.sh [DIR])"      # DIR defaults to $S3_DIR, else a mktemp dir
#   ... run tests (S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY set) ...
#   stop-local-s3.sh "$S3_DIR"
#
# stdout carries only `export` lines (safe for eval); progress goes to stderr.
# Running it again on a DIR whose cluster is still up just prints the exports.
#
# Environment knobs (all optional):
#   S3_DIR               state directory (argument 1 wins)
#   S3_OBJECTSTORE       bluestore (default, sparse file under DIR) | memstore (RAM)
#   S3_OSD_SIZE_GB       size of the OSD device (sparse file / RAM cap), default 20 (memstore: 4)
#   S3_PORT              radosgw port (default: a free port)
#   S3_MON_PORT          monitor (msgr2) port (default: a free port)
#   S3_ACCESS_KEY        access key to create (default: random)
#   S3_SECRET_KEY        secret key to create (default: random)
#   S3_START_TIMEOUT     seconds to wait for each daemon (default 120)
#   S3_NO_INSTALL=1      never call apt-get
#   S3_KEEP_ON_FAILURE=1 if start-up fails, leave the daemons running for debugging
#                        (default: stop the daemons it started, keep DIR/log)
set -Eeuo pipefail
# keep stdout for the export lines only: everything else goes to stderr
exec 3>&1 1>&2

log() { printf '[local-s3] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

T0=$(date +%s)
MARKER=.local-s3-ceph
DAEMONS="mon.a mgr.x osd.0 rgw.a"

# ------------------------------------------------------------------ packages
need_bins="ceph-mon ceph-mgr ceph-osd radosgw radosgw-admin ceph ceph-authtool monmaptool"
missing=""
for b in $need_bins; do command -v "$b" >/dev/null 2>&1 || missing="$missing $b"; done
if [ -n "$missing" ]; then
  [ "${S3_NO_INSTALL:-0}" = 1 ] && die "missing:$missing (S3_NO_INSTALL=1)"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "missing:$missing and not root (no sudo)"
    SUDO="sudo"
  fi
  pkgs=(ceph-mon ceph-mgr ceph-osd radosgw ceph-common)
  command -v curl >/dev/null 2>&1 || pkgs+=(curl)
  log "installing Debian packages: ${pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! $SUDO apt-get install -y -q --no-install-recommends "${pkgs[@]}" >&2; then
    $SUDO apt-get update -q >&2
    $SUDO apt-get install -y -q --no-install-recommends "${pkgs[@]}" >&2
  fi
fi
# the system interpreter (a dependency of ceph-common), not whatever python3 a venv/pyenv puts first
if [ -x /usr/bin/python3 ]; then PY=/usr/bin/python3; else PY=$(command -v python3) || die "python3 is needed"; fi
command -v curl >/dev/null 2>&1 && HAVE_CURL=1 || HAVE_CURL=0

# ------------------------------------------------------------------ directory
DIR="${1:-${S3_DIR:-}}"
if [ -z "$DIR" ]; then
  DIR=$(mktemp -d "${TMPDIR:-/tmp}/local-s3.XXXXXX")
fi
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd -P)
CONF="$DIR/ceph.conf"
# admin sockets are unix sockets: path must stay well under 108 bytes
[ ${#DIR} -le 70 ] || die "directory path too long for unix sockets (${#DIR} > 70): $DIR"

pid_alive() { # pid_alive PID -> true if PID runs and was started with our ceph.conf
  local p=$1
  [ -n "$p" ] && [ -r "/proc/$p/cmdline" ] && tr '\0' ' ' <"/proc/$p/cmdline" | grep -qF -- "$CONF"
}

print_env() { cat "$DIR/env.sh" >&3; }

if [ -f "$DIR/$MARKER" ]; then
  all_up=1
  [ -f "$DIR/env.sh" ] || all_up=0
  for n in $DAEMONS; do
    pid_alive "$(cat "$DIR/pids/$n" 2>/dev/null)" || all_up=0
  done
  if [ "$all_up" = 1 ]; then
    ep=$(sed -n "s/^export S3_ENDPOINT_URL='\(.*\)'\$/\1/p" "$DIR/env.sh")
    if curl -fsS -o /dev/null --max-time 5 "$ep" 2>/dev/null || [ "$HAVE_CURL" = 0 ]; then
      log "already running in $DIR"
      print_env
      exit 0
    fi
  fi
  log "stale state in $DIR: stopping leftovers and starting afresh"
  for n in $DAEMONS; do
    p=$(cat "$DIR/pids/$n" 2>/dev/null || true)
    if pid_alive "$p"; then kill -KILL "$p" 2>/dev/null || true; fi
  done
  sleep 1
  rm -rf "$DIR/pids" "$DIR/mon" "$DIR/mgr" "$DIR/osd" "$DIR/rgw" "$DIR/run" "$DIR/log" \
         "$DIR/crash" "$DIR/tmp" "$DIR/env.sh" "$DIR/ceph.conf" "$DIR/keyring"
elif [ -n "$(ls -A "$DIR")" ]; then
  die "$DIR is not empty and was not made by this script; refusing to touch it"
fi
touch "$DIR/$MARKER"

# on any failure from here on: stop the daemons this run started, keep the logs
SUCCESS=0
on_exit() {
  local rc=$?
  [ "$SUCCESS" = 1 ] && return 0
  if [ "${S3_KEEP_ON_FAILURE:-0}" = 1 ]; then
    log "start failed (rc=$rc); daemons left running (S3_KEEP_ON_FAILURE=1) in $DIR"; return 0
  fi
  local n p
  for n in $DAEMONS; do
    p=$(cat "$DIR/pids/$n" 2>/dev/null || true)
    if pid_alive "$p"; then kill -TERM "$p" 2>/dev/null || true; fi
  done
  log "start failed (rc=$rc): stopped the daemons it had started; logs kept in $DIR/log"
  log "remove the directory with: stop-local-s3.sh $DIR"
}
trap on_exit EXIT
trap 'log "command failed (line $LINENO): $BASH_COMMAND"' ERR
mkdir -p "$DIR"/{pids,mon/a,mgr/x,osd/0,rgw/a,run,log,crash,tmp}

# ------------------------------------------------------------------ settings
free_port() {
  "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
MON_PORT=${S3_MON_PORT:-$(free_port)}
OBJECTSTORE=${S3_OBJECTSTORE:-bluestore}
case "$OBJECTSTORE" in
  bluestore) OSD_GB=${S3_OSD_SIZE_GB:-20} ;;
  memstore)  OSD_GB=${S3_OSD_SIZE_GB:-4} ;;
  *) die "S3_OBJECTSTORE must be bluestore or memstore" ;;
esac
FSID=$(cat /proc/sys/kernel/random/uuid)
OSD_UUID=$(cat /proc/sys/kernel/random/uuid)
rand_hex() { "$PY" -c "import secrets; print(secrets.token_hex($1))"; }
ACCESS_KEY=${S3_ACCESS_KEY:-$("$PY" -c 'import secrets,string; a=string.ascii_uppercase+string.digits; print("".join(secrets.choice(a) for _ in range(20)))')}
SECRET_KEY=${S3_SECRET_KEY:-$(rand_hex 20)}
TIMEOUT=${S3_START_TIMEOUT:-120}

cat >"$CONF" <<EOF
# generated by start-local-s3.sh - single-node test cluster, do not use for real data
[global]
fsid = $FSID
mon host = [v2:127.0.0.1:$MON_PORT]
mon initial members = a
public addr = 127.0.0.1
ms bind ipv6 = false
ms bind msgr1 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
keyring = $DIR/keyring
run dir = $DIR/run
admin socket = $DIR/run/\$name.asok
pid file = $DIR/run/\$name.pid
log file = $DIR/log/\$name.log
mon cluster log file = $DIR/log/cluster.log
crash dir = $DIR/crash
tmp dir = $DIR/tmp
log to stderr = false
err to stderr = true
log flush on exit = true
# one OSD: replicate nothing, keep placement-group counts tiny
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
mon data avail warn = 2
mon data avail crit = 1
osd max object size = 134217728
rgw rados pool pg num min = 8

[mon]
mon data = $DIR/mon/\$id
# commit map changes (pool creation, OSD boot) every 0.1 s instead of every 1 s
paxos propose interval = 0.1
keyring = $DIR/mon/\$id/keyring

[mgr]
mgr data = $DIR/mgr/\$id
keyring = $DIR/mgr/\$id/keyring

[osd]
osd data = $DIR/osd/\$id
keyring = $DIR/osd/\$id/keyring
osd objectstore = $OBJECTSTORE
osd memory target = 1073741824
bluestore block create = true
bluestore block size = $((OSD_GB * 1024 * 1024 * 1024))
bluestore fsck on mkfs = false
bluestore min alloc size hdd = 4096
memstore device bytes = $((OSD_GB * 1024 * 1024 * 1024))
osd crush update on start = true

[client.rgw.a]
rgw data = $DIR/rgw/a
keyring = $DIR/rgw/a/keyring
# rgw frontends (beast endpoint=127.0.0.1:PORT) is given on the command line
rgw dns name = 127.0.0.1
rgw enable usage log = false
rgw thread pool size = 64
# reclaim the space of deleted objects within about a minute (default: 2 hours)
rgw gc obj min wait = 30
rgw gc processor period = 30
EOF

ceph_() { ceph -c "$CONF" --connect-timeout 15 "$@"; }

wait_for() { # wait_for DAEMON DESCRIPTION COMMAND...
  local d=$1 what=$2; shift 2
  local deadline=$(( $(date +%s) + TIMEOUT ))
  until "$@" >/dev/null 2>&1; do
    if ! pid_alive "$(cat "$DIR/pids/$d")"; then
      tail -n 30 "$DIR/log/$d.out" >&2 2>/dev/null || true
      die "$what exited during start-up (logs in $DIR/log)"
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      log "timed out waiting for $what; last log lines:"
      tail -n 30 "$DIR"/log/*.log >&2 2>/dev/null || true
      die "$what did not come up within ${TIMEOUT}s"
    fi
    sleep 0.5
  done
}

start_daemon() { # start_daemon NAME BINARY ARGS... ; foreground daemon, own session
  local name=$1; shift
  (
    # inherit no descriptor but /dev/null and the log: fd 3 is the caller's stdout, maybe the
    # pipe of an eval "$(...)", and a CI runner may wait on other inherited pipes
    for fd in /proc/"$BASHPID"/fd/*; do
      fd=${fd##*/}
      if [ "$fd" -gt 2 ]; then { eval "exec $fd>&-"; } 2>/dev/null || true; fi
    done
    exec setsid "$@" -c "$CONF" -f </dev/null >>"$DIR/log/$name.out" 2>&1
  ) &
  echo $! >"$DIR/pids/$name"
}

# ------------------------------------------------------------------ monitor
log "creating cluster fsid=$FSID in $DIR"
ceph-authtool --create-keyring "$DIR/tmp/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n client.admin \
  --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
ceph-authtool "$DIR/tmp/mon.keyring" --import-keyring "$DIR/keyring" >/dev/null
monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$MON_PORT]" "$DIR/tmp/monmap" >/dev/null
ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/tmp/monmap" --keyring "$DIR/tmp/mon.keyring" >>"$DIR/log/mkfs.log" 2>&1
start_daemon mon.a ceph-mon -i a
wait_for mon.a "ceph-mon" ceph_ mon stat
log "mon up ($(( $(date +%s) - T0 ))s)"

# ------------------------------------------------------------------ manager
ceph_ auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
  -o "$DIR/mgr/x/keyring" 2>/dev/null
start_daemon mgr.x ceph-mgr -i x

# ------------------------------------------------------------------ OSD
OSD_SECRET=$(ceph-authtool --gen-print-key)
OSD_ID=$(printf '{"cephx_secret": "%s"}' "$OSD_SECRET" | ceph_ osd new "$OSD_UUID" -i -)
[ "$OSD_ID" = 0 ] || die "unexpected OSD id '$OSD_ID'"
ceph-authtool --create-keyring "$DIR/osd/0/keyring" --name osd.0 --add-key "$OSD_SECRET" >/dev/null
ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$OSD_UUID" >>"$DIR/log/mkfs.log" 2>&1 \
  || { tail -n 20 "$DIR/log/mkfs.log" "$DIR/log/osd.0.log" >&2 2>/dev/null; die "ceph-osd --mkfs failed"; }
start_daemon osd.0 ceph-osd -i 0
# create the pools radosgw would otherwise create lazily (first bucket / upload / multipart);
# one librados session instead of 14 runs of the ceph CLI
RGW_POOLS=".rgw.root default.rgw.control default.rgw.meta default.rgw.log
  default.rgw.buckets.index default.rgw.buckets.data default.rgw.buckets.non-ec"
# shellcheck disable=SC2086
if ! "$PY" - "$CONF" $RGW_POOLS 2>>"$DIR/log/pools.log" <<'PYEOF'
import json, sys
import rados
c = rados.Rados(conffile=sys.argv[1], name="client.admin")
c.connect(timeout=60)
for pool in sys.argv[2:]:
    for cmd in ({"prefix": "osd pool create", "pool": pool, "pg_num": 8, "pgp_num": 8},
                {"prefix": "osd pool application enable", "pool": pool, "app": "rgw"}):
        ret, out, err = c.mon_command(json.dumps(cmd), b"", timeout=60)
        if ret != 0:
            sys.exit("%s: %s %s" % (cmd, ret, err))
c.shutdown()
PYEOF
then
  log "python3-rados unusable, creating pools with the ceph CLI"
  for pool in $RGW_POOLS; do
    ceph_ osd pool create "$pool" 8 8 >/dev/null 2>&1
    ceph_ osd pool application enable "$pool" rgw >/dev/null 2>&1
  done
fi
osd_up() { [ "$(ceph_ osd stat -f json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["num_up_osds"])')" = 1 ]; }
wait_for osd.0 "ceph-osd" osd_up
log "osd up ($(( $(date +%s) - T0 ))s)"

# ------------------------------------------------------------------ radosgw
ceph_ auth get-or-create client.rgw.a mon 'allow rw' osd 'allow rwx' mgr 'allow rw' \
  -o "$DIR/rgw/a/keyring" 2>/dev/null
http_ok() {
  if [ "$HAVE_CURL" = 1 ]; then curl -fsS -o /dev/null --max-time 5 "$ENDPOINT"
  else "$PY" -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=5)" "$ENDPOINT"; fi
}
# the port is picked just before the start; if another process grabbed it meanwhile, pick again
for attempt in 1 2 3; do
  RGW_PORT=${S3_PORT:-$(free_port)}
  ENDPOINT="http://127.0.0.1:$RGW_PORT"
  : >"$DIR/log/rgw.a.out"
  start_daemon rgw.a radosgw -n client.rgw.a --rgw-frontends "beast endpoint=127.0.0.1:$RGW_PORT"
  deadline=$(( $(date +%s) + TIMEOUT ))
  until http_ok >/dev/null 2>&1; do
    pid_alive "$(cat "$DIR/pids/rgw.a")" || break
    [ "$(date +%s)" -lt "$deadline" ] || break
    sleep 0.5
  done
  pid_alive "$(cat "$DIR/pids/rgw.a")" && break
  if [ -z "${S3_PORT:-}" ] && [ "$attempt" -lt 3 ] && grep -q "Address already in use" "$DIR/log/rgw.a.out"; then
    log "port $RGW_PORT was taken meanwhile; trying another"
    continue
  fi
  break
done
if ! http_ok >/dev/null 2>&1; then
  tail -n 30 "$DIR/log/rgw.a.out" >&2 2>/dev/null || true
  if pid_alive "$(cat "$DIR/pids/rgw.a")"; then die "radosgw on $ENDPOINT did not answer within ${TIMEOUT}s"
  else die "radosgw exited during start-up (logs in $DIR/log)"; fi
fi
log "radosgw up ($(( $(date +%s) - T0 ))s)"

radosgw-admin -c "$CONF" -n client.admin user create --uid=test --display-name="local test user" \
  --access-key="$ACCESS_KEY" --secret-key="$SECRET_KEY" >"$DIR/log/user.json" 2>>"$DIR/log/radosgw-admin.log"
if [ "$HAVE_CURL" = 1 ]; then
  # a signed ListBuckets must succeed with the new key (curl >= 7.75 signs SigV4)
  auth_ok() {
    curl -fsS -o /dev/null --max-time 5 --aws-sigv4 "aws:amz:us-east-1:s3" \
      --user "$ACCESS_KEY:$SECRET_KEY" \
      -H "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" \
      "$ENDPOINT/"
  }
  wait_for rgw.a "a signed S3 request with the new user's key" auth_ok
fi

cat >"$DIR/env.sh" <<EOF
export S3_DIR='$DIR'
export S3_ENDPOINT_URL='$ENDPOINT'
export AWS_ACCESS_KEY_ID='$ACCESS_KEY'
export AWS_SECRET_ACCESS_KEY='$SECRET_KEY'
export AWS_DEFAULT_REGION='us-east-1'
export CEPH_CONF='$CONF'
export S3_PIDS='$(for n in $DAEMONS; do cat "$DIR/pids/$n"; done | tr '\n' ' ' | sed 's/ $//')'
EOF
SUCCESS=1
log "ready in $(( $(date +%s) - T0 ))s: $ENDPOINT (ceph $(ceph-mon --version | awk '{print $3}'), $OBJECTSTORE)"
print_env
