#!/usr/bin/env bash
# bench/run.sh — Stowage's one benchmark command (as root). One invocation
# runs every section against its peers in the same run and writes one table
# and one PNG, every row as a ratio to its peer:
#
#   bash bench/run.sh              # SIZE_MIB=1024 RUNS=3: about 20 minutes
#   SMOKE=1 bash bench/run.sh      # every section, tiny, 1 run: about a minute (CI)
#
# Sections (SECTIONS=, default all; peers.sh is bench/peers.sh, a vendored
# copy of ../shared/bench/peers.sh):
#   copy   peers.sh b (dense copy, cold and warm source) and c (sparse copy,
#          10% data): stowage copy vs nbdcopy, qemu-img convert (with and
#          without -W -m 8), cp, dd; timed from exec to exit plus `sync`
#   nbd    peers.sh d: `stowage nbd serve` (raw) vs nbdkit and qemu-nbd,
#          read (warm, cold) and write + flush
#   qcow2  bench/qcow2-nbd.sh (q): qcow2 linked clone export read, stowage
#          (its Go qcow2 reader, as the agent serves read-only grants) vs
#          qemu-nbd
#   fuse   bench/fuse.sh (e, h): template cache cold/warm from a local
#          source vs a direct read, from an HTTP source vs curl, first byte
#   real   bench/realimg.sh (r): an ext4 image of real files (bench/fixture.sh)
#          as raw sparse, raw dense and qcow2, copied by stowage and the peers
#   zero   bench/extra.sh x: a zero-filled (allocated) dense image
#   api    bench/api.sh (l): `stowage dev` and the CLI: p50/p99 of create
#          linked / lazy / full, snapshot, revert
#   migrate bench/migrate.sh (g): a volume (10% data) migrated between two
#          agents (separate processes, a store each, NBD over TLS) vs the
#          same bytes by hand: qemu-nbd + nbdcopy, qemu-img convert -W -m 8,
#          over TLS and over plain NBD
#   modes  bench/extra.sh m: stowage's own write/read modes (not default)
#   scale  bench/scale.sh (s): one controller, 1,000 simulated agents, 100,000
#          volumes, on Badger and etcd: heartbeats, CPU/RSS, list and plan
#          p99, transitions/s (not default: about 10 minutes a backend;
#          with SMOKE=1 tiny, about 15 s a backend)
# Output: bench/results/all-<stamp>.md (ratio table, then every row, with
# the machine facts) and .png, plus the raw TSVs. Exit status: 1 when a
# section broke (a script failed, or a row FAILED or failed its check),
# never because of a ratio.
#
# Env: SIZE_MIB=1024 (256..4096; or SIZE_GIB=) RUNS=3 SETTLE=3 FIX_MIB=1024
#      API_N=100 (creates per kind; snapshots and reverts: 20) SECTIONS="copy nbd qcow2 fuse real zero api migrate"
#      STOWAGE_BIN= (use this binary instead of building ./cmd/stowage)
#      PEERS=bench/peers.sh WORKDIR=/tmp/stowage-bench OUTDIR=bench/results
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SMOKE=${SMOKE:-0}
if [[ $SMOKE == 1 ]]; then
    : "${SIZE_MIB:=64}" "${RUNS:=1}" "${SETTLE:=0}" "${FIX_MIB:=128}" "${API_N:=3}"
    export FIX_FILL=${FIX_FILL:-15}
