#!/usr/bin/env bash
# A one-node Ceph cluster on loopback, for trying Stowage's rbd stores on
# one machine and for its tests: one monitor, one manager, one OSD on a
# file-backed BlueStore device, cephx on, everything (configuration,
# keyrings, data, logs, sockets, pid files) under one directory. Nothing is
# written to /etc/ceph. Debian 12's Ceph 16.2 (Pacific) packages.
#
#   deploy/ceph/bootstrap.sh up   [--dir DIR] [--pool NAME] [--size 8G] [--install]
#   deploy/ceph/bootstrap.sh down [--dir DIR]     stop the daemons it started (by pid file)
#   deploy/ceph/bootstrap.sh env  [--dir DIR]     print CEPH_CONF and CEPH_KEYRING exports
#   deploy/ceph/bootstrap.sh user NAME POOL [--dir DIR]
#                                  a cephx user limited to POOL (rbd profile); prints its keyring file
#
# up is idempotent: an existing cluster in DIR is started again (its data
# kept); a new one is created otherwise. --install installs the Debian
# packages when they are missing (needs root).
set -euo pipefail

cmd=${1:-}; shift || true
DIR=${STOWAGE_CEPH_DIR:-/tmp/stowage-ceph}
POOL=stowage
SIZE=8G
INSTALL=0
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR=$2; shift 2 ;;
    --pool) POOL=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --install) INSTALL=1; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
CONF=$DIR/ceph.conf
ADMIN=$DIR/keyring.client.admin

die() { echo "ceph bootstrap: $*" >&2; exit 1; }
log() { echo "ceph bootstrap: $*" >&2; }
ceph_() { timeout 60 ceph --conf "$CONF" --keyring "$ADMIN" --connect-timeout 20 "$@"; }

# tail_log shows the end of a daemon's log when it fails.
tail_log() { [ -f "$DIR/log/$1.log" ] && tail -n 30 "$DIR/log/$1.log" >&2 || true; }

