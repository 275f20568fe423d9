#!/usr/bin/env bash
# bench/qcow2-nbd.sh — read throughput of a qcow2 linked clone exported over
# NBD: `stowage nbd serve --format qcow2` (qemu-storage-daemon under Stowage)
# against `qemu-nbd -f qcow2` on the same file, in the same run. Both read-only
# on a unix socket; the reader is `nbdcopy URI null:` (its default 4
# connections when the server offers multi-conn, which both do read-only).
# Image: a dense random base (SIZE_GIB) and an overlay with every 10th MiB
# rewritten (-F qcow2). Page cache warm (one untimed read each first); runs
# alternate between the servers; medians of RUNS.
# Writes bench/results/qcow2-nbd-<time>.md.
# Env: SIZE_GIB=1, RUNS=3, STOWAGE_BIN (default: built from this tree),
#      WORKDIR=/tmp/stowage-bench/qcow2-nbd (wiped), OUTDIR=bench/results
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_GIB=${SIZE_GIB:-1}
RUNS=${RUNS:-3}
W=${WORKDIR:-/tmp/stowage-bench/qcow2-nbd}
OUTDIR=${OUTDIR:-bench/results}
SIZE=$((SIZE_GIB << 30))
for b in qemu-img qemu-io qemu-nbd qemu-storage-daemon nbdcopy nbdinfo; do
	command -v $b >/dev/null || { echo "qcow2-nbd.sh: needs $b (qemu-utils qemu-system-common libnbd-bin)" >&2; exit 1; }
done
[[ $W == /tmp/* ]] || { echo "qcow2-nbd.sh: refusing to wipe $W" >&2; exit 1; }
rm -rf "$W"; mkdir -p "$W" "$OUTDIR"
BIN=${STOWAGE_BIN:-$W/stowage}
[[ -n ${STOWAGE_BIN:-} ]] || go build -o "$BIN" ./cmd/stowage
log() { printf '[%s] qcow2-nbd: %s\n' "$(date +%T)" "$*" >&2; }
now_us() { local t=$EPOCHREALTIME; echo "${t/./}"; }

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT

log "images: dense base ($SIZE_GIB GiB), overlay with every 10th MiB rewritten"
head -c "$SIZE" /dev/urandom >"$W/base.raw"
qemu-img convert -q -f raw -O qcow2 "$W/base.raw" "$W/base.qcow2"
rm -f "$W/base.raw"
qemu-img create -q -f qcow2 -b "$W/base.qcow2" -F qcow2 "$W/clone.qcow2"
cmds=()
for ((i = 0; i < SIZE >> 20; i += 10)); do cmds+=(-c "write -P $((i % 251)) ${i}M 1M"); done
qemu-io -f qcow2 "${cmds[@]}" "$W/clone.qcow2" >/dev/null

wait_sock() { for _ in $(seq 200); do nbdinfo --size "$1" >/dev/null 2>&1 && return 0; sleep 0.05; done; echo "qcow2-nbd.sh: $1 never answered" >&2; exit 1; }

QSD_SOCK=$W/qsd.sock QNBD_SOCK=$W/qnbd.sock
"$BIN" nbd serve --unix "$QSD_SOCK" --format qcow2 --read-only "$W/clone.qcow2" 2>"$W/stowage.log" &
PIDS+=($!)
qemu-nbd -f qcow2 -r -k "$QNBD_SOCK" -e 16 -t --cache=writeback "$W/clone.qcow2" 2>"$W/qemu-nbd.log" &
PIDS+=($!)
declare -A URI=([stowage-qsd]="nbd+unix:///?socket=$QSD_SOCK" [qemu-nbd]="nbd+unix:///?socket=$QNBD_SOCK")
wait_sock "${URI[stowage-qsd]}"; wait_sock "${URI[qemu-nbd]}"

# Same guest view from both (and from the image).
for s in stowage-qsd qemu-nbd; do
	nbdcopy "${URI[$s]}" "$W/$s.raw"
	qemu-img compare -q -U -f raw -F qcow2 "$W/$s.raw" "$W/clone.qcow2" || { echo "qcow2-nbd.sh: $s differs from the image" >&2; exit 1; }
	rm -f "$W/$s.raw"
done

declare -A T
for ((r = 1; r <= RUNS; r++)); do
	for s in stowage-qsd qemu-nbd; do
		t0=$(now_us); nbdcopy "${URI[$s]}" null:; t1=$(now_us)
		T[$s]+="$(( (t1 - t0) )) "
		log "run $r $s: $(( (t1 - t0) / 1000 )) ms"
	done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mbps() { awk -v b="$SIZE" -v us="$1" 'BEGIN {printf "%.0f", b / us}'; } # bytes/us = MB/s
MQ=$(echo "${T[stowage-qsd]}" | median) MN=$(echo "${T[qemu-nbd]}" | median)
STAMP=$(date -u +%Y%m%dT%H%MZ)
OUT=$OUTDIR/qcow2-nbd-$STAMP.md
{
	echo "# qcow2 linked clone over NBD: read throughput ($STAMP)"
	echo
	echo "$SIZE_GIB GiB virtual, dense base + overlay with every 10th MiB rewritten; page cache warm;"
	echo "\`nbdcopy URI null:\`, $RUNS runs alternating, medians. $(qemu-storage-daemon --version | head -1)."
	echo
	echo "| server | runs (ms) | median (ms) | MB/s | vs qemu-nbd |"
	echo "|---|---|---|---|---|"
	for s in stowage-qsd qemu-nbd; do
		m=$(echo "${T[$s]}" | median)
		runs=$(for u in ${T[$s]}; do printf '%d ' $((u / 1000)); done)
		echo "| $s | ${runs% } | $((m / 1000)) | $(mbps "$m") | $(awk -v a="$MN" -v b="$m" 'BEGIN {printf "%.2fx", a / b}') |"
	done
} >"$OUT"
cat "$OUT"