fi
if [[ -n ${SIZE_GIB:-} && -z ${SIZE_MIB:-} ]]; then SIZE_MIB=$((SIZE_GIB * 1024)); fi
export SIZE_MIB=${SIZE_MIB:-1024} RUNS=${RUNS:-3} SETTLE=${SETTLE:-3}
export FIX_MIB=${FIX_MIB:-1024} API_N=${API_N:-100}
SECTIONS=${SECTIONS:-"copy nbd qcow2 fuse real zero api migrate"}
PEERS=${PEERS:-$REPO/bench/peers.sh}
W=${WORKDIR:-/tmp/stowage-bench}
OUTDIR=${OUTDIR:-$REPO/bench/results}
die() { echo "bench/run.sh: $*" >&2; exit 2; }
[[ $(id -u) -eq 0 ]] || die "run as root (drop_caches, mounts, FUSE)"
[[ -f $PEERS ]] || die "$PEERS not found (set PEERS=)"
[[ $W == /tmp/* ]] || die "WORKDIR must be under /tmp (it is wiped)"
if [[ $SMOKE != 1 ]] && ((SIZE_MIB < 256 || SIZE_MIB > 4096)); then
    die "SIZE_MIB=$SIZE_MIB: want 256..4096 (SMOKE=1 for tiny sizes)"
fi
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
log() { printf '[%s] bench: %s\n' "$(date +%T)" "$*" >&2; }
mkdir -p "$W" "$OUTDIR"
STAMP=$(date -u +%Y%m%dT%H%MZ)
[[ $SMOKE == 1 ]] && STAMP=smoke-$STAMP
BASE=$OUTDIR/all-$STAMP
BIN=$W/stowage HTTPBIN=$W/benchhttp
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-buildvcs=false"
if [[ -n ${STOWAGE_BIN:-} ]]; then
    cp "$STOWAGE_BIN" "$BIN"
else
    log "building stowage"
    (cd "$REPO" && go build -o "$BIN" ./cmd/stowage) || die "go build ./cmd/stowage failed"
fi
(cd "$REPO" && go build -o "$HTTPBIN" ./bench/cmd/benchhttp && go build -o "$W/benchreport" ./bench/cmd/benchreport) ||
    die "building the bench tools failed"

FACTS=$W/facts.md
: >"$FACTS"
TSVS=()
BROKEN=()
T0=$SECONDS
# section NAME TSV CMD...: run one section script, keep its TSV
section() {
    local name=$1 tsv=$2 t=$SECONDS
    shift 2
    log "section $name"
    : >"$tsv"
    if ! "$@"; then BROKEN+=("$name (exit status)"); fi
    TSVS+=(-tsv "$tsv")
    log "section $name: $((SECONDS - t)) s"
}

PS=()
want copy && PS+=(b c)
want nbd && PS+=(d)
if ((${#PS[@]})); then
    # peers.sh sizes: SIZE_MIB (our vendored copy's knob)
    section "peers.sh ${PS[*]}" "$BASE.peers.tsv" env OURS_COPY="$BIN copy {src} {dst}" \
        OURS_NBD="$BIN nbd serve --unix {sock} {file}" OURS_NAME=stowage OUT_TSV="$BASE.peers.tsv" \
        SECTIONS="${PS[*]}" WORKDIR="$W/peers" LOG="$W/peers.log" bash "$PEERS" >"$BASE.peers.md"
    awk '/^- /' "$BASE.peers.md" >>"$FACTS"
fi
want qcow2 && section qcow2 "$BASE.qcow2.tsv" env BIN="$BIN" OUT_TSV="$BASE.qcow2.tsv" WORKDIR="$W/qcow2-nbd" bash "$REPO/bench/qcow2-nbd.sh"
want fuse && section fuse "$BASE.fuse.tsv" env BIN="$BIN" HTTPBIN="$HTTPBIN" OUT_TSV="$BASE.fuse.tsv" WORKDIR="$W/fuse" bash "$REPO/bench/fuse.sh"
want real && section real "$BASE.real.tsv" env BIN="$BIN" OUT_TSV="$BASE.real.tsv" WORKDIR="$W/realimg" FACTS="$FACTS" bash "$REPO/bench/realimg.sh"
XS=()
want zero && XS+=(x)
want modes && XS+=(m)
if ((${#XS[@]})); then
    section "extra.sh ${XS[*]}" "$BASE.extra.tsv" env BIN="$BIN" OUT_TSV="$BASE.extra.tsv" XSECTIONS="${XS[*]}" \
        WORKDIR="$W/extra" bash "$REPO/bench/extra.sh"
fi
want api && section api "$BASE.api.tsv" env BIN="$BIN" OUT_TSV="$BASE.api.tsv" WORKDIR="$W/api" bash "$REPO/bench/api.sh"
want migrate && section migrate "$BASE.migrate.tsv" env BIN="$BIN" OUT_TSV="$BASE.migrate.tsv" WORKDIR="$W/migrate" bash "$REPO/bench/migrate.sh"
want scale && section scale "$BASE.scale.tsv" env BIN="$BIN" OUT_TSV="$BASE.scale.tsv" WORKDIR="$W/scale" SMOKE="$SMOKE" bash "$REPO/bench/scale.sh"

if ! grep -q '^- kernel' "$FACTS"; then
    {
        echo "- kernel: $(uname -r)"
        echo "- cpu: $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), $(nproc) cores"
        echo "- memory: $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
    } >>"$FACTS"
fi
{
    echo "- stowage: $(cd "$REPO" && git log -1 --format='%h %s' 2>/dev/null || echo unknown)$(cd "$REPO" && git diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)')"
    echo "- load average at the end: $(cut -d' ' -f1-3 /proc/loadavg) (other work shares this machine)"
    echo "- run time: $((SECONDS - T0)) s; sections: $SECTIONS; SIZE_MIB=$SIZE_MIB RUNS=$RUNS SETTLE=$SETTLE FIX_MIB=$FIX_MIB API_N=$API_N${SMOKE:+ SMOKE=$SMOKE}"
} >>"$FACTS"

# broken rows: FAILED (a command failed) or a failed output check
for ((i = 1; i < ${#TSVS[@]}; i += 2)); do
    while IFS=$'\t' read -r sec name _; do BROKEN+=("$sec | $name"); done < <(grep -E 'FAILED' "${TSVS[i]}" || true)
done
cmd="SIZE_MIB=$SIZE_MIB RUNS=$RUNS SECTIONS='$SECTIONS' bash bench/run.sh"
[[ $SMOKE == 1 ]] && cmd="SMOKE=1 bash bench/run.sh"
"$W/benchreport" "${TSVS[@]}" -facts "$FACTS" -title "Stowage benchmark (bench/run.sh)" -cmd "$cmd" \
    -md "$BASE.md" -png "$BASE.png" || BROKEN+=("benchreport")
cat "$BASE.md"
log "wrote $BASE.md and .png in $((SECONDS - T0)) s"
if ((${#BROKEN[@]})); then
    log "BROKEN (${#BROKEN[@]}):"
    printf '  %s\n' "${BROKEN[@]}" >&2
    exit 1
fi
