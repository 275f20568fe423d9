#!/usr/bin/env bash
# bench/fuse.sh — sections e and h: the FUSE template cache (`stowage cache
# mount`) against a direct read of the source (e: local source) and against
# curl from the same loopback HTTP server (h: HTTP source), same run. Run by
# bench/run.sh; standalone: BIN=... OUT_TSV=... bash bench/fuse.sh.
#
# Every "cold" run of ours is a fresh mount with a fresh cache directory
# (a never-fetched template) after drop_caches, so that each run is really
# cold (peers.sh section e keeps one mount for all runs of a row). Rows:
#   e  direct (no FUSE) cold/warm       dd bs=1M of the source file
#   e  stowage FUSE local, cold         dd bs=1M through a fresh mount
#   e  stowage FUSE local, warm (complete template)
#                                       the same mount after a complete read,
#                                       one untimed warm-up read before each
#                                       (FUSE passthrough to the cache file);
#                                       warm rows alternate, WARM_RUNS each
#   e  first byte (ms)                  dd bs=4k count=1, direct vs a fresh
#                                       mount of a never-read template (with
#                                       --prefetch-rate off: nothing fetched)
#   h  curl (HTTP, cold)                curl -o /dev/null from the server
#   h  stowage FUSE HTTP, cold          dd bs=1M through a fresh mount of the URL
#   h  first byte (ms)                  curl -r 0-4095 vs dd bs=4k count=1
#                                       through a fresh mount of the URL
# The HTTP server is bench/cmd/benchhttp (Go's file server: Range, sendfile)
# on 127.0.0.1, serving the same file from the same disk, cold for each run.
#
# Env: BIN (stowage binary), HTTPBIN (benchhttp binary; built when unset),
#      OUT_TSV, SIZE_MIB=1024, RUNS=3, WARM_RUNS=5*RUNS, SETTLE=3,
#      WORKDIR=/tmp/stowage-bench/fuse (wiped)
set -euo pipefail
BIN=${BIN:?BIN must name the stowage binary}
OUT_TSV=${OUT_TSV:?OUT_TSV is required}
SIZE_MIB=${SIZE_MIB:-1024}
RUNS=${RUNS:-3} SETTLE=${SETTLE:-3}
WARM_RUNS=${WARM_RUNS:-$((RUNS * 5))}
W=${WORKDIR:-/tmp/stowage-bench/fuse}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[[ $(id -u) -eq 0 ]] || { echo "fuse.sh: run as root (drop_caches, FUSE)" >&2; exit 1; }
[[ $W == /tmp/* ]] || { echo "fuse.sh: WORKDIR must be under /tmp" >&2; exit 1; }
LOGTAG=fuse
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh"
if [[ ! -c /dev/fuse ]]; then
    printf 'e\tstowage FUSE\tMiB/s\t-\t-\t-\tSKIPPED: no /dev/fuse on this machine\n' >>"$OUT_TSV"
    log "skipped: no /dev/fuse"
    exit 0
fi
SIZE=$((SIZE_MIB << 20))
SRC=$W/src MNT=$W/mnt
LOGF=$W.log
MPID=
umount_ours() {
    [[ -n $MPID ]] && stop "$MPID"
    MPID=
    local i
    for ((i = 0; i < 100; i++)); do mountpoint -q "$MNT" || break; sleep 0.05; done
    mountpoint -q "$MNT" && umount "$MNT" 2>/dev/null
    rm -rf "$W/cache"
}
cleanup() { umount_ours; stop_all; rm -rf "$W"; }
rm -rf "$W"
mkdir -p "$SRC" "$MNT"
: >"$LOGF"
trap cleanup EXIT

if [[ -z ${HTTPBIN:-} ]]; then
    HTTPBIN=$W/benchhttp
    (cd "$REPO" && go build -o "$HTTPBIN" ./bench/cmd/benchhttp)
fi
log "creating a $SIZE_MIB MiB random image"
openssl enc -aes-256-ctr -pass pass:stowage-fuse -nosalt -pbkdf2 -in /dev/zero 2>/dev/null | head -c "$SIZE" >"$SRC/dense.raw" || true
[[ $(stat -c %s "$SRC/dense.raw") -eq $SIZE ]] || { echo "fuse.sh: could not create the image" >&2; exit 1; }
sync

"$HTTPBIN" -root "$SRC" >"$W/http.out" 2>>"$LOGF" &
HPID=$!
BG_PIDS+=("$HPID")
for ((i = 0; i < 100; i++)); do grep -q '^LISTEN' "$W/http.out" 2>/dev/null && break; sleep 0.05; done
URL=$(awk '/^LISTEN/ { print $2 }' "$W/http.out")dense.raw
[[ $URL == http://127.0.0.1:* ]] || { echo "fuse.sh: HTTP server did not start" >&2; exit 1; }

# mount_ours SRC [FLAG...]: a fresh mount (new cache directory) of SRC at
# MNT. Cold runs mount after drop_caches, just before the timed read, so
# that the background prefetch (on, as shipped) has no head start.
mount_ours() {
    local i src=$1
    shift
    umount_ours
    mkdir -p "$W/cache"
    bg "$BIN" cache mount --cache-dir "$W/cache" "$@" "$src" "$MNT"
    MPID=$BG
    for ((i = 0; i < 400; i++)); do
        [[ -e $MNT/dense.raw ]] && return 0
        kill -0 "$MPID" 2>/dev/null || break
        sleep 0.05
    done
    echo "mount of $1 did not appear" >&2
    return 1
}
DD1M="dd if=$MNT/dense.raw of=/dev/null bs=1M status=none"
DD4K="dd if=$MNT/dense.raw of=/dev/null bs=4k count=1 status=none"

log "section e: local source"
bench e "direct (no FUSE), cold" "$SIZE" "drop" "dd if=$SRC/dense.raw of=/dev/null bs=1M status=none"
bench e "stowage FUSE local, cold" "$SIZE" "drop; mount_ours $SRC" "$DD1M" "fresh mount and cache directory each run"
# the last cold run's mount now holds the complete template
if mountpoint -q "$MNT" && cmp -s "$SRC/dense.raw" <(dd if="$MNT/dense.raw" bs=1M status=none); then
    # A warm 1 GiB read takes ~0.1 s and consecutive identical reads differ
    # by up to 3x here: WARM_RUNS (default 5 x RUNS) runs, alternating
    # direct and mount, each after one untimed read of the same file.
    wd=() wm=()
    for ((k = 0; k < WARM_RUNS; k++)); do
        RUNS=1 timed "$SIZE" "cat $SRC/dense.raw >/dev/null" "dd if=$SRC/dense.raw of=/dev/null bs=1M status=none" && wd+=("${VALS[@]}")
        RUNS=1 timed "$SIZE" "$DD1M" "$DD1M" && wm+=("${VALS[@]}")
    done
    if ((${#wd[@]} == WARM_RUNS && ${#wm[@]} == WARM_RUNS)); then
        emit e "direct (no FUSE), warm" MiB/s "$WARM_RUNS runs alternating with the mount's" "${wd[@]}"
        emit e "stowage FUSE local, warm (complete template)" MiB/s "complete template (FUSE passthrough to the cache file), $WARM_RUNS runs alternating with direct" "${wm[@]}"
    else
        emit_fail e "stowage FUSE local, warm (complete template)" MiB/s "$ERR"
    fi
    grep -m1 '^MOUNTED' "$LOGF" | sed 's/^/mount: /' >&2 || true
else
    emit_fail e "stowage FUSE local, warm (complete template)" MiB/s "VERIFY FAILED or mount lost after the cold read"
fi
bench e "direct (no FUSE), first byte" 0 "drop" "dd if=$SRC/dense.raw of=/dev/null bs=4k count=1 status=none" "dd bs=4k count=1 after drop_caches"
bench e "stowage FUSE local, first byte" 0 "drop; mount_ours $SRC --prefetch-rate off" "$DD4K" "dd bs=4k count=1 of a never-fetched template (fresh mount, no prefetch) after drop_caches"
umount_ours

log "section h: HTTP source ($URL)"
bench h "curl (HTTP, cold)" "$SIZE" "drop" "curl -sSf -o /dev/null $URL" "same loopback server (Go net/http file server)"
bench h "stowage FUSE HTTP, cold" "$SIZE" "drop; mount_ours $URL" "$DD1M" "fresh mount and cache directory each run"
if mountpoint -q "$MNT" && ! cmp -s "$SRC/dense.raw" <(dd if="$MNT/dense.raw" bs=1M status=none); then
    emit_fail h "stowage FUSE HTTP, verify" MiB/s "VERIFY FAILED: the mount's bytes differ from the source"
fi
bench h "curl (HTTP), first byte" 0 "drop" "curl -sSf -r 0-4095 -o /dev/null $URL" "curl -r 0-4095 after drop_caches"
bench h "stowage FUSE HTTP, first byte" 0 "drop; mount_ours $URL --prefetch-rate off" "$DD4K" "dd bs=4k count=1 of a never-fetched template (fresh mount, no prefetch) after drop_caches"
umount_ours
log "done"
