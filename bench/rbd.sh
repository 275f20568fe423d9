#!/usr/bin/env bash
# bench/rbd.sh — a Ceph RBD primary store against the directory store and
# the Ceph tools, in the same run, on a one-node cluster
# (deploy/ceph/bootstrap.sh) and a `stowage dev` built with -tags
# ceph,pacific, all on loopback:
#   - a volume from a template cached in the pool (an RBD clone of its
#     protected snapshot, `volume create --strategy clone`) against a volume
#     from the same template cached on the directory store (a qcow2 linked
#     clone, `--strategy linked`): exec of `stowage volume create ... --wait`
#     to its exit, p50 and p99 of API_N creates each, interleaved; `rbd
#     clone` of the same snapshot by hand beside them;
#   - a template imported into the pool (the first volume from a newly
#     registered template: the agent reads the qcow2 and writes it into an
#     NBD export of a new RBD image, sparse, then the clone) against
#     `qemu-img convert -f qcow2 -O raw TEMPLATE rbd:POOL/IMG` (+ the same
#     clone by hand), RUNS times each; every import is compared with the
#     template by `qemu-img compare`.
# The template: a qcow2 of TEMPLATE_MIB virtual MiB with DATA_MIB of random
# data in 1 MiB extents. Writes bench/results/rbd-<time>.md/.png/.tsv
# through bench/cmd/benchreport.
# Env: API_N=100, RUNS=3, TEMPLATE_MIB=1024, DATA_MIB=256, STOWAGE_BIN (built
#      with -tags ceph,pacific from this tree when unset),
#      WORKDIR=/tmp/stowage-bench/rbd (wiped), OUTDIR=bench/results
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
API_N=${API_N:-100}
RUNS=${RUNS:-3}
TEMPLATE_MIB=${TEMPLATE_MIB:-1024}
DATA_MIB=${DATA_MIB:-256}
W=${WORKDIR:-/tmp/stowage-bench/rbd}
OUTDIR=${OUTDIR:-bench/results}
[[ $(id -u) -eq 0 ]] || { echo "rbd.sh: run as root (the dev agent's FUSE template mount)" >&2; exit 1; }
for b in ceph-mon rbd qemu-img qemu-storage-daemon jq; do command -v $b >/dev/null || { echo "rbd.sh: needs $b (scripts/test.sh installs the packages)" >&2; exit 1; }; done
[[ $W == /tmp/* ]] || { echo "rbd.sh: WORKDIR must be under /tmp" >&2; exit 1; }
LOGTAG=rbd
# shellcheck source=bench/lib.sh
source bench/lib.sh
rm -rf "$W"
mkdir -p "$W" "$OUTDIR"
LOGF=$W.log
: >"$LOGF"
BIN=${STOWAGE_BIN:-$W/stowage}
if [[ -z ${STOWAGE_BIN:-} ]]; then
    log "building stowage with -tags ceph,pacific"
    go build -tags ceph,pacific -o "$BIN" ./cmd/stowage
fi
go build -o "$W/benchreport" ./bench/cmd/benchreport

CEPH=$W/ceph
DEVPID=
cleanup() {
    [[ -n $DEVPID ]] && stop "$DEVPID"
    mountpoint -q "$W/data/templates" 2>/dev/null && umount "$W/data/templates"
    # qemu-storage-daemons of exports still granted outlive their agent
    # by design: quit those this run's agent started.
    find "$W/data" -name '*.qmp' -type s 2>/dev/null | while read -r q; do
        timeout 5 python3 -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b"{\"execute\":\"qmp_capabilities\"}{\"execute\":\"quit\"}"); s.recv(4096)' "$q" >/dev/null 2>&1 || true
    done
    deploy/ceph/bootstrap.sh down --dir "$CEPH" >/dev/null 2>&1 || true
    rm -rf "$W"
}
trap cleanup EXIT

log "one-node Ceph cluster"
deploy/ceph/bootstrap.sh up --dir "$CEPH" --size 12G >>"$LOGF" 2>&1
KEYRING=$(deploy/ceph/bootstrap.sh user stowage-bench stowage --dir "$CEPH" 2>>"$LOGF" | tail -n 1)
export CEPH_CONF=$CEPH/ceph.conf
MON=$(sed -n 's/^mon host = .*v1:\([0-9.:]*\)\].*/\1/p' "$CEPH_CONF")
[[ -n $MON ]] || { log "no v1 monitor address in $CEPH_CONF"; exit 1; }
rbdc() { rbd --id stowage-bench --keyring "$KEYRING" "$@"; }

P1=$(freeport) P2=$(freeport) P3=$(freeport)
export STOWAGE_CONFIG=$W/client.json
"$BIN" dev --data "$W/data" --listen "127.0.0.1:$P1" --agent-listen "127.0.0.1:$P2" --nbd-listen "127.0.0.1:$P3" \
    --client-config "$STOWAGE_CONFIG" >>"$LOGF" 2>&1 &
DEVPID=$!
BG_PIDS+=("$DEVPID")
for ((i = 0; i < 600; i++)); do
    [[ -f $STOWAGE_CONFIG ]] && "$BIN" host list 2>/dev/null | grep -q ' Up ' && break
    kill -0 "$DEVPID" 2>/dev/null || { log "stowage dev died: $(tail -n 3 "$LOGF")"; exit 1; }
    sleep 0.1
done
ZONE=$("$BIN" store get primary -o json | jq -r '.store.scope.zone // .scope.zone')
"$BIN" store add --name ceph1 --role primary --provider rbd --url "rbd://stowage?mon_host=$MON&id=stowage-bench" \
    --scope "$ZONE" --details "keyring=$KEYRING" >>"$LOGF"

log "template: qcow2, $TEMPLATE_MIB MiB virtual, $DATA_MIB MiB of data"
mkdir -p "$W/data/import"
IMG=$W/data/import/base.qcow2
RAW=$W/base.raw
truncate -s "${TEMPLATE_MIB}M" "$RAW"
step=$((TEMPLATE_MIB / DATA_MIB))
for ((i = 0; i < DATA_MIB; i++)); do
    head -c 1M /dev/urandom | dd of="$RAW" bs=1M seek=$((i * step)) conv=notrunc status=none
done
qemu-img convert -f raw -O qcow2 "$RAW" "$IMG"

TSV=$W/rbd.tsv
: >"$TSV"
ms() { awk -v us=$(($2 - $1)) 'BEGIN { printf "%.3f", us / 1000 }'; }
row() { # row NAME UNIT VALUES... (note in NOTE)
    local name=$1 unit=$2
    shift 2
    printf 'k\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$unit" "$(pct 50 "$@")" "$(stats "$@" | cut -f2)" "$(stats "$@" | cut -f3)" "$NOTE" >>"$TSV"
}
prow() { # prow NAME P VALUES...: the P-th percentile as the median column
    local name=$1 p=$2
    shift 2
    printf 'k\t%s\tms\t%s\t%s\t%s\t%s\n' "$name" "$(pct "$p" "$@")" "$(stats "$@" | cut -f2)" "$(stats "$@" | cut -f3)" "$NOTE" >>"$TSV"
}

# Imports: a new template each run (so each is imported anew), its first
# volume on ceph1; the peer converts the same qcow2 into a new image.
IMPORT=() PEER=()
for ((r = 1; r <= RUNS; r++)); do
    "$BIN" template register --name "t$r" --format qcow2 --url "file://$IMG" --wait >>"$LOGF"
    sync; echo 3 >/proc/sys/vm/drop_caches
    t0=$(now_us)
    "$BIN" volume create --name "first$r" --template "t$r" --store ceph1 --strategy clone --wait -o json >"$W/first.json"
    t1=$(now_us)
    IMPORT+=("$(ms "$t0" "$t1")")
    qemu-img compare -q -f qcow2 -F raw "$IMG" "rbd:stowage/$(jq -r '.volume.installPath' "$W/first.json"):id=stowage-bench:keyring=$KEYRING" ||
        { log "run $r: the volume differs from the template"; exit 1; }
    sync; echo 3 >/proc/sys/vm/drop_caches
    t0=$(now_us)
    qemu-img convert -f qcow2 -O raw "$IMG" "rbd:stowage/peer$r:id=stowage-bench:keyring=$KEYRING"
    rbdc snap create "stowage/peer$r@base" >/dev/null 2>&1 && rbdc snap protect "stowage/peer$r@base" &&
        rbdc clone "stowage/peer$r@base" "stowage/peerclone$r"
    t1=$(now_us)
    PEER+=("$(ms "$t0" "$t1")")
    log "import run $r: stowage ${IMPORT[-1]} ms, qemu-img convert ${PEER[-1]} ms"
done
NOTE="$TEMPLATE_MIB MiB virtual qcow2, $DATA_MIB MiB of data; exec to exit, cold page cache, $RUNS runs"
row "stowage: template import into the pool + first volume (volume create --strategy clone)" ms "${IMPORT[@]}"
row "qemu-img convert -O raw -> rbd: + rbd snap create/protect + rbd clone" ms "${PEER[@]}"

# Clones: the template is cached on both stores now (t1 on ceph1 above; a
# first linked create caches it on the directory store).
"$BIN" volume create --name warm --template t1 --store primary --strategy linked --wait >>"$LOGF"
CL=() LK=() RB=()
for ((i = 0; i < API_N; i++)); do
    t0=$(now_us)
    "$BIN" volume create --name "c$i" --template t1 --store ceph1 --strategy clone --wait >>"$LOGF"
    t1=$(now_us)
    "$BIN" volume create --name "l$i" --template t1 --store primary --strategy linked --wait >>"$LOGF"
    t2=$(now_us)
    rbdc clone "stowage/peer1@base" "stowage/byhand$i"
    t3=$(now_us)
    CL+=("$(ms "$t0" "$t1")") LK+=("$(ms "$t1" "$t2")") RB+=("$(ms "$t2" "$t3")")
done
for p in 50 99; do
    NOTE="exec to exit (CLI --wait: TLS, the API call, the job to Ready), $API_N runs, interleaved"
    prow "stowage rbd clone (volume create --strategy clone, rbd store), p$p" $p "${CL[@]}"
    prow "directory store linked clone (stowage volume create --strategy linked, qcow2 overlay), p$p" $p "${LK[@]}"
    NOTE="exec of rbd clone to its exit (no API, no records), $API_N runs, interleaved"
    prow "rbd clone by hand (rbd CLI), p$p" $p "${RB[@]}"
done
log "clones: rbd p50 $(pct 50 "${CL[@]}") ms p99 $(pct 99 "${CL[@]}") ms; linked p50 $(pct 50 "${LK[@]}") ms p99 $(pct 99 "${LK[@]}") ms; rbd CLI p50 $(pct 50 "${RB[@]}") ms"
[[ $(rbdc info "stowage/$(jq -r '.volume.installPath' <("$BIN" volume get c0 -o json))" | grep -c parent) == 1 ]] ||
    { log "volume c0 is not an RBD clone"; exit 1; }

STAMP=$(date -u +%Y%m%dT%H%MZ)
cp "$TSV" "$OUTDIR/rbd-$STAMP.tsv"
"$W/benchreport" -title "Ceph RBD primary store (one-node cluster on loopback)" \
    -cmd "sudo bash bench/rbd.sh (API_N=$API_N RUNS=$RUNS TEMPLATE_MIB=$TEMPLATE_MIB DATA_MIB=$DATA_MIB)" \
    -md "$OUTDIR/rbd-$STAMP.md" -png "$OUTDIR/rbd-$STAMP.png" -tsv "$OUTDIR/rbd-$STAMP.tsv"
log "wrote $OUTDIR/rbd-$STAMP.md"
cat "$TSV"
