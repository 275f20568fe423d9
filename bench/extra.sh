#!/usr/bin/env bash
# bench/extra.sh — Stowage's own rows that shared/bench/peers.sh does not
# measure, in the same TSV format (section, test, unit, median, min, max,
# note) so that bench/cmd/benchreport merges them:
#   x  zero-filled dense image (allocated zeros): stowage and the peers,
#      MiB/s and the allocation of the destination
#   m  stowage's write and read modes, and --sha256, cold and warm, with
#      nbdcopy as the same-run anchor: how the default was chosen
# Run by bench/run.sh; needs root (drop_caches).
# Env: BIN (stowage binary, required), SIZE_GIB=2 (or SIZE_MIB), RUNS=3, SETTLE=3,
#      XSECTIONS="x m" (which of the two to run),
#      WORKDIR=/tmp/stowage-bench/extra (wiped), OUT_TSV (required)
set -euo pipefail
BIN=${BIN:?BIN must name the stowage binary}
OUT_TSV=${OUT_TSV:?OUT_TSV is required}
SIZE_GIB=${SIZE_GIB:-2}
SIZE_MIB=${SIZE_MIB:-$((SIZE_GIB * 1024))}
XSECTIONS=${XSECTIONS:-"x m"}
RUNS=${RUNS:-3}
SETTLE=${SETTLE:-3}
W=${WORKDIR:-/tmp/stowage-bench/extra}
SIZE=$((SIZE_MIB << 20))
[[ $(id -u) -eq 0 ]] || { echo "extra.sh: must run as root (drop_caches)" >&2; exit 1; }
[[ $W == /tmp/* || -f $W/.stowage-extra ]] || { echo "extra.sh: refusing to wipe $W" >&2; exit 1; }
rm -rf "$W"
mkdir -p "$W"
: >"$W/.stowage-extra"
trap 'rm -rf "$W"' EXIT
: >"$OUT_TSV"
log() { printf '[%s] extra: %s\n' "$(date +%T)" "$*" >&2; }
now_us() { local t=$EPOCHREALTIME; echo "${t/./}"; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; sleep "$SETTLE"; }
alloc_mib() { du -m "$1" | awk '{ print $1 }'; }

# bench SEC NAME PREP CMD [NOTE-CMD]: RUNS timed runs of CMD (until sync),
# MiB/s of SIZE; NOTE-CMD is evaluated after the last run for the note.
bench() {
    local sec=$1 name=$2 prep=$3 cmd=$4 notecmd=${5:-} vals=() i t0 t1 note=""
    for ((i = 0; i < RUNS; i++)); do
        eval "$prep"
        t0=$(now_us)
        if ! eval "$cmd" >>"$W/log" 2>&1; then
            printf '%s\t%s\tMiB/s\t-\t-\t-\tFAILED: %s\n' "$sec" "$name" "$(tail -n 1 "$W/log")" >>"$OUT_TSV"
            log "$sec | $name | FAILED"
            return 0
        fi
        sync
        t1=$(now_us)
        vals+=("$(awk -v b="$SIZE" -v us=$((t1 - t0)) 'BEGIN { printf "%.3f", b / 1048576 / (us / 1e6) }')")
    done
    [[ -n $notecmd ]] && note=$(eval "$notecmd")
    printf '%s\n' "${vals[@]}" | sort -g | awk -v s="$sec" -v n="$name" -v note="$note" '
        { v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "%s\t%s\tMiB/s\t%.1f\t%.1f\t%.1f\t%s\n", s, n, m, v[1], v[NR], note }' >>"$OUT_TSV"
    log "$sec | $name | $(tail -n 1 "$OUT_TSV" | cut -f4) MiB/s | $note"
}

DENSE=$W/dense.raw ZERO=$W/zero.raw DST=$W/out.raw
log "creating $SIZE_MIB MiB images (random, and allocated zeros)"
openssl enc -aes-256-ctr -pass pass:stowage -nosalt -pbkdf2 -in /dev/zero 2>/dev/null | head -c "$SIZE" >"$DENSE" || true
head -c "$SIZE" /dev/zero >"$ZERO"
sync
[[ $(stat -c %s "$DENSE") -eq $SIZE ]] || { echo "extra.sh: could not create $DENSE" >&2; exit 1; }

log "section x: zero-filled dense image ($(alloc_mib "$ZERO") MiB allocated), cold"
declare -a XT=(
    "zero-filled: stowage copy|$BIN copy $ZERO $DST"
    "zero-filled: qemu-img convert -W -m 8 -O raw|qemu-img convert -W -m 8 -f raw -O raw $ZERO $DST"
    "zero-filled: nbdcopy file->file|nbdcopy --flush $ZERO $DST"
    "zero-filled: cp --sparse=always|cp --sparse=always $ZERO $DST"
)
[[ " $XSECTIONS " == *" x "* ]] || XT=()
for t in "${XT[@]}"; do
    bench x "${t%%|*}" "rm -f $DST; drop" "${t#*|}" "echo \"dst allocated \$(alloc_mib $DST) MiB (src $(alloc_mib "$ZERO") MiB)\""
    cmp -s "$ZERO" "$DST" || printf 'x\t%s\t-\t-\t-\t-\tVERIFY FAILED\n' "${t%%|*}" >>"$OUT_TSV"
    rm -f "$DST"
done

log "section m: stowage modes against nbdcopy (dense random image)"
declare -a MT=(
    "nbdcopy file->file|nbdcopy --flush $DENSE $DST"
    "stowage auto (evict writes; zero-copy O_DIRECT from a cached source)|$BIN copy $DENSE $DST"
    "stowage --write-mode direct|$BIN copy --write-mode direct $DENSE $DST"
    "stowage --write-mode buffered|$BIN copy --write-mode buffered $DENSE $DST"
    "stowage --direct (O_DIRECT reads and writes)|$BIN copy --direct $DENSE $DST"
    "stowage --workers 2|$BIN copy --workers 2 $DENSE $DST"
    "stowage --workers 8|$BIN copy --workers 8 $DENSE $DST"
    "stowage --sha256 (in-stream SHA-256)|$BIN copy --sha256 $DENSE $DST"
)
[[ " $XSECTIONS " == *" m "* ]] || MT=()
for cache in cold warm; do
    for t in "${MT[@]}"; do
        if [[ $cache == cold ]]; then prep="rm -f $DST; drop"; else prep="rm -f $DST; sync; cat $DENSE >/dev/null"; fi
        bench m "${t%%|*} ($cache src)" "$prep" "${t#*|}"
        rm -f "$DST"
    done
done
log "done"
