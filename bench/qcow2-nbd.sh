#!/usr/bin/env bash
# bench/qcow2-nbd.sh — section q: read throughput of a qcow2 linked clone
# exported over NBD: `stowage nbd serve --format qcow2 --read-only` (Stowage's
# own qcow2 reader, as the agent serves read-only grants: templates, snapshots,
# the source of a migration) against `qemu-nbd -f qcow2` on the same file,
# same run. Both
# read-only on a unix socket; the reader is `nbdcopy URI null:` (its default
# 4 connections when the server offers multi-conn, which both do read-only).
# Image: a dense random base (SIZE_MIB) and an overlay with every 10th MiB
# rewritten (-F qcow2). Both servers' guest views are checked against the
# image first (qemu-img compare). Rows: warm (page cache holds both files:
# one untimed read first) and cold (drop_caches before each run), medians
# of RUNS. Run by bench/run.sh; standalone: BIN=... OUT_TSV=... bash bench/qcow2-nbd.sh
# Env: BIN (stowage binary), OUT_TSV, SIZE_MIB=1024, RUNS=3, SETTLE=3,
#      WORKDIR=/tmp/stowage-bench/qcow2-nbd (wiped)
set -euo pipefail
BIN=${BIN:?BIN must name the stowage binary}
OUT_TSV=${OUT_TSV:?OUT_TSV is required}
SIZE_MIB=${SIZE_MIB:-1024}
RUNS=${RUNS:-3} SETTLE=${SETTLE:-3}
W=${WORKDIR:-/tmp/stowage-bench/qcow2-nbd}
SIZE=$((SIZE_MIB << 20))
[[ $(id -u) -eq 0 ]] || { echo "qcow2-nbd.sh: run as root (drop_caches)" >&2; exit 1; }
[[ $W == /tmp/* ]] || { echo "qcow2-nbd.sh: WORKDIR must be under /tmp" >&2; exit 1; }
LOGTAG=qcow2-nbd
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
for b in qemu-img qemu-io qemu-nbd qemu-storage-daemon nbdcopy nbdinfo; do
    command -v $b >/dev/null || { emit_fail q "qcow2 export" MiB/s "needs $b (qemu-utils qemu-system-common libnbd-bin)"; exit 0; }
done
rm -rf "$W"
mkdir -p "$W"
LOGF=$W.log
: >"$LOGF"
trap 'stop_all; rm -rf "$W"' EXIT

log "images: dense base ($SIZE_MIB MiB), overlay with every 10th MiB rewritten"
openssl enc -aes-256-ctr -pass pass:stowage-q -nosalt -pbkdf2 -in /dev/zero 2>/dev/null | head -c "$SIZE" >"$W/base.raw" || true
qemu-img convert -q -f raw -O qcow2 "$W/base.raw" "$W/base.qcow2"
rm -f "$W/base.raw"
qemu-img create -q -f qcow2 -b "$W/base.qcow2" -F qcow2 "$W/clone.qcow2"
cmds=()
for ((i = 0; i < SIZE_MIB; i += 10)); do cmds+=(-c "write -P $((i % 251)) ${i}M 1M"); done
qemu-io -f qcow2 "${cmds[@]}" "$W/clone.qcow2" >/dev/null
sync

QSD_SOCK=$W/qsd.sock QNBD_SOCK=$W/qnbd.sock
bg "$BIN" nbd serve --unix "$QSD_SOCK" --format qcow2 --read-only "$W/clone.qcow2"
P1=$BG
bg qemu-nbd -f qcow2 -r -k "$QNBD_SOCK" -e 16 -t --cache=writeback "$W/clone.qcow2"
P2=$BG
declare -A URI=([stowage]="nbd+unix:///?socket=$QSD_SOCK" [qemu-nbd]="nbd+unix:///?socket=$QNBD_SOCK")
declare -A PID=([stowage]=$P1 [qemu-nbd]=$P2)
declare -A NAME=([stowage]="stowage nbd serve --format qcow2 (Go reader)" [qemu-nbd]="qemu-nbd -f qcow2")
for s in stowage qemu-nbd; do
    if ! wait_nbd "${URI[$s]}" "${PID[$s]}"; then
        emit_fail q "${NAME[$s]}: nbdcopy -> null: (warm)" MiB/s "server did not start"
        unset "URI[$s]"
        continue
    fi
    # same guest view from both (and from the image)
    if ! nbdcopy "${URI[$s]}" "$W/$s.raw" >>"$LOGF" 2>&1 ||
        ! qemu-img compare -q -U -f raw -F qcow2 "$W/$s.raw" "$W/clone.qcow2" >>"$LOGF" 2>&1; then
        emit_fail q "${NAME[$s]}: nbdcopy -> null: (warm)" MiB/s "VERIFY FAILED: the export differs from the image"
        unset "URI[$s]"
    fi
    rm -f "$W/$s.raw"
done
mc() { nbdinfo "$1" 2>/dev/null | awk '/can_multi_conn/ { print "multi_conn=" $2; exit }'; }
for s in "${!URI[@]}"; do
    bench q "${NAME[$s]}: nbdcopy -> null: (warm)" "$SIZE" "cat $W/base.qcow2 $W/clone.qcow2 >/dev/null" \
        "nbdcopy '${URI[$s]}' null:" "$(mc "${URI[$s]}")"
    bench q "${NAME[$s]}: nbdcopy -> null: (cold)" "$SIZE" "drop" "nbdcopy '${URI[$s]}' null:" "$(mc "${URI[$s]}")"
done
log "done"
