#!/usr/bin/env bash
# bench/scale.sh — section s: one real controller (`stowage controller`,
# built from ./cmd/stowage) with 1,000 simulated agents (bench/cmd/agentsim:
# real enrolment with join tokens and mTLS, registration and heartbeats at
# the real 10 s interval, tasks answered from an in-memory model; no
# hypervisor work) over metadata seeded with 100,000 volumes, 20,000
# snapshots and 200 stores (bench/cmd/scaleseed, batched transactions
# through controller/meta), on Badger and, when /usr/bin/etcd exists, on a
# one-member etcd on loopback. Figures (TSV rows, benchreport's format):
#   transitions/s     meta, in process, 8 concurrent writers (controller stopped)
#   heartbeats        steady (1,000 hosts every 10 s): beats/s, p50/p99 latency,
#                     controller CPU (ms of CPU per s = % of one core x 10) and RSS;
#                     saturation (64 senders back to back, bounded): beats/s, p99
#   lists             ListVolumes first page (500) and a filtered page, p50/p99
#   plan              dry-run CreateVolume (store and host choice), p50/p99, through
#                     the API under load, and in process after the run (scaleseed -plans)
#   size              metadata on disk (Badger directory; etcd's db file)
#
#   bash bench/scale.sh                     # full: about 10 minutes per backend
#   SMOKE=1 bash bench/scale.sh             # tiny (20 hosts at 1 s, 2,000 volumes): about a minute
#   SCALE_BACKENDS=badger bash bench/scale.sh
# Env: BIN (stowage binary; built if unset), OUT_TSV (default
#      bench/results/scale-<stamp>.tsv, with .md and .png beside it unless
#      OUT_TSV is given), WORKDIR (default /tmp/stowage-bench/scale, wiped),
#      SCALE_HOSTS, SCALE_VOLUMES, SCALE_SNAPSHOTS, SCALE_STORES,
#      SCALE_STEADY (60s), SCALE_SATURATE (20s), SCALE_API_N (200),
#      SCALE_TRANSITIONS (20000), SCALE_INTERVAL (10s)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SMOKE=${SMOKE:-0}
if [[ $SMOKE == 1 ]]; then
    : "${SCALE_HOSTS:=20}" "${SCALE_VOLUMES:=2000}" "${SCALE_SNAPSHOTS:=400}" "${SCALE_STORES:=20}"
    : "${SCALE_STEADY:=3s}" "${SCALE_SATURATE:=2s}" "${SCALE_API_N:=20}" "${SCALE_TRANSITIONS:=1000}" "${SCALE_INTERVAL:=1s}"
