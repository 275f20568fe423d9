#!/usr/bin/env bash
# bench/fuse.sh — the FUSE template cache (and NBD export) against their
# peers, same run, as root:
#
#   bash bench/fuse.sh           # SIZE_GIB=2 INVOCATIONS=3, about 10 minutes
#
# 1. builds stowage (or takes STOWAGE_BIN=),
# 2. runs shared/bench/peers.sh INVOCATIONS times with RUNS=1 and
#    SECTIONS="d e", OURS_NBD='stowage nbd serve --unix {sock} {file}' and
#    OURS_FUSE='stowage cache mount {src} {mnt}', so that stowage is one
#    more row next to nbdkit/qemu-nbd (d) and the go-fuse loopback and the
#    direct read (e). RUNS=1 because peers.sh keeps one mount for all the
#    runs of a row: only its first "cold" run reads a never-fetched template
#    (later ones read the complete cache from disk), so each invocation is
#    one truly cold sample. The go-fuse helper is built by peers.sh in a
#    scratch module; GOFLAGS=-mod=mod lets that build record the go.sum
#    entry of golang.org/x/sys (fetched through the module proxy) instead of
#    failing on it,
# 3. measures the first byte of a never-read template (dd bs=4k count=1
#    through a fresh mount after drop_caches) against the same read of the
#    source file, FIRST_RUNS times (rows e/"first byte" in ms),
# 4. merges everything with bench/cmd/benchreport (-merge: median, min and
#    max over the invocations) into bench/results/fuse-<stamp>.md and .png.
#
# Env: SIZE_GIB=2 INVOCATIONS=3 FIRST_RUNS=5 SETTLE=3 SECTIONS="d e"
#      STOWAGE_BIN= PEERS=<repo>/../shared/bench/peers.sh
#      WORKDIR=/tmp/stowage-fusebench OUTDIR=<repo>/bench/results
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEERS=${PEERS:-$REPO/../shared/bench/peers.sh}
SIZE_GIB=${SIZE_GIB:-2}
INVOCATIONS=${INVOCATIONS:-3}
FIRST_RUNS=${FIRST_RUNS:-5}
SETTLE=${SETTLE:-3}
SECTIONS=${SECTIONS:-"d e"}
W=${WORKDIR:-/tmp/stowage-fusebench}
OUTDIR=${OUTDIR:-$REPO/bench/results}
[[ $(id -u) -eq 0 ]] || { echo "bench/fuse.sh: run as root (drop_caches, mounts)" >&2; exit 1; }
[[ -f $PEERS ]] || { echo "bench/fuse.sh: $PEERS not found (set PEERS=)" >&2; exit 1; }
[[ $W == /tmp/* ]] || { echo "bench/fuse.sh: WORKDIR must be under /tmp" >&2; exit 1; }
mkdir -p "$W" "$OUTDIR"
STAMP=$(date -u +%Y%m%dT%H%MZ)
BIN=$W/stowage
if [[ -n ${STOWAGE_BIN:-} ]]; then
    cp "$STOWAGE_BIN" "$BIN"
else
    echo "fuse.sh: building stowage" >&2
    (cd "$REPO" && go build -o "$BIN" ./cmd/stowage)
fi
log() { printf '[%s] fuse.sh: %s\n' "$(date +%T)" "$*" >&2; }

TSVS=()
for ((i = 1; i <= INVOCATIONS; i++)); do
    tsv=$OUTDIR/fuse-$STAMP.peers$i.tsv
    log "peers.sh invocation $i/$INVOCATIONS SECTIONS=\"$SECTIONS\" SIZE_GIB=$SIZE_GIB RUNS=1 (log: $W/peers$i.log)"
    GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=mod" SIZE_GIB=$SIZE_GIB RUNS=1 SETTLE=$SETTLE SECTIONS=$SECTIONS \
        OURS_NBD="$BIN nbd serve --unix {sock} {file}" OURS_FUSE="$BIN cache mount {src} {mnt}" \
        OURS_NAME=stowage OUT_TSV=$tsv WORKDIR=$W/peers LOG=$W/peers$i.log \
        bash "$PEERS" >"$OUTDIR/fuse-$STAMP.peers$i.md"
    TSVS+=(-tsv "$tsv")
done

# ---- first byte of a never-read template, through a fresh mount each time
log "first byte: $FIRST_RUNS fresh mounts"
FB=$W/first
MNT=$FB/mnt
PID=
cleanup() {
    if [[ -n $PID ]]; then kill -TERM "$PID" 2>/dev/null; wait "$PID" 2>/dev/null || true; fi
    mountpoint -q "$MNT" 2>/dev/null && umount "$MNT"
    rm -rf "$FB"
}
trap cleanup EXIT
rm -rf "$FB"
mkdir -p "$FB/src" "$MNT"
head -c $((SIZE_GIB << 30)) /dev/urandom >"$FB/src/dense.raw"
now_us() { local t=$EPOCHREALTIME; echo "${t/./}"; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; sleep "$SETTLE"; }
fb_ours=() fb_direct=()
for ((i = 0; i < FIRST_RUNS; i++)); do
    "$BIN" cache mount "$FB/src" "$MNT" >"$FB/mount.out" 2>>"$W/first.log" &
    PID=$!
    for ((k = 0; k < 200; k++)); do [[ -e $MNT/dense.raw ]] && break; sleep 0.05; done
    drop
    t0=$(now_us)
    dd if="$MNT/dense.raw" of=/dev/null bs=4k count=1 status=none
    t1=$(now_us)
    fb_ours+=("$(awk -v us=$((t1 - t0)) 'BEGIN { printf "%.3f", us / 1000 }')")
    kill -TERM "$PID"
    wait "$PID" || true
    PID=
    drop
    t0=$(now_us)
    dd if="$FB/src/dense.raw" of=/dev/null bs=4k count=1 status=none
    t1=$(now_us)
    fb_direct+=("$(awk -v us=$((t1 - t0)) 'BEGIN { printf "%.3f", us / 1000 }')")
done
stats() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { n = NR
    med = (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2; printf "%.3f\t%.3f\t%.3f", med, v[1], v[n] }'; }
FB_TSV=$OUTDIR/fuse-$STAMP.first.tsv
{
    printf 'e\tdirect (no FUSE), first byte (dd bs=4k count=1, cold)\tms\t%s\t%s\n' "$(stats "${fb_direct[@]}")" "$FIRST_RUNS runs, drop_caches before each"
    printf 'e\tstowage FUSE, first byte (dd bs=4k count=1, cold)\tms\t%s\t%s\n' "$(stats "${fb_ours[@]}")" "open + 4 KiB read of a never-read template, fresh mount and cache each run, drop_caches before each"
} >"$FB_TSV"
TSVS+=(-tsv "$FB_TSV")

awk '/^- /' "$OUTDIR/fuse-$STAMP.peers1.md" >"$W/facts.md" || true
(cd "$REPO" && go run ./bench/cmd/benchreport -merge "${TSVS[@]}" -facts "$W/facts.md" \
    -title "FUSE cache and NBD benchmark" \
    -cmd "SIZE_GIB=$SIZE_GIB INVOCATIONS=$INVOCATIONS FIRST_RUNS=$FIRST_RUNS SECTIONS='$SECTIONS' bash bench/fuse.sh" \
    -md "$OUTDIR/fuse-$STAMP.md" -png "$OUTDIR/fuse-$STAMP.png")
cat "$OUTDIR/fuse-$STAMP.md"
log "wrote $OUTDIR/fuse-$STAMP.md and .png"
