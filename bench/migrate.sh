#!/usr/bin/env bash
# bench/migrate.sh — section g: a volume migrated between two agents, each
# with a directory primary store only it reaches, against moving the same
# bytes between two hosts over NBD by hand. The controller and agent h1 are
# a `stowage dev`; agent h2 is a separate `stowage agent` process that
# joins it with a join token. The volume is raw, SIZE_MIB of virtual size
# with 10% of it data (random 1 MiB extents, every tenth MiB), the source
# cold (page cache dropped) before every run.
#   stowage volume migrate --wait   exec of the CLI to its exit: the API
#                                   call, the plan, h2 reading h1's NBD
#                                   export of the volume over TLS
#                                   (--nbd-tls require: what agents do off
#                                   loopback), writing and syncing
#                                   its copy, the records, the source's
#                                   delete. Runs alternate h1 -> h2 and
#                                   h2 -> h1.
# Peers: qemu-nbd exports the same file read-only (started untimed), then
# the "other host" copies it: nbdcopy, and qemu-img convert -W -m 8 (both
# sparse: they read the export's allocation map), + sync; once over plain
# NBD, once over TLS with client certificates (like ours).
# The rows are MiB/s of the virtual size. Both agents' NBD servers must
# refuse a plaintext client (nbdinfo, the server's message in libnbd's
# debug output) or the section FAILS. After the runs the volume's bytes
# are compared with the fixture (cmp): a difference FAILS the row.
# Run by bench/run.sh. Env: BIN, OUT_TSV, SIZE_MIB, RUNS, SETTLE,
#      WORKDIR=/tmp/stowage-bench/migrate (wiped)
set -euo pipefail
BIN=${BIN:?BIN must name the stowage binary}
OUT_TSV=${OUT_TSV:?OUT_TSV is required}
SIZE_MIB=${SIZE_MIB:-1024}
RUNS=${RUNS:-3}
W=${WORKDIR:-/tmp/stowage-bench/migrate}
[[ $(id -u) -eq 0 ]] || { echo "migrate.sh: run as root (drop_caches, the dev agent's FUSE mount)" >&2; exit 1; }
[[ $W == /tmp/* ]] || { echo "migrate.sh: WORKDIR must be under /tmp" >&2; exit 1; }
for b in qemu-nbd nbdcopy nbdinfo qemu-img jq cmp openssl; do
    command -v $b >/dev/null || { echo "migrate.sh: needs $b" >&2; exit 1; }
done
LOGTAG=migrate
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
LOGF=$W.log
: >"$LOGF"
cleanup() {
    stop_all
    mountpoint -q "$W/dev/templates" 2>/dev/null && umount "$W/dev/templates"
    rm -rf "$W"
}
rm -rf "$W"
mkdir -p "$W"
trap cleanup EXIT
SIZE=$((SIZE_MIB << 20))

P1=$(freeport) P2=$(freeport) N1=$(freeport) P3=$(freeport) N2=$(freeport)
export STOWAGE_CONFIG=$W/client.json
bg "$BIN" dev --data "$W/dev" --host-id h1 --listen "127.0.0.1:$P1" --agent-listen "127.0.0.1:$P2" \
    --nbd-listen "127.0.0.1:$N1" --nbd-tls require --client-config "$STOWAGE_CONFIG"
DEV=$BG
# up HOST: wait until the controller lists HOST Up
up() {
    local i
    for ((i = 0; i < 600; i++)); do
        [[ -f $STOWAGE_CONFIG ]] && "$BIN" host get "$1" -o json 2>/dev/null | jq -e '.state == "HOST_STATE_UP"' >/dev/null && return 0
        kill -0 "$DEV" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}
if ! up h1; then
    emit_fail g "stowage dev" MiB/s "stowage dev did not come up: $(tail -n 1 "$LOGF")"
    exit 0
fi
"$BIN" host token create --host h2 --ttl 10m -o json >"$W/join.json" 2>>"$LOGF"
mkdir -p "$W/h2"
bg "$BIN" agent --controller "https://127.0.0.1:$P1" --host-id h2 --listen "127.0.0.1:$P3" --nbd-listen "127.0.0.1:$N2" --nbd-tls require \
    --state-dir "$W/h2/state" --store-roots "$W/h2" \
    --join-token "$(jq -r .token "$W/join.json")" --ca-pin "$(jq -r .caPin "$W/join.json")"
if ! up h2; then
    emit_fail g "agent h2" MiB/s "agent h2 did not come up: $(tail -n 1 "$LOGF")"
    exit 0
fi
# The agents' NBD servers refuse plaintext clients (so the migration's
# bytes crossed over TLS): a plaintext nbdinfo must be told so.
for n in "$N1" "$N2"; do
    LIBNBD_DEBUG=1 nbdinfo "nbd://127.0.0.1:$n/probe" >"$W/plain.txt" 2>&1 || true
    if ! grep -q "server error message: this server requires TLS" "$W/plain.txt"; then
        emit_fail g "stowage volume migrate (two agents)" MiB/s "NBD server on port $n did not refuse a plaintext client: $(grep -v 'debug:' "$W/plain.txt" | tr '\n' ' ' | cut -c1-160)"
        exit 0
    fi
done
# Each store is reached by its own host only: the bytes must cross from
# one agent to the other.
"$BIN" store add --name m1 --role primary --url "file://$W/dev/m1" --scope default/default/h1 >>"$LOGF" 2>&1
"$BIN" store add --name m2 --role primary --url "file://$W/h2/m2" --scope default/default/h2 >>"$LOGF" 2>&1

# The fixture: every tenth MiB random, the rest a hole.
FIX=$W/fixture.raw
truncate -s "$SIZE" "$FIX"
for ((i = 0; i < SIZE_MIB; i += 10)); do
    dd if=/dev/urandom of="$FIX" bs=1M seek=$i count=1 conv=notrunc status=none
done
DATA_MIB=$(alloc_mib "$FIX")
log "fixture: $SIZE_MIB MiB virtual, $DATA_MIB MiB data"

if ! out=$("$BIN" volume create --name mig --store m1 --size "${SIZE_MIB}M" --format raw --wait -o json 2>>"$LOGF"); then
    emit_fail g "stowage volume migrate" MiB/s "volume create: $(tail -n 1 "$LOGF")"
    exit 0
fi
VOL=$(jq -r .volume.id <<<"$out")
# volfile: the file of the volume on the store it is on now
volfile() { find "$W/dev/m1" "$W/h2/m2" -type f -name "*$VOL*" 2>/dev/null | head -n 1; }
SRC=$(volfile)
if [[ -z $SRC ]]; then
    emit_fail g "stowage volume migrate" MiB/s "no file of volume $VOL under the store"
    exit 0
fi
cp --sparse=always "$FIX" "$SRC"
sync

# ours: alternate directions; the job must succeed
TO=m2
migrate() {
    local out
    out=$("$BIN" volume migrate "$VOL" --store "$TO" --wait -o json) || return 1
    [[ $(jq -r .job.state <<<"$out") == JOB_STATE_SUCCEEDED ]] || { echo "job $(jq -r '.job.state + " " + .job.error' <<<"$out")"; return 1; }
    if [[ $TO == m2 ]]; then TO=m1; else TO=m2; fi
}
NOTE="h1 <-> h2 over NBD (TLS), API call to the job's end, source deleted; $DATA_MIB MiB data"
bench g "stowage volume migrate (two agents)" "$SIZE" "drop" "migrate" "$NOTE"
if ! cmp "$FIX" "$(volfile)" >>"$LOGF" 2>&1; then
    emit_fail g "stowage volume migrate: bytes" MiB/s "the migrated volume differs from the fixture"
fi

# peers: qemu-nbd serves the fixture; the other host copies it
PN=$(freeport)
bg qemu-nbd -f raw --read-only -t -b 127.0.0.1 -p "$PN" "$FIX"
if ! wait_nbd "nbd://127.0.0.1:$PN" "$BG"; then
    emit_fail g "nbdcopy (qemu-nbd export -> file)" MiB/s "qemu-nbd did not come up"
    exit 0
fi
DST=$W/peer.raw
SYNC=1 bench g "nbdcopy (qemu-nbd export -> file)" "$SIZE" "rm -f $DST; truncate -s $SIZE $DST; drop" \
    "nbdcopy nbd://127.0.0.1:$PN $DST" "plain NBD on loopback, + sync"
cmp "$FIX" "$DST" >>"$LOGF" 2>&1 || emit_fail g "nbdcopy: bytes" MiB/s "the copy differs from the fixture"
SYNC=1 bench g "qemu-img convert -W -m 8 (qemu-nbd export -> file)" "$SIZE" "rm -f $DST; drop" \
    "qemu-img convert -W -m 8 -f raw -O raw nbd://127.0.0.1:$PN $DST" "plain NBD on loopback, + sync"
cmp "$FIX" "$DST" >>"$LOGF" 2>&1 || emit_fail g "qemu-img convert: bytes" MiB/s "the copy differs from the fixture"
stop "$BG"

# The same over TLS, like ours: qemu-nbd with an x509 server certificate
# that requires a client certificate (as the agents do), from a CA made
# here.
T=$W/tls
mkdir -p "$T"
(
    cd "$T"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca-key.pem -out ca-cert.pem -days 1 -subj /CN=bench-ca
    for who in server client; do
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout $who-key.pem -out $who.csr -subj /CN=$who
        use=clientAuth
        [[ $who == server ]] && use=serverAuth
        printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=%s\n' "$use" >$who.ext
        openssl x509 -req -in $who.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -out $who-cert.pem -days 1 -extfile $who.ext
    done
) >>"$LOGF" 2>&1
PT=$(freeport)
bg qemu-nbd -f raw --read-only -t -b 127.0.0.1 -p "$PT" --object "tls-creds-x509,id=tls0,endpoint=server,dir=$T" --tls-creds tls0 "$FIX"
if ! wait_nbd "nbds://127.0.0.1:$PT/?tls-certificates=$T" "$BG"; then
    emit_fail g "nbdcopy (qemu-nbd export over TLS -> file)" MiB/s "qemu-nbd with TLS did not come up"
    exit 0
fi
SYNC=1 bench g "nbdcopy (qemu-nbd export over TLS -> file)" "$SIZE" "rm -f $DST; truncate -s $SIZE $DST; drop" \
    "nbdcopy 'nbds://127.0.0.1:$PT/?tls-certificates=$T' $DST" "NBD over TLS (x509, client certificate), + sync"
cmp "$FIX" "$DST" >>"$LOGF" 2>&1 || emit_fail g "nbdcopy over TLS: bytes" MiB/s "the copy differs from the fixture"
SYNC=1 bench g "qemu-img convert -W -m 8 (qemu-nbd export over TLS -> file)" "$SIZE" "rm -f $DST; drop" \
    "qemu-img convert -W -m 8 --object tls-creds-x509,id=tls0,endpoint=client,dir=$T --image-opts driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port=$PT,file.tls-creds=tls0 -O raw $DST" \
    "NBD over TLS (x509, client certificate), + sync"
cmp "$FIX" "$DST" >>"$LOGF" 2>&1 || emit_fail g "qemu-img convert over TLS: bytes" MiB/s "the copy differs from the fixture"
log "done"