fi
HOSTS=${SCALE_HOSTS:-1000} VOLUMES=${SCALE_VOLUMES:-100000} SNAPSHOTS=${SCALE_SNAPSHOTS:-20000}
STORES=${SCALE_STORES:-200} ZONES=10
STEADY=${SCALE_STEADY:-60s} SATURATE=${SCALE_SATURATE:-20s} API_N=${SCALE_API_N:-200}
TRANSITIONS=${SCALE_TRANSITIONS:-20000} INTERVAL=${SCALE_INTERVAL:-10s}
BACKENDS=${SCALE_BACKENDS:-badger etcd}
W=${WORKDIR:-/tmp/stowage-bench/scale}
[[ $W == /tmp/* ]] || { echo "scale.sh: WORKDIR must be under /tmp" >&2; exit 1; }
STAMP=$(date -u +%Y%m%dT%H%MZ)
[[ $SMOKE == 1 ]] && STAMP=smoke-$STAMP
REPORT=0
if [[ -z ${OUT_TSV:-} ]]; then
    OUT_TSV=$REPO/bench/results/scale-$STAMP.tsv
    REPORT=1
fi
LOGTAG=scale
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh"
LOGF=$W.log
: >"$LOGF"
cleanup() { stop_all; rm -rf "$W"; }
rm -rf "$W"
mkdir -p "$W"
trap cleanup EXIT

export GOFLAGS="${GOFLAGS:+$GOFLAGS }-buildvcs=false"
if [[ -z ${BIN:-} ]]; then
    log "building stowage"
    BIN=$W/stowage
    (cd "$REPO" && go build -o "$BIN" ./cmd/stowage)
fi
(cd "$REPO" && go build -o "$W/agentsim" ./bench/cmd/agentsim && go build -o "$W/scaleseed" ./bench/cmd/scaleseed)

# row NAME UNIT VALUE NOTE: one figure (median = min = max = VALUE)
row() { printf 's\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$3" "$3" "$4" >>"$OUT_TSV"; log "$1: $3 $2 ($4)"; }
: >"$OUT_TSV"

run_backend() {
    local b=$1 spec etcd_pid= edir= batch=100 port cpid sim=$W/$b/sim.tsv size
    mkdir -p "$W/$b"
    # METADATA: the one place the metadata location is chosen; the seeder
    # and the controller both take it as one string (meta.Open's spec,
    # `stowage controller --metadata`).
    case $b in
    badger) spec=$W/$b/meta ;;
    etcd)
        local cport pport
        cport=$(freeport) pport=$(freeport)
        edir=$W/$b/etcd
        bg /usr/bin/etcd --name scale --data-dir "$edir" --listen-client-urls "http://127.0.0.1:$cport" \
            --advertise-client-urls "http://127.0.0.1:$cport" --listen-peer-urls "http://127.0.0.1:$pport" \
            --initial-advertise-peer-urls "http://127.0.0.1:$pport" --initial-cluster "scale=http://127.0.0.1:$pport" \
            --quota-backend-bytes $((8 << 30))
        etcd_pid=$BG
        spec=etcd://127.0.0.1:$cport/stowage-scale
        batch=10 # --max-txn-ops 128: a volume and its transitions write ~5 keys
        local i
        for ((i = 0; i < 100; i++)); do
            curl -sf "http://127.0.0.1:$cport/health" >/dev/null 2>&1 && break
            sleep 0.1
        done
        ;;
    esac
    local t0=$SECONDS
    log "$b: seeding $STORES stores, $VOLUMES volumes, $SNAPSHOTS snapshots"
    "$W/scaleseed" -metadata "$spec" -stores "$STORES" -volumes "$VOLUMES" -snapshots "$SNAPSHOTS" -hosts "$HOSTS" -zones "$ZONES" -batch "$batch" >"$W/$b/seed.tsv" 2>>"$LOGF"
    row "stowage: seed $VOLUMES volumes, $SNAPSHOTS snapshots, $STORES stores [$b]" s "$((SECONDS - t0))" "scaleseed, $batch records per transaction"
    local r rates=()
    for r in 1 2 3; do
        "$W/scaleseed" -metadata "$spec" -transitions "$TRANSITIONS" -writers 8 >"$W/$b/tr.tsv" 2>>"$LOGF"
        rates+=("$(cut -f5 "$W/$b/tr.tsv")")
    done
    printf 's\t%s\t%s\t%s\t%s\n' "stowage: state transitions [$b]" transitions/s "$(stats "${rates[@]}")" \
        "median of 3 runs of $TRANSITIONS volume transitions, 8 writers, each its own transaction, in process" >>"$OUT_TSV"
    log "$b: transitions/s ${rates[*]}"
    [[ $b == badger ]] && row "target: 5000 transitions/s [$b]" transitions/s 5000 "issue 16 (on Badger)"

    port=$(freeport)
    bg "$BIN" controller --data-dir "$W/$b/data" --metadata "$spec" --listen "127.0.0.1:$port" \
        --heartbeat-interval "$INTERVAL" --host-timeout 60s --orphan-interval 0 --job-retention 0 --log-level warn
    cpid=$BG
    local i ok=0
    for ((i = 0; i < 600; i++)); do
        [[ -f $W/$b/data/admin.token ]] && curl -skf "https://127.0.0.1:$port/healthz" >/dev/null 2>&1 && { ok=1; break; }
        kill -0 "$cpid" 2>/dev/null || break
        sleep 0.1
    done
    if [[ $ok != 1 ]]; then
        emit_fail s "stowage: controller [$b]" s "did not come up: $(tail -n 1 "$LOGF")"
        stop "$cpid"; [[ -n $etcd_pid ]] && stop "$etcd_pid"
        return 0
    fi
    row "stowage: controller RSS at start [$b]" MiB "$(awk '/^VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$cpid/status")" "metadata seeded, no host yet"
    log "$b: $HOSTS simulated agents"
    if ! "$W/agentsim" -controller "https://127.0.0.1:$port" -controller-data-dir "$W/$b/data" -state-dir "$W/$b/sim" \
        -hosts "$HOSTS" -zones "$ZONES" -controller-pid "$cpid" -steady "$STEADY" -saturate "$SATURATE" -api-n "$API_N" >"$sim" 2>>"$LOGF"; then
        emit_fail s "stowage: agentsim [$b]" s "$(tail -n 1 "$LOGF")"
    fi
    # agentsim rows: name unit count value p50 p99 max note
    while IFS=$'\t' read -r name unit n value p50 p99 mx note; do
        case $name in
        join_register) row "stowage: $HOSTS hosts enrol + register [$b]" s "$value" "$note" ;;
        heartbeat_steady)
            row "stowage: heartbeats, steady [$b]" beats/s "$value" "$n beats; $note"
            row "stowage: heartbeat p50, steady [$b]" ms "$p50" "$note"
            row "stowage: heartbeat p99, steady [$b]" ms "$p99" "$note; max $mx ms" ;;
        heartbeat_saturation)
            row "stowage: heartbeats, saturation [$b]" beats/s "$value" "$n beats; $note"
            row "stowage: heartbeat p99, saturation [$b]" ms "$p99" "p50 $p50 ms; $note" ;;
        controller_cpu_steady) row "stowage: controller CPU ms per s, steady [$b]" ms "$(awk -v v="$value" 'BEGIN { printf "%.2f", v * 10 }')" "ms of CPU per second = $value% of one core; $note" ;;
        controller_rss_steady) row "stowage: controller RSS, steady [$b]" MiB "$value" "$HOSTS hosts" ;;
        controller_rss_saturation) row "stowage: controller RSS, saturation [$b]" MiB "$value" "" ;;
        list_volumes_first_page | list_volumes_filtered | list_volumes_by_name | plan_create_dry_run)
            local label=${name//_/ }
            row "stowage: $label p50 [$b]" ms "$p50" "$n calls; $note"
            row "stowage: $label p99 [$b]" ms "$p99" "$n calls; max $mx ms; $note" ;;
        esac
    done <"$sim"
    stop "$cpid"
    # The same plans in process, among the hosts the run left registered.
    local pl
    if pl=$("$W/scaleseed" -metadata "$spec" -plans "$API_N" -zones "$ZONES" 2>>"$LOGF"); then
        row "stowage: plan in process p50 [$b]" ms "$(cut -f4 <<<"$pl")" "$(cut -f3 <<<"$pl") dry-run creates among $(cut -f2 <<<"$pl") Up hosts, the controller's services in one process, no TLS/API, no other load"
        row "stowage: plan in process p99 [$b]" ms "$(cut -f5 <<<"$pl")" "max $(cut -f6 <<<"$pl") ms; the same"
    else
        emit_fail s "stowage: plan in process [$b]" ms "$(tail -n 1 "$LOGF")"
    fi
    if [[ $b == badger ]]; then
        size=$(du -sm "$spec" | cut -f1)
        row "stowage: metadata on disk [$b]" MiB "$size" "the Badger directory after the run"
    else
        size=$(du -sm "$edir/member/snap/db" | cut -f1)
        row "stowage: metadata on disk [$b]" MiB "$size" "etcd's db file after the run (not compacted)"
        stop "$etcd_pid"
    fi
}

for b in $BACKENDS; do
    if [[ $b == etcd && ! -x /usr/bin/etcd ]]; then
        log "no /usr/bin/etcd: the etcd column is skipped"
        continue
    fi
    run_backend "$b"
done

if [[ $REPORT == 1 ]]; then
    md=${OUT_TSV%.tsv}.md
    {
        echo "- kernel: $(uname -r); cpu: $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), $(nproc) cores"
        echo "- stowage: $(cd "$REPO" && git log -1 --format='%h %s' 2>/dev/null || echo unknown)"
        echo "- load average at the end: $(cut -d' ' -f1-3 /proc/loadavg) (other work shares this machine)"
        echo "- hosts $HOSTS at $INTERVAL, volumes $VOLUMES, snapshots $SNAPSHOTS, stores $STORES; steady $STEADY, saturation $SATURATE, API calls $API_N each"
    } >"$W/facts.md"
    cmd="bash bench/scale.sh"
    [[ $SMOKE == 1 ]] && cmd="SMOKE=1 bash bench/scale.sh"
    (cd "$REPO" && go run ./bench/cmd/benchreport -title "Scale benchmark" -tsv "$OUT_TSV" -md "$md" \
        -png "${OUT_TSV%.tsv}.png" -cmd "$cmd" -facts "$W/facts.md")
    log "report: $md"
fi
