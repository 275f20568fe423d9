#!/usr/bin/env bash
# bench/realimg.sh — section r: copies of a real filesystem image (built by
# bench/fixture.sh) by stowage and its peers, same run, cold source, each
# timed from exec to exit plus `sync`, each output checked once (cmp, or
# qemu-img compare for the qcow2 source). Three shapes of one image:
#   "fs raw, sparse"  the raw image as built: holes where nothing was written
#                     or files were trimmed (SEEK_DATA path)
#   "fs raw, dense"   the same bytes fully allocated (cp --sparse=never): the
#                     holes are allocated zeros (read path + zero detection)
#   "fs qcow2 -> raw" the qcow2 of the same image into a raw file
# Run by bench/run.sh. Env: BIN (stowage binary), OUT_TSV, FIX_MIB=1024,
# RUNS=3, SETTLE=3, WORKDIR=/tmp/stowage-bench/realimg (wiped), FACTS (a
# file the fixture's facts line is appended to).
set -euo pipefail
BIN=${BIN:?BIN must name the stowage binary}
OUT_TSV=${OUT_TSV:?OUT_TSV is required}
RUNS=${RUNS:-3} SETTLE=${SETTLE:-3}
export FIX_MIB=${FIX_MIB:-1024}
W=${WORKDIR:-/tmp/stowage-bench/realimg}
[[ $(id -u) -eq 0 ]] || { echo "realimg.sh: run as root" >&2; exit 1; }
[[ $W == /tmp/* ]] || { echo "realimg.sh: WORKDIR must be under /tmp" >&2; exit 1; }
LOGTAG=realimg
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
rm -rf "$W"
mkdir -p "$W"
LOGF=$W.log
: >"$LOGF"
trap 'stop_all; rm -rf "$W"' EXIT

log "building the fixture (${FIX_MIB} MiB virtual)"
line=$(bash "$(dirname "${BASH_SOURCE[0]}")/fixture.sh" "$W/fix" 2>>"$LOGF")
echo "$line" >&2
[[ -n ${FACTS:-} ]] && echo "$line" >>"$FACTS"
RAW=$W/fix/fs.raw QCOW=$W/fix/fs.qcow2 DENSE=$W/fix/fs-dense.raw DST=$W/out.raw
cp --sparse=never "$RAW" "$DENSE"
SIZE=$(stat -c %s "$RAW")
sync

# rows SHAPE SRC FMT: every tool on SRC (format FMT) into DST
rows() {
    local shape=$1 src=$2 fmt=$3 t name cmd ok
    local -a T=(
        "stowage copy|$BIN copy --source-format $fmt $src $DST"
        "nbdcopy|nbdcopy --flush $src $DST"
        "qemu-img convert -O raw|qemu-img convert -f $fmt -O raw $src $DST"
        "qemu-img convert -W -m 8 -O raw|qemu-img convert -W -m 8 -f $fmt -O raw $src $DST"
        "cp --sparse=always|cp --sparse=always $src $DST"
    )
    if [[ $fmt == qcow2 ]]; then
        # nbdcopy reads qcow2 through qemu-nbd (its own way: nbdcopy -- [ CMD ]);
        # cp would copy the qcow2 file, not its guest view
        T[1]="nbdcopy (qemu-nbd -f qcow2)|nbdcopy --flush -- [ qemu-nbd -r -f qcow2 $src ] $DST"
        unset 'T[4]'
    fi
    for t in "${T[@]}"; do
        name=${t%%|*} cmd=${t#*|}
        SYNC=1 bench r "$shape: $name" "$SIZE" "rm -f $DST; drop" "$cmd"
        if [[ -f $DST ]] && ! grep -q "^r	$shape: $name	.*FAILED" "$OUT_TSV"; then
            ok=1
            qemu-img compare -q -f raw -F "$fmt" "$DST" "$src" >>"$LOGF" 2>&1 || ok=0
            a=$(alloc_mib "$DST")
            # the note of the row just written: the destination's allocation
            awk -F'\t' -v OFS='\t' -v t="$shape: $name" -v a="$a" -v s="$(alloc_mib "$src")" -v ok=$ok \
                '$1 == "r" && $2 == t { $7 = "dst allocated " a " MiB (src file " s " MiB); MiB/s of virtual size" (ok ? "" : "; VERIFY FAILED") } { print }' \
                "$OUT_TSV" >"$OUT_TSV.tmp" && mv "$OUT_TSV.tmp" "$OUT_TSV"
        fi
        rm -f "$DST"
    done
}
rows "fs raw, sparse" "$RAW" raw
rows "fs raw, dense" "$DENSE" raw
rows "fs qcow2 -> raw" "$QCOW" qcow2
log "done"
