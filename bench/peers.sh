#!/usr/bin/env bash
# bench/peers.sh — a copy of ../shared/bench/peers.sh (the shared peer script),
# vendored so that bench/run.sh and its CI smoke work on a clean clone. The only
# change: SIZE_MIB (64..) may replace SIZE_GIB, for the smoke and for sizes
# between 256 MiB and 4 GiB (diff against the shared copy to check).
#
# bench-peers.sh — performance anchors for the storage data path (block copy of
# VM images, NBD export, FUSE image cache), measured with the best existing
# tools on THIS machine.  Prints a markdown table (median of RUNS runs) on
# stdout; progress and tool output go to stderr / $LOG.
#
# Needs root (drop_caches, loop/XFS mounts, FUSE).  Packages (Debian):
#   apt-get install qemu-utils libnbd-bin nbdkit fio xfsprogs btrfs-progs fuse3
# Section e builds a small go-fuse loopback (github.com/hanwen/go-fuse/v2
# v2.12.1) with Go; set FUSEBENCH=/path/to/binary to skip the build.
#
# Run time on the 2-core/24 GiB VM: 8.5-10.5 min at SIZE_GIB=2, ~14 min at 4.
# Example (keeping Go's caches under /tmp):
#   GOMODCACHE=$SCRATCH/gopath/pkg/mod GOCACHE=$SCRATCH/gocache SIZE_GIB=2 \
#     OUT_TSV=$SCRATCH/peers.tsv bash bench-peers.sh > $SCRATCH/peers.md
#
# Parameters (env):
#   SIZE_GIB=2            size of the dense image / virtual size of the sparse one
#   SIZE_MIB=             the same in MiB (a multiple of 64 >= 64); overrides SIZE_GIB
#   WORKDIR=$SCRATCH/peerbench scratch directory (removed at exit unless KEEP=1)
#   RUNS=3                runs per figure (median, min and max are reported)
#   SECTIONS="a b c d e f" which sections to run
#   VERIFY=1              cmp every copy's output with its source once (untimed)
#   SETTLE=3              seconds to wait after drop_caches before a cold run.
#                         On VMs with free page reporting (virtio-balloon) freed
#                         guest memory goes back to the host ~2 s later and must
#                         be faulted in again, so an immediate run is faster and
#                         much noisier than a settled one.
#   OUT_TSV=              also write the raw results as TSV to this path
#   LOG=$WORKDIR.log      command output (kept after exit)
#   GO=go                 Go toolchain for the FUSE helper
#   FUSEBENCH=            prebuilt FUSE helper binary (skips the Go build)
# Hooks to measure our own program side by side (placeholders in braces):
#   OURS_COPY='prog copy {src} {dst}'     sections b and c (dst does not exist yet)
#   OURS_NBD='prog serve --unix {sock} {file}'  section d (foreground process,
#                                          writable export; read and write tests)
#   OURS_FUSE='prog mount {src} {mnt}'    section e (foreground process; {src}
#                                          is a directory holding dense.raw)
#   OURS_CLONE='prog clone {base} {clone}' section f
#   OURS_NAME=ours                        label used in the table
set -euo pipefail

SIZE_GIB=${SIZE_GIB:-2}
SIZE_MIB=${SIZE_MIB:-$((SIZE_GIB * 1024))}
WORKDIR=${WORKDIR:-${TMPDIR:-/tmp}/peerbench}
WORKDIR=${WORKDIR%/}
RUNS=${RUNS:-3}
SECTIONS=${SECTIONS:-"a b c d e f"}
VERIFY=${VERIFY:-1}
SETTLE=${SETTLE:-3}
OUT_TSV=${OUT_TSV:-}
LOG=${LOG:-$WORKDIR.log}
GO=${GO:-go}
FUSEBENCH=${FUSEBENCH:-}
OURS_COPY=${OURS_COPY:-}
OURS_NBD=${OURS_NBD:-}
OURS_FUSE=${OURS_FUSE:-}
OURS_CLONE=${OURS_CLONE:-}
OURS_NAME=${OURS_NAME:-ours}
KEEP=${KEEP:-0}

die() { echo "bench-peers: $*" >&2; exit 1; }
[[ $SIZE_GIB =~ ^[0-9]+$ && $SIZE_GIB -ge 1 ]] || die "SIZE_GIB must be a positive integer"
[[ $SIZE_MIB =~ ^[0-9]+$ && $SIZE_MIB -ge 64 && $((SIZE_MIB % 64)) -eq 0 ]] || die "SIZE_MIB must be a multiple of 64, at least 64"
[[ $RUNS =~ ^[0-9]+$ && $RUNS -ge 1 ]] || die "RUNS must be a positive integer"
[[ $WORKDIR =~ ^/[A-Za-z0-9._/-]+$ ]] || die "WORKDIR must be an absolute path without spaces or odd characters"
[[ $WORKDIR != / ]] || die "WORKDIR must not be /"
[[ $(id -u) -eq 0 ]] || die "must run as root (drop_caches, mounts)"

