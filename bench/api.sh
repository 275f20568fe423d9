#!/usr/bin/env bash
# bench/api.sh — section l: end-to-end API latencies through the CLI, on a
# `stowage dev` (controller, one agent, its FUSE template mount, a directory
# primary and image store) on loopback ports of its own. Each figure is
# from exec of `stowage ... --wait` to its exit (what a user or a script
# waits for: process start, TLS, the API call, the job to its end), p50 and
# p99 over API_N operations; the same operations' job created -> updated
# times (the controller's own view) are reported beside them.
#   create linked clone   volume create --strategy linked (qcow2 overlay)
#   create lazy volume    volume create --strategy lazy (overlay on the mount)
#   create full copy      volume create --strategy full
#   snapshot              snapshot take
#   revert                snapshot revert (of the snapshot just taken)
# Peers, the same operation by hand with the same data: `qemu-img create -b`
# + sync for a linked clone, `qemu-img convert` + sync for a full copy.
# The template: a 1 GiB-virtual qcow2 with 16 MiB of data, registered from
# a file:// URL.
# Migration between two agents is bench/migrate.sh (section g).
# Run by bench/run.sh. Env: BIN, OUT_TSV, API_N=100 (creates of each kind),
#      API_SNAP_N=20 (snapshots of one volume, and reverts),
#      WORKDIR=/tmp/stowage-bench/api (wiped)
set -euo pipefail
BIN=${BIN:?BIN must name the stowage binary}
OUT_TSV=${OUT_TSV:?OUT_TSV is required}
API_N=${API_N:-100}
API_SNAP_N=${API_SNAP_N:-$((API_N < 20 ? API_N : 20))}
W=${WORKDIR:-/tmp/stowage-bench/api}
[[ $(id -u) -eq 0 ]] || { echo "api.sh: run as root (FUSE template mount)" >&2; exit 1; }
[[ $W == /tmp/* ]] || { echo "api.sh: WORKDIR must be under /tmp" >&2; exit 1; }
LOGTAG=api
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
LOGF=$W.log
: >"$LOGF"
DEVPID=
cleanup() {
    [[ -n $DEVPID ]] && stop "$DEVPID"
    mountpoint -q "$W/data/templates" 2>/dev/null && umount "$W/data/templates"
    rm -rf "$W"
}
rm -rf "$W"
mkdir -p "$W"
trap cleanup EXIT

P1=$(freeport) P2=$(freeport)
export STOWAGE_CONFIG=$W/client.json
"$BIN" dev --data "$W/data" --listen "127.0.0.1:$P1" --agent-listen "127.0.0.1:$P2" --nbd-listen "" \
    --client-config "$STOWAGE_CONFIG" >>"$LOGF" 2>&1 &
DEVPID=$!
BG_PIDS+=("$DEVPID")
ok=0
for ((i = 0; i < 600; i++)); do
    if [[ -f $STOWAGE_CONFIG ]] && "$BIN" host list 2>/dev/null | grep -q ' Up '; then ok=1; break; fi
    kill -0 "$DEVPID" 2>/dev/null || break
    sleep 0.1
done
if [[ $ok != 1 ]]; then
    emit_fail l "stowage dev" ms "stowage dev did not come up: $(tail -n 1 "$LOGF")"
    exit 0
fi
mountpoint -q "$W/data/templates" || log "warning: no template mount (lazy volumes off)"

IMG=$W/data/import/base.qcow2
mkdir -p "$W/data/import"
qemu-img create -q -f qcow2 "$IMG" 1G
qemu-io -f qcow2 -c "write -P 0x33 0 8M" -c "write -P 0x44 512M 8M" "$IMG" >/dev/null
if ! "$BIN" template register --name base --format qcow2 --url "file://$IMG" --wait -o json >"$W/t.json" 2>>"$LOGF"; then
    emit_fail l "template register" ms "$(tail -n 1 "$LOGF")"
    exit 0
fi
TPATH=$(find "$W/data/images" -name '*.qcow2' | head -n 1)

ms_between() { # ms_between RFC3339 RFC3339
    local a b
    a=$(date -d "$1" +%s.%N) b=$(date -d "$2" +%s.%N)
    awk -v a="$a" -v b="$b" 'BEGIN { printf "%.3f", (b - a) * 1000 }'
}
# op NAME CMD...: API_N runs of CMD (-o json, --wait), exec to exit and job times
op() {
    local name=$1 i t0 t1 out
    shift
    local cli=() job=()
    for ((i = 0; i < API_N; i++)); do
        t0=$(now_us)
        if ! out=$(eval "$* --wait -o json" 2>>"$LOGF"); then
            emit_fail l "stowage CLI: $name, p50" ms "$(tail -n 1 "$LOGF")"
            return 1
        fi
        t1=$(now_us)
        if [[ $(jq -r '.job.state' <<<"$out") != JOB_STATE_SUCCEEDED ]]; then
            emit_fail l "stowage CLI: $name, p50" ms "job $(jq -r '.job.state' <<<"$out")"
            return 1
        fi
        LAST=$out
        cli+=("$(awk -v us=$((t1 - t0)) 'BEGIN { printf "%.3f", us / 1000 }')")
        job+=("$(ms_between "$(jq -r '.job.createdAt' <<<"$out")" "$(jq -r '.job.updatedAt' <<<"$out")")")
    done
    local note="exec of the CLI (--wait) to its exit, $API_N runs"
    printf 'l\t%s\tms\t%s\t%s\t%s\t%s\n' "stowage CLI: $name, p50" "$(pct 50 "${cli[@]}")" "$(stats "${cli[@]}" | cut -f2)" "$(stats "${cli[@]}" | cut -f3)" "$note" >>"$OUT_TSV"
    printf 'l\t%s\tms\t%s\t%s\t%s\t%s\n' "stowage CLI: $name, p99" "$(pct 99 "${cli[@]}")" "$(stats "${cli[@]}" | cut -f2)" "$(stats "${cli[@]}" | cut -f3)" "$note" >>"$OUT_TSV"
    printf 'l\t%s\tms\t%s\t%s\t%s\t%s\n' "job created -> updated (controller): $name p50 / p99" "$(pct 50 "${job[@]}")" "$(stats "${job[@]}" | cut -f2)" "$(pct 99 "${job[@]}")" "median column: p50; max column: p99" >>"$OUT_TSV"
    log "$name: CLI p50 $(pct 50 "${cli[@]}") ms p99 $(pct 99 "${cli[@]}") ms; job p50 $(pct 50 "${job[@]}") ms"
}
# peer NAME PREP CMD: the same operation by hand, p50 and p99 (API_N runs)
peer() {
    local name=$1 prep=$2 cmd=$3 i t0 t1 v=()
    for ((i = 0; i < API_N; i++)); do
        eval "$prep" >>"$LOGF" 2>&1
        t0=$(now_us)
        if ! eval "$cmd" >>"$LOGF" 2>&1; then emit_fail l "$name, p50" ms "$(tail -n 1 "$LOGF")"; return 0; fi
        t1=$(now_us)
        v+=("$(awk -v us=$((t1 - t0)) 'BEGIN { printf "%.3f", us / 1000 }')")
    done
    for p in 50 99; do
        printf 'l\t%s\tms\t%s\t%s\t%s\t%s\n' "$name, p$p" "$(pct $p "${v[@]}")" "$(stats "${v[@]}" | cut -f2)" "$(stats "${v[@]}" | cut -f3)" "$API_N runs, exec to exit" >>"$OUT_TSV"
    done
}

op "create linked clone" '"$BIN" volume create --name "v$(now_us)" --template base --strategy linked' || true
op "create lazy volume" '"$BIN" volume create --name "v$(now_us)" --template base --strategy lazy' || true
op "create full copy" '"$BIN" volume create --name "v$(now_us)" --template base --strategy full' || true
VOL=$(jq -r '.volume.id' <<<"${LAST:-{\}}" 2>/dev/null || true)
if [[ -n $VOL && $VOL != null ]]; then
    API_N=$API_SNAP_N op "snapshot" '"$BIN" snapshot take "$VOL" --name "s$(now_us)"' || true
    SNAP=$(jq -r '.snapshot.id' <<<"$LAST")
    API_N=$API_SNAP_N op "revert" '"$BIN" snapshot revert "$SNAP"' || true
fi
PD=$W/peer
mkdir -p "$PD"
if [[ -n $TPATH ]]; then
    peer "qemu-img create -f qcow2 -b (+ sync): linked clone" "rm -f $PD/c.qcow2" \
        "qemu-img create -q -f qcow2 -b $TPATH -F qcow2 $PD/c.qcow2 && sync $PD/c.qcow2"
    peer "qemu-img convert -O raw (+ sync): full copy" "rm -f $PD/f.raw" \
        "qemu-img convert -f qcow2 -O raw $TPATH $PD/f.raw && sync $PD/f.raw"
fi
log "done"