# wait_for runs "$@" every half second for at most $WAIT seconds.
wait_for() {
  local what=$1; shift
  local i
  for ((i = 0; i < ${WAIT:-120} * 2; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  return 1
}

free_port() { # free_port PORT: PORT if nothing listens on it, else a free one
  if ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then echo "$1"; return; fi
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

install_packages() {
  local pkgs=(ceph-mon ceph-mgr ceph-osd ceph-common librbd-dev librados-dev rbd-nbd qemu-block-extra uuid-runtime)
  local missing=()
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "missing packages ${missing[*]}: run as root with --install, or apt-get install them"
  log "installing ${missing[*]}"
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
}

running() { # running NAME: the daemon's pid file names a live process
  local pid
  pid=$(cat "$DIR/run/$1.pid" 2>/dev/null) || return 1
  kill -0 "$pid" 2>/dev/null
}

start_daemons() {
  local osd
  osd=$(cat "$DIR/osd-id")
  running mon.a || ceph-mon --conf "$CONF" -i a || { tail_log mon.a; die "ceph-mon did not start"; }
  WAIT=60 wait_for "the monitor" ceph_ mon stat || { tail_log mon.a; die "the monitor does not answer"; }
  running mgr.x || ceph-mgr --conf "$CONF" -i x || { tail_log mgr.x; die "ceph-mgr did not start"; }
  running "osd.$osd" || ceph-osd --conf "$CONF" -i "$osd" || { tail_log "osd.$osd"; die "ceph-osd did not start"; }
  WAIT=120 wait_for "osd.$osd up" sh -c "ceph --conf '$CONF' --keyring '$ADMIN' osd dump 2>/dev/null | grep -q '^osd.$osd up'" ||
    { tail_log "osd.$osd"; die "osd.$osd is not up after 120 s"; }
}

create() {
  command -v uuidgen >/dev/null || die "uuidgen is missing (uuid-runtime)"
  mkdir -p "$DIR"/{run,log,mon,mgr,osd}
  chmod 0700 "$DIR"
  local fsid v2 v1
  fsid=$(uuidgen)
  v2=$(free_port 3300)
  v1=$(free_port 6789)
  cat >"$CONF" <<CONF
[global]
fsid = $fsid
mon initial members = a
mon host = [v2:127.0.0.1:$v2,v1:127.0.0.1:$v1]
public network = 127.0.0.0/8
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 3
osd crush chooseleaf type = 0
run dir = $DIR/run
log file = $DIR/log/\$name.log
admin socket = $DIR/run/\$name.asok
pid file = $DIR/run/\$name.pid
mon data = $DIR/mon/\$cluster-\$id
mgr data = $DIR/mgr/\$cluster-\$id
osd data = $DIR/osd/\$cluster-\$id
keyring = $DIR/keyring.\$name
osd objectstore = bluestore
bluestore block create = true
bluestore block size = $(numfmt --from=iec "$SIZE")
bluestore fsck on mkfs = false
bluestore cache size = 134217728
osd memory target = 939524096
osd max object name len = 256
osd max object namespace len = 64
mgr initial modules =
ms bind ipv6 = false
CONF
  ceph-authtool --create-keyring "$DIR/keyring.mon.a" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool --create-keyring "$ADMIN" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
  chmod 0600 "$ADMIN" "$DIR/keyring.mon.a"
  ceph-authtool "$DIR/keyring.mon.a" --import-keyring "$ADMIN" >/dev/null
  monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$v2,v1:127.0.0.1:$v1]" "$DIR/monmap" >/dev/null
  ceph-mon --conf "$CONF" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/keyring.mon.a" ||
    { tail_log mon.a; die "ceph-mon --mkfs failed"; }
  ceph-mon --conf "$CONF" -i a || { tail_log mon.a; die "ceph-mon did not start"; }
  WAIT=60 wait_for "the monitor" ceph_ mon stat || { tail_log mon.a; die "the monitor does not answer"; }
  mkdir -p "$DIR/mgr/ceph-x"
  ceph_ auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' >"$DIR/keyring.mgr.x"
  chmod 0600 "$DIR/keyring.mgr.x"
  local uuid id
  uuid=$(uuidgen)
  id=$(ceph_ osd new "$uuid")
  echo "$id" >"$DIR/osd-id"
  mkdir -p "$DIR/osd/ceph-$id"
  ceph-authtool --create-keyring "$DIR/keyring.osd.$id" --gen-key -n "osd.$id" >/dev/null
  chmod 0600 "$DIR/keyring.osd.$id"
  ceph_ auth add "osd.$id" osd 'allow *' mon 'allow profile osd' mgr 'allow profile osd' -i "$DIR/keyring.osd.$id" >/dev/null
  ceph-osd --conf "$CONF" -i "$id" --mkfs --osd-uuid "$uuid" >/dev/null 2>&1 ||
    { tail_log "osd.$id"; die "ceph-osd --mkfs failed"; }
  start_daemons
  ceph_ osd pool create "$POOL" 32 32 replicated >/dev/null
  ceph_ osd pool set "$POOL" size 1 --yes-i-really-mean-it >/dev/null
  timeout 60 rbd --conf "$CONF" --keyring "$ADMIN" pool init "$POOL"
  echo "$POOL" >"$DIR/pools"
}

up() {
  [ "$INSTALL" -eq 1 ] && install_packages
  command -v ceph-mon >/dev/null || die "ceph-mon is not installed (--install, or apt-get install ceph-mon ceph-mgr ceph-osd ceph-common)"
  local t0=$SECONDS
  if [ -f "$DIR/osd-id" ]; then
    start_daemons
    grep -qx "$POOL" "$DIR/pools" 2>/dev/null || {
      ceph_ osd pool create "$POOL" 32 32 replicated >/dev/null
      ceph_ osd pool set "$POOL" size 1 --yes-i-really-mean-it >/dev/null
      timeout 60 rbd --conf "$CONF" --keyring "$ADMIN" pool init "$POOL"
      echo "$POOL" >>"$DIR/pools"
    }
  else
    create
  fi
  log "up in $((SECONDS - t0)) s: $(ceph_ health 2>&1 | head -1); pool $POOL"
  env_
}

down() {
  local f pid
  for f in "$DIR"/run/*.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
  done
  for f in "$DIR"/run/*.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$f"
  done
  log "stopped"
}

env_() {
  echo "export CEPH_CONF=$CONF"
  echo "export CEPH_KEYRING=$ADMIN"
}

user() {
  local name=${ARGS[0]:-} pool=${ARGS[1]:-}
  [ -n "$name" ] && [ -n "$pool" ] || die "usage: user NAME POOL"
  local f="$DIR/keyring.client.$name"
  ceph_ auth get-or-create "client.$name" mon 'profile rbd' osd "profile rbd pool=$pool" >"$f"
  chmod 0600 "$f"
  echo "$f"
}

case "$cmd" in
  up) up ;;
  down) down ;;
  env) env_ ;;
  user) user ;;
  *) die "usage: $0 up|down|env|user NAME POOL [--dir DIR] [--pool NAME] [--size 8G] [--install]" ;;
esac