SIZE=$((SIZE_MIB * 1024 * 1024))
SIZE_H="$SIZE_MIB MiB"
W=$WORKDIR
DATA=$W/data          # source images (also the FUSE loopback source dir)
OUT=$W/out            # copy destinations
DENSE=$DATA/dense.raw
SPARSE=$DATA/sparse.raw
RES=$W/results.tsv
PIDS=()
MOUNTS=()
T_START=$SECONDS

log() { printf '[%s +%3ds] %s\n' "$(date +%T)" $((SECONDS - T_START)) "$*" >&2; }
has() { command -v "$1" >/dev/null 2>&1; }
want() { [[ " $SECTIONS " == *" $1 "* ]]; }

cleanup() {
    local rc=$? p m
    set +e
    for p in "${PIDS[@]}"; do
        kill "$p" 2>/dev/null && wait "$p" 2>/dev/null
    done
    for ((m = ${#MOUNTS[@]} - 1; m >= 0; m--)); do
        if mountpoint -q "${MOUNTS[m]}"; then
            umount "${MOUNTS[m]}" 2>/dev/null || umount -l "${MOUNTS[m]}" 2>/dev/null
        fi
    done
    if [[ $KEEP != 1 && -f $W/.peerbench ]]; then rm -rf "$W"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# WORKDIR is wiped: refuse a non-empty directory that an earlier run did not create
if [[ -e $W && ! -f $W/.peerbench ]] && [[ -n $(ls -A "$W" 2>/dev/null) ]]; then
    trap - EXIT
    die "$W exists, is not empty and is not a previous peerbench WORKDIR; refusing to wipe it"
fi
rm -rf "$W"
mkdir -p "$DATA" "$OUT"
: >"$W/.peerbench"
: >"$RES"
: >"$LOG"

# ---------------------------------------------------------------- helpers
now_us() { local t=$EPOCHREALTIME; echo "${t/./}"; }

CAN_DROP=0
drop_caches() {
    sync
    if [[ $CAN_DROP == 1 ]]; then echo 3 >/proc/sys/vm/drop_caches; fi
    sleep "$SETTLE"
}
warm() { cat "$@" >/dev/null; }

# record SECTION TEST UNIT NOTE VALUE... -> results.tsv (median/min/max)
record() {
    local sec=$1 name=$2 unit=$3 note=$4
    shift 4
    local stats
    stats=$(printf '%s\n' "$@" | sort -g | awk '
        { v[NR] = $1 }
        END { n = NR; med = (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
              printf "%.1f\t%.1f\t%.1f", med, v[1], v[n] }')
    printf '%s\t%s\t%s\t%s\t%s\n' "$sec" "$name" "$unit" "$stats" "$note" >>"$RES"
    log "$sec | $name | $stats $unit | $note"
}
record_fail() {
    printf '%s\t%s\t%s\t-\t-\t-\tFAILED: %s\n' "$1" "$2" "${3:-MiB/s}" "$4" >>"$RES"
    log "$1 | $2 | FAILED: $4"
}

# run_logged CMD: eval CMD with output appended to $LOG; on failure sets LAST_ERR
LAST_ERR=
run_logged() {
    local tmp=$W/.cmd.out rc=0
    eval "$1" >"$tmp" 2>&1 || rc=$?
    cat "$tmp" >>"$LOG"
    if [[ $rc -ne 0 ]]; then
        LAST_ERR="rc=$rc: $(grep -v '^[[:space:]]*$' "$tmp" | tail -n 1 | tr '\t' ' ' | cut -c1-160)"
    fi
    return $rc
}

# bench SECTION TEST BYTES PREP CMD [NOTE]
#   PREP (untimed) and CMD (timed) are eval'd RUNS times.  BYTES>0 -> MiB/s,
#   BYTES=0 -> latency in ms.
bench() {
    local sec=$1 name=$2 bytes=$3 prep=$4 cmd=$5 note=${6:-}
    local vals=() i t0 t1
    echo "### $sec / $name" >>"$LOG"
    for ((i = 0; i < RUNS; i++)); do
        if ! run_logged "$prep"; then record_fail "$sec" "$name" "" "prep $LAST_ERR"; return 0; fi
        t0=$(now_us)
        if ! run_logged "$cmd"; then
            record_fail "$sec" "$name" "$([[ $bytes -gt 0 ]] && echo MiB/s || echo ms)" "$LAST_ERR"
            return 0
        fi
        t1=$(now_us)
        if [[ $bytes -gt 0 ]]; then
            vals+=("$(awk -v b="$bytes" -v us=$((t1 - t0)) 'BEGIN { printf "%.3f", b / 1048576 / (us / 1e6) }')")
        else
            vals+=("$(awk -v us=$((t1 - t0)) 'BEGIN { printf "%.3f", us / 1000 }')")
        fi
    done
    if [[ $bytes -gt 0 ]]; then record "$sec" "$name" MiB/s "$note" "${vals[@]}"
    else record "$sec" "$name" ms "$note" "${vals[@]}"; fi
}

# bench_fio SECTION TEST PREP FIO-ARGS...   (bandwidth as reported by fio)
bench_fio() {
    local sec=$1 name=$2 prep=$3
    shift 3
    local vals=() i out bw
    echo "### $sec / $name" >>"$LOG"
    for ((i = 0; i < RUNS; i++)); do
        if ! run_logged "$prep"; then record_fail "$sec" "$name" "" "prep $LAST_ERR"; return 0; fi
        if ! out=$(fio --output-format=terse --terse-version=3 "$@" 2>>"$LOG"); then
            record_fail "$sec" "$name" "" "fio failed: $(tail -n 1 "$LOG")"; return 0
        fi
        echo "$out" >>"$LOG"
        # terse v3: field 7 = read KiB/s, field 48 = write KiB/s
        bw=$(echo "$out" | awk -F';' '$1 == "3" { r += $7; w += $48 } END { printf "%.3f", (r + w) / 1024 }')
        vals+=("$bw")
    done
    record "$sec" "$name" MiB/s "" "${vals[@]}"
}

# start_bg CMD: start a foreground server in the background; sets BG_PID
BG_PID=
start_bg() {
    eval "exec $1" >>"$LOG" 2>&1 &
    BG_PID=$!
    PIDS+=("$BG_PID")
}
stop_bg() { # only ever signals a PID that this script started and has not reaped
    local p=${1:-} q keep=() found=0
    for q in "${PIDS[@]}"; do
        if [[ $q == "$p" ]]; then found=1; else keep+=("$q"); fi
    done
    [[ $found == 1 ]] || return 0
    kill "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
    PIDS=("${keep[@]}")
}
wait_nbd() {
    local i
    for ((i = 0; i < 200; i++)); do
        nbdinfo --size "$1" >/dev/null 2>&1 && return 0
        kill -0 "$BG_PID" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}
subst() { # subst TEMPLATE key=value... -> template with {key} replaced
    local t=$1 kv
    shift
    for kv in "$@"; do t=${t//\{${kv%%=*}\}/${kv#*=}}; done
    printf '%s' "$t"
}
verify() { # verify SECTION TEST A B
    [[ $VERIFY == 1 ]] || return 0
    # read B with 1 MiB requests (cmp's own small reads are very slow through FUSE direct_io)
    if ! cmp -s "$3" <(dd if="$4" bs=1M status=none); then
        printf '%s\t%s\t-\t-\t-\t-\tVERIFY FAILED: output differs from source\n' "$1" "$2" >>"$RES"
        log "$1 | $2 | VERIFY FAILED"
    fi
}
alloc_mib() { du -m "$1" | awk '{ print $1 }'; }

# ---------------------------------------------------------------- facts
FACTS=$W/facts.md
{
    echo "- kernel: $(uname -r)"
    echo "- cpu: $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), $(nproc) cores"
    echo "- memory: $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
    src=$(findmnt -n -o SOURCE --target "$W")
    fst=$(findmnt -n -o FSTYPE --target "$W")
    dev=$(basename "$src")
    echo "- workdir: $W on $src ($fst, $(findmnt -n -o OPTIONS --target "$W"))"
    if [[ -e /sys/block/$dev/queue/rotational ]]; then
        echo "- disk: $dev rotational=$(cat /sys/block/"$dev"/queue/rotational) scheduler=$(cat /sys/block/"$dev"/queue/scheduler) max_sectors_kb=$(cat /sys/block/"$dev"/queue/max_sectors_kb)"
    fi
    hv=$(lscpu 2>/dev/null | awk -F': *' '/Hypervisor vendor/ { print $2 }')
    echo "- virtualization: ${hv:-none detected}$(grep -qw nested_pvm=1 /proc/cmdline && echo ' (nested, PVM)')"
    if [[ -r /sys/module/page_reporting/parameters/page_reporting_order ]] && [[ -e /sys/bus/virtio/drivers/virtio_balloon ]] &&
        ls /sys/bus/virtio/drivers/virtio_balloon/ | grep -q virtio; then
        echo "- free page reporting: virtio_balloon bound, page_reporting_order=$(cat /sys/module/page_reporting/parameters/page_reporting_order) (freed guest RAM is returned to the host; fresh pages fault in slowly)"
    fi
    echo "- size=$SIZE_H RUNS=$RUNS SETTLE=${SETTLE}s"
} >"$FACTS"

# drop_caches: does it work and does it really evict?
if (sync; echo 3 >/proc/sys/vm/drop_caches) 2>/dev/null; then
    CAN_DROP=1
    head -c 16M /dev/zero >"$W/.probe"
    cat "$W/.probe" >/dev/null
    drop_caches
    res=$(fincore -nb -o RES "$W/.probe" 2>/dev/null | awk '{ print $1 }' || echo "?")
    rm -f "$W/.probe"
    echo "- drop_caches: permitted (resident after drop of a 16 MiB probe: ${res:-?} bytes)" >>"$FACTS"
else
    echo "- drop_caches: NOT permitted — 'cold' figures are really warm" >>"$FACTS"
fi
if [[ -r /proc/config.gz ]]; then
    echo "- kernel config: $(zcat /proc/config.gz | grep -E '^CONFIG_FUSE_(FS|PASSTHROUGH|IO_URING)=' | tr '\n' ' ')" >>"$FACTS"
fi
{
    printf -- '- tools:'
    has qemu-img && printf ' %s;' "$(qemu-img --version | head -n 1)"
    has nbdcopy && printf ' nbdcopy %s;' "$(nbdcopy --version | awk 'NR == 1 { print $2 }')"
    has nbdkit && printf ' %s;' "$(nbdkit --version)"
    has fio && printf ' %s;' "$(fio --version)"
    printf ' %s\n' "$(cp --version | head -n 1)"
} >>"$FACTS"
log "facts:"
cat "$FACTS" >&2

# ---------------------------------------------------------------- data
log "creating $SIZE_H dense random image"
if has openssl; then
    openssl enc -aes-256-ctr -pass pass:peerbench -nosalt -pbkdf2 -in /dev/zero 2>/dev/null |
        head -c "$SIZE" >"$DENSE" || true
else
    head -c "$SIZE" /dev/urandom >"$DENSE"
fi
[[ $(stat -c %s "$DENSE") -eq $SIZE ]] || die "could not create $DENSE"

log "creating $SIZE_H sparse image (10% data in scattered 1 MiB extents)"
NSLOTS=$SIZE_MIB
NDATA=$((NSLOTS / 10))
truncate -s "$SIZE" "$SPARSE"
awk -v n="$NSLOTS" -v k="$NDATA" 'BEGIN { srand(42); for (i = 0; i < n; i++) a[i] = i
    for (i = 0; i < k; i++) { j = i + int(rand() * (n - i)); t = a[i]; a[i] = a[j]; a[j] = t; print a[i] } }' |
    while read -r slot; do
        dd if="$DENSE" of="$SPARSE" bs=1M skip="$slot" seek="$slot" count=1 conv=notrunc status=none
    done
sync
echo "- sparse image: $SIZE_H virtual, $NDATA x 1 MiB data extents, $(alloc_mib "$SPARSE") MiB allocated" >>"$FACTS"

# ---------------------------------------------------------------- a: limits
if want a; then
    log "section a: physical limits"
    if has fio; then
        FIOF=$W/fio.dat
        bench_fio a "fio seq write direct bs=1M qd16 (libaio)" "drop_caches" \
            --name=seqwrite --filename="$FIOF" --rw=write --bs=1M --iodepth=16 --direct=1 \
            --ioengine=libaio --size="$SIZE"
        bench_fio a "fio seq read direct bs=1M qd16 (libaio)" "drop_caches" \
            --name=seqread --filename="$FIOF" --rw=read --bs=1M --iodepth=16 --direct=1 \
            --ioengine=libaio --size="$SIZE"
        rm -f "$FIOF"
    else
        record_fail a "fio" MiB/s "fio not installed"
    fi
    bench a "memory: dd /dev/zero -> /dev/null bs=1M" $((SIZE * 4)) "true" \
        "dd if=/dev/zero of=/dev/null bs=1M count=$((SIZE_MIB * 4)) status=none"
    bench a "page cache read: dd bs=1M (warm)" "$SIZE" "warm $DENSE" \
        "dd if=$DENSE of=/dev/null bs=1M status=none"
    mkdir -p "$W/tmpfs"
    if mount -t tmpfs -o size=$((SIZE_MIB + 1024))m peerbench-tmpfs "$W/tmpfs" 2>>"$LOG"; then
        MOUNTS+=("$W/tmpfs")
        bench a "memory copy: cp page cache -> tmpfs (warm src, fresh dst pages)" "$SIZE" \
            "rm -f $W/tmpfs/x; warm $DENSE; sleep $SETTLE" "cp $DENSE $W/tmpfs/x"
        rm -f "$W/tmpfs/x"
        umount "$W/tmpfs"
    else
        record_fail a "memory copy: cp page cache -> tmpfs" MiB/s "tmpfs mount failed"
    fi
fi

# ---------------------------------------------------------------- b: dense copy
if want b; then
    log "section b: dense copy ($SIZE_H random data), timed until synced"
    DST=$OUT/dense.copy
    declare -a BT=(
        "cp|cp $DENSE $DST && sync"
        "dd bs=4M oflag=direct|dd if=$DENSE of=$DST bs=4M oflag=direct status=none && sync"
        "qemu-img convert -p -O raw|qemu-img convert -p -f raw -O raw $DENSE $DST && sync"
        "qemu-img convert -W -m 8 -O raw|qemu-img convert -W -m 8 -f raw -O raw $DENSE $DST && sync"
        "nbdcopy file->file|nbdcopy --flush $DENSE $DST && sync"
    )
    [[ -n $OURS_COPY ]] && BT+=("$OURS_NAME copy|$(subst "$OURS_COPY" src="$DENSE" dst="$DST") && sync")
    for cache in cold warm; do
        for t in "${BT[@]}"; do
            name=${t%%|*} cmd=${t#*|}
            case $name in qemu-img*) has qemu-img || { record_fail b "$name ($cache)" MiB/s "qemu-img missing"; continue; } ;; nbdcopy*) has nbdcopy || { record_fail b "$name ($cache)" MiB/s "nbdcopy missing"; continue; } ;; esac
            if [[ $cache == cold ]]; then prep="rm -f $DST; drop_caches"; else prep="rm -f $DST; sync; warm $DENSE"; fi
            bench b "$name ($cache src)" "$SIZE" "$prep" "$cmd"
            if [[ $cache == warm && -f $DST ]]; then verify b "$name" "$DENSE" "$DST"; fi
            rm -f "$DST"
        done
    done
fi

# ---------------------------------------------------------------- c: sparse copy
if want c; then
    log "section c: sparse copy ($SIZE_H virtual, 10% data), cold source, timed until synced"
    DST=$OUT/sparse.copy
    SOCK=$W/nbd-sparse.sock
    declare -a CT=(
        "cp --sparse=always|cp --sparse=always $SPARSE $DST && sync"
        "dd bs=1M conv=sparse|dd if=$SPARSE of=$DST bs=1M conv=sparse status=none && sync"
        "qemu-img convert -O raw|qemu-img convert -f raw -O raw $SPARSE $DST && sync"
        "qemu-img convert -W -m 8 -O raw|qemu-img convert -W -m 8 -f raw -O raw $SPARSE $DST && sync"
        "nbdcopy file->file|nbdcopy --flush $SPARSE $DST && sync"
        "nbdcopy nbdkit(file,unix)->file|nbdcopy --flush 'nbd+unix:///?socket=$SOCK' $DST && sync"
    )
    [[ -n $OURS_COPY ]] && CT+=("$OURS_NAME copy|$(subst "$OURS_COPY" src="$SPARSE" dst="$DST") && sync")
    for t in "${CT[@]}"; do
        name=${t%%|*} cmd=${t#*|}
        srv=
        if [[ $name == *nbdkit* ]]; then
            has nbdkit || { record_fail c "$name" MiB/s "nbdkit missing"; continue; }
            rm -f "$SOCK"
            start_bg "nbdkit -f -r -U $SOCK file $SPARSE"
            srv=$BG_PID
            wait_nbd "nbd+unix:///?socket=$SOCK" || { record_fail c "$name" MiB/s "nbdkit did not start"; stop_bg "$srv"; continue; }
        fi
        bench c "$name" "$SIZE" "rm -f $DST; drop_caches" "$cmd"
        if [[ -f $DST ]]; then
            n=$(awk -F'\t' -v s=c -v t="$name" '$1 == s && $2 == t' "$RES" | tail -n 1)
            if [[ $n != *FAILED* ]]; then
                a=$(alloc_mib "$DST")
                # patch the note column of the row just written
                awk -F'\t' -v OFS='\t' -v s=c -v t="$name" -v a="$a" -v v="$(alloc_mib "$SPARSE")" \
                    '$1 == s && $2 == t { $7 = "dst allocated " a " MiB (src " v " MiB); MiB/s of virtual size" } { print }' \
                    "$RES" >"$RES.tmp" && mv "$RES.tmp" "$RES"
                verify c "$name" "$SPARSE" "$DST"
            fi
        fi
        rm -f "$DST"
        [[ -n $srv ]] && stop_bg "$srv"
    done
fi

# ---------------------------------------------------------------- d: NBD
if want d && has nbdkit && has nbdcopy; then
    log "section d: NBD export of the dense image (read) and into a fresh sparse file (write)"
    SOCK=$W/nbd.sock
    WDST=$OUT/nbd-write.raw
    PORT=
    for p in $(seq 10810 10999); do
        if [[ -z $(ss -Hltn "sport = :$p" 2>/dev/null) ]]; then PORT=$p; break; fi
    done
    # name|server command template ({file}, {ro})|uri
    declare -a SV=(
        "nbdkit file (unix)|nbdkit -f {ro} -U $SOCK file {file}|nbd+unix:///?socket=$SOCK"
        "qemu-nbd raw (unix)|qemu-nbd -f raw -t -e 16 {ro} -k $SOCK {file}|nbd+unix:///?socket=$SOCK"
    )
    [[ -n $PORT ]] && SV+=("nbdkit file (tcp 127.0.0.1)|nbdkit -f {ro} -i 127.0.0.1 -p $PORT file {file}|nbd://127.0.0.1:$PORT")
    [[ -n $OURS_NBD ]] && SV+=("$OURS_NAME (unix)|$(subst "$OURS_NBD" sock="$SOCK")|nbd+unix:///?socket=$SOCK")
    for s in "${SV[@]}"; do
        IFS='|' read -r sname stmpl uri <<<"$s"
        case $sname in qemu-nbd*) has qemu-nbd || { record_fail d "$sname" MiB/s "qemu-nbd missing"; continue; } ;; esac
        ro=-r
        [[ $sname == "$OURS_NAME"* ]] && ro=
        # --- read: export the dense image read-only, copy to null:
        rm -f "$SOCK"
        start_bg "$(subst "$stmpl" ro="$ro" file="$DENSE")"
        srv=$BG_PID
        if ! wait_nbd "$uri"; then
            record_fail d "$sname read" MiB/s "server did not start (see $LOG)"; stop_bg "$srv"; continue
        fi
        mc=$(nbdinfo "$uri" 2>/dev/null | awk '/can_multi_conn/ { print $2 }')
        bench d "$sname: nbdcopy -> null: (warm src)" "$SIZE" "warm $DENSE" \
            "nbdcopy '$uri' null:" "multi_conn=$mc"
        if [[ $sname != *tcp* ]]; then
            bench d "$sname: nbdcopy -> null: (cold src)" "$SIZE" "drop_caches" \
                "nbdcopy '$uri' null:" "multi_conn=$mc"
        fi
        if [[ $sname == "nbdkit file (unix)" ]] && has fio && fio --enghelp 2>/dev/null | grep -qw nbd; then
            bench_fio d "$sname: fio nbd engine read bs=1M qd16 (warm src)" "warm $DENSE" \
                --name=nbdread --ioengine=nbd --uri="$uri" --rw=read --bs=1M --iodepth=16 --size="$SIZE"
        fi
        stop_bg "$srv"
        # --- write: fresh sparse target file per run, server restarted per run
        wprep="rm -f $SOCK $WDST; truncate -s $SIZE $WDST; start_bg \"$(subst "$stmpl" ro= file="$WDST")\"; wait_nbd '$uri'; warm $DENSE"
        bench d "$sname: nbdcopy file -> export (write, flush)" "$SIZE" "stop_bg \${BG_PID}; $wprep" \
            "nbdcopy --flush $DENSE '$uri' && sync"
        wmc=$(nbdinfo "$uri" 2>/dev/null | awk '/can_multi_conn/ { print $2 }')
        # annotate multi-conn of the writable export
        awk -F'\t' -v OFS='\t' -v t="$sname: nbdcopy file -> export (write, flush)" -v m="multi_conn=$wmc" \
            '$1 == "d" && $2 == t && $7 !~ /FAILED/ { $7 = m } { print }' "$RES" >"$RES.tmp" && mv "$RES.tmp" "$RES"
        stop_bg "$BG_PID"
        [[ -f $WDST ]] && verify d "$sname write" "$DENSE" "$WDST"
        if [[ $sname == "nbdkit file (unix)" ]] && has fio && fio --enghelp 2>/dev/null | grep -qw nbd; then
            bench_fio d "$sname: fio nbd engine write bs=1M qd16 (+end_fsync)" \
                "stop_bg \${BG_PID}; rm -f $SOCK $WDST; truncate -s $SIZE $WDST; start_bg \"$(subst "$stmpl" ro= file="$WDST")\"; wait_nbd '$uri'" \
                --name=nbdwrite --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=16 --size="$SIZE" --end_fsync=1
            stop_bg "$BG_PID"
        fi
        rm -f "$WDST"
    done
elif want d; then
    record_fail d "nbd" MiB/s "nbdkit or nbdcopy missing"
fi

# ---------------------------------------------------------------- e: FUSE
FUSE_SRC=
IFS= read -r -d '' FUSE_SRC <<'GOEOF' || true
// fusebench: go-fuse loopback used only to measure FUSE overhead.
// Prints "MOUNTED passthrough_cap=<bool> ..." once mounted; on SIGTERM it
// unmounts and prints READS=<n> (READ ops served by this process: 0 when
// the kernel's FUSE passthrough really bypassed it).
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

var reads atomic.Int64
var passthrough, directIO bool

// countingFile keeps LoopbackFile's PassthroughFd: the kernel may bypass us.
type countingFile struct{ *fs.LoopbackFile }

func (f *countingFile) Read(ctx context.Context, buf []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	reads.Add(1)
	return f.LoopbackFile.Read(ctx, buf, off)
}

// noPTFile hides PassthroughFd, so every READ is served by this process.
type noPTFile struct{ countingFile }

func (f *noPTFile) PassthroughFd() (int, bool) { return -1, false }

type node struct{ fs.LoopbackNode }

func (n *node) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	fh, fl, errno := n.LoopbackNode.Open(ctx, flags)
	lf, ok := fh.(*fs.LoopbackFile)
	if errno != 0 || !ok {
		return fh, fl, errno
	}
	if directIO {
		fl |= fuse.FOPEN_DIRECT_IO
	}
	if passthrough {
		return &countingFile{lf}, fl, 0
	}
	return &noPTFile{countingFile{lf}}, fl, 0
}

func main() {
	flag.BoolVar(&passthrough, "passthrough", false, "FUSE passthrough (kernel reads the backing file directly)")
	flag.BoolVar(&directIO, "directio", false, "FOPEN_DIRECT_IO: no kernel page cache for file data; READ size = application read size (up to maxwrite)")
	maxWrite := flag.Int("maxwrite", 0, "MaxWrite = max READ/WRITE request size (0: go-fuse default 128 KiB)")
	maxRA := flag.Int("maxreadahead", 0, "MaxReadAhead (0: kernel default)")
	debug := flag.Bool("debug", false, "FUSE debug output")
	flag.Parse()
	if flag.NArg() != 2 {
		log.Fatalf("usage: fusebench [flags] SRC MNT")
	}
	src, mnt := flag.Arg(0), flag.Arg(1)
	var st syscall.Stat_t
	if err := syscall.Stat(src, &st); err != nil {
		log.Fatal(err)
	}
	rootData := &fs.LoopbackRoot{Path: src, Dev: uint64(st.Dev),
		NewNode: func(r *fs.LoopbackRoot, _ *fs.Inode, _ string, _ *syscall.Stat_t) fs.InodeEmbedder {
			return &node{fs.LoopbackNode{RootData: r}}
		}}
	root := &node{fs.LoopbackNode{RootData: rootData}}
	rootData.RootNode = root
	sec := time.Second
	server, err := fs.Mount(mnt, root, &fs.Options{
		AttrTimeout: &sec, EntryTimeout: &sec,
		MountOptions: fuse.MountOptions{FsName: "fusebench", Name: "fusebench", Debug: *debug,
			MaxWrite: *maxWrite, MaxReadAhead: *maxRA, DirectMount: true},
	})
	if err != nil {
		log.Fatalf("mount: %v", err)
	}
	ptcap := server.KernelSettings().Flags64()&fuse.CAP_PASSTHROUGH != 0
	fmt.Printf("MOUNTED passthrough_cap=%v passthrough_requested=%v direct_io=%v maxwrite=%d\n", ptcap, passthrough, directIO, *maxWrite)
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-c
		for i := 0; i < 50 && server.Unmount() != nil; i++ {
			time.Sleep(100 * time.Millisecond)
		}
	}()
	server.Wait()
	fmt.Printf("READS=%d\n", reads.Load())
}
GOEOF

build_fusebench() {
    local d=$W/fusebench
    mkdir -p "$d"
    printf '%s\n' "$FUSE_SRC" >"$d/main.go"
    (
        cd "$d" &&
            "$GO" mod init fusebench &&
            "$GO" get github.com/hanwen/go-fuse/v2@v2.12.1 &&
            "$GO" build -o "$d/fusebench" .
    ) >>"$LOG" 2>&1 && FUSEBENCH=$d/fusebench
}

# fuse_mount CMD: start a FUSE daemon and wait for the mount; sets FUSE_PID
fuse_mount() {
    local i
    : >"$W/fuse.out"
    eval "exec $1" >"$W/fuse.out" 2>>"$LOG" &
    FUSE_PID=$!
    PIDS+=("$FUSE_PID")
    MOUNTS+=("$MNT")
    for ((i = 0; i < 200; i++)); do
        if mountpoint -q "$MNT" && [[ -e $MNT/dense.raw ]]; then return 0; fi
        kill -0 "$FUSE_PID" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}
fuse_umount() {
    kill -TERM "$FUSE_PID" 2>/dev/null || true
    local i
    for ((i = 0; i < 100; i++)); do mountpoint -q "$MNT" || break; sleep 0.05; done
    mountpoint -q "$MNT" && umount "$MNT" 2>/dev/null
    stop_bg "$FUSE_PID"
    cat "$W/fuse.out" >>"$LOG"
}

if want e; then
    log "section e: FUSE overhead (sequential read of the dense image, dd bs=1M)"
    MNT=$W/mnt
    mkdir -p "$MNT"
    bench e "direct (no FUSE), cold" "$SIZE" "drop_caches" "dd if=$DENSE of=/dev/null bs=1M status=none"
    bench e "direct (no FUSE), warm" "$SIZE" "warm $DENSE" "dd if=$DENSE of=/dev/null bs=1M status=none"
    if [[ -z $FUSEBENCH ]] && has "$GO"; then
        log "building go-fuse v2.12.1 loopback helper"
        build_fusebench || log "fusebench build failed (see $LOG)"
    fi
    declare -a FT=()
    if [[ -n $FUSEBENCH && -x $FUSEBENCH ]]; then
        # Buffered reads reach the daemon as readahead-sized (128 KiB) READs whatever
        # MaxWrite says, so the 1 MiB request size is only tried with direct_io.
        FT+=("go-fuse loopback, page cache, 128 KiB req|$FUSEBENCH -passthrough=false $DATA $MNT")
        FT+=("go-fuse loopback, direct_io, 1 MiB req|$FUSEBENCH -passthrough=false -directio -maxwrite=1048576 $DATA $MNT")
        FT+=("go-fuse loopback, passthrough|$FUSEBENCH -passthrough=true $DATA $MNT")
    else
        record_fail e "go-fuse loopback" MiB/s "helper not built (no Go toolchain or no module proxy?)"
    fi
    [[ -n $OURS_FUSE ]] && FT+=("$OURS_NAME FUSE|$(subst "$OURS_FUSE" src="$DATA" mnt="$MNT")")
    for t in "${FT[@]}"; do
        name=${t%%|*} cmd=${t#*|}
        if ! fuse_mount "$cmd"; then
            record_fail e "$name" MiB/s "mount failed: $(tail -n 1 "$LOG")"
            fuse_umount
            continue
        fi
        mline=$(grep -m1 '^MOUNTED' "$W/fuse.out" || true)
        bench e "$name, cold" "$SIZE" "drop_caches" "dd if=$MNT/dense.raw of=/dev/null bs=1M status=none"
        bench e "$name, warm" "$SIZE" "warm $DENSE" "dd if=$MNT/dense.raw of=/dev/null bs=1M status=none"
        [[ $VERIFY == 1 ]] && verify e "$name" "$DENSE" "$MNT/dense.raw"
        fuse_umount
        reads=$(awk -F= '/^READS=/ { print $2 }' "$W/fuse.out")
        note="${mline#MOUNTED }${reads:+; READ ops seen by daemon (all passes incl. cmp)=$reads}"
        [[ $name == *passthrough* && $reads == 0 ]] && note="$note (passthrough ACTIVE)"
        [[ $name == *passthrough* && -n $reads && $reads != 0 ]] && note="$note (passthrough NOT active)"
        awk -F'\t' -v OFS='\t' -v t1="$name, cold" -v t2="$name, warm" -v n="$note" \
            '$1 == "e" && ($2 == t1 || $2 == t2) && $7 !~ /FAILED/ { $7 = n } { print }' \
            "$RES" >"$RES.tmp" && mv "$RES.tmp" "$RES"
    done
fi

# ---------------------------------------------------------------- f: clones
if want f; then
    log "section f: linked clone cost"
    if has qemu-img; then
        C=$OUT/clone.qcow2
        bench f "qemu-img create -f qcow2 -b base.raw -F raw (+fsync)" 0 "rm -f $C" \
            "qemu-img create -q -f qcow2 -b $DENSE -F raw $C && sync $C"
        rm -f "$C"
    fi
    bench f "cp --reflink=always (ext4 workdir)" 0 "rm -f $OUT/ref" "cp --reflink=always $DENSE $OUT/ref"
    rm -f "$OUT/ref"
    for fst in xfs btrfs; do
        case $fst in
            xfs) mk="mkfs.xfs -q -f -m reflink=1" ;;
            btrfs) mk="mkfs.btrfs -q -f" ;;
        esac
        has "${mk%% *}" || { record_fail f "cp --reflink=always ($fst loop)" ms "${mk%% *} missing"; continue; }
        img=$W/$fst.img mp=$W/$fst
        mkdir -p "$mp"
        truncate -s $((SIZE_MIB + 2048))M "$img"
        if ! $mk "$img" >>"$LOG" 2>&1 || ! mount -o loop "$img" "$mp" 2>>"$LOG"; then
            record_fail f "cp --reflink=always ($fst loop)" ms "mkfs/mount failed: $(tail -n 1 "$LOG")"
            rm -f "$img"; continue
        fi
        MOUNTS+=("$mp")
        cp "$DENSE" "$mp/base.raw" && sync
        bench f "cp --reflink=always ($fst loop, +fsync)" 0 "rm -f $mp/clone; sync" \
            "cp --reflink=always $mp/base.raw $mp/clone && sync $mp/clone"
        if [[ -n $OURS_CLONE ]]; then
            bench f "$OURS_NAME clone ($fst loop)" 0 "rm -f $mp/oclone; sync" \
                "$(subst "$OURS_CLONE" base="$mp/base.raw" clone="$mp/oclone")"
        fi
        umount "$mp"
        rm -f "$img"
    done
    if [[ -n $OURS_CLONE ]]; then
        bench f "$OURS_NAME clone (workdir fs)" 0 "rm -f $OUT/oclone" \
            "$(subst "$OURS_CLONE" base="$DENSE" clone="$OUT/oclone")"
    fi
fi

# ---------------------------------------------------------------- report
echo "## Peer baseline — $(date -u +%Y-%m-%dT%H:%MZ), $(hostname), script run time $((SECONDS - T_START)) s"
echo
cat "$FACTS"
echo
echo "| sec | test | median | min | max | unit | note |"
echo "|---|---|---:|---:|---:|---|---|"
awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $4, $5, $6, $3, $7 }' "$RES"
if [[ -n $OUT_TSV ]]; then cp "$RES" "$OUT_TSV"; fi
log "done in $((SECONDS - T_START)) s; log: $LOG"
