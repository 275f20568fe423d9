#!/usr/bin/env bash
# fusebench.sh — the measurements of BENCH.md "2026-12-04": as root, on a
# machine with FUSE passthrough, from the repository root:
#
#   bash datapath/imagecache/fusebench.sh          # ROUNDS=5 STEADY=25, about 5 minutes
#
# 1. warm: our mount (complete template, passthrough) and a go-fuse v2.12.1
#    passthrough loopback (the helper of ../shared/bench/peers.sh section e)
#    mounted side by side; STEADY rounds of warm `dd bs=1M` alternated: ours,
#    go-fuse, the source, our data file. A round counts only if the source
#    and the data file stayed resident (fincore): other sessions' drop_caches
#    would make it a cold read.
# 2. HTTP cold: `curl -o /dev/null` from a Go net/http file server on
#    127.0.0.1 against `dd bs=1M` through a fresh `stowage cache mount
#    --prefetch-rate off URL`, drop_caches + 3 s before each, ROUNDS rounds.
# 3. first byte: `dd bs=4k count=1` through a fresh mount of the URL against
#    `curl -r 0-4095`, ROUNDS rounds.
# Env: ROUNDS=5 STEADY=25 SIZE_MIB=1024 STOWAGE_BIN= PEERS=<repo>/../shared/bench/peers.sh
#      W=/tmp/stowage-fusebench2 (removed at exit unless KEEP=1)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
ROUNDS=${ROUNDS:-5} STEADY=${STEADY:-25} SIZE_MIB=${SIZE_MIB:-1024} KEEP=${KEEP:-0}
PEERS=${PEERS:-$REPO/../shared/bench/peers.sh}
W=${W:-/tmp/stowage-fusebench2}
[[ $(id -u) -eq 0 ]] || { echo "fusebench.sh: run as root" >&2; exit 1; }
[[ $W == /tmp/* ]] || { echo "fusebench.sh: W must be under /tmp" >&2; exit 1; }
mkdir -p "$W/src" "$W/mnt" "$W/mnt2" "$W/gofuse" "$W/httpsrv"
PIDS=()
cleanup() {
    set +e
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
    for m in "$W/mnt" "$W/mnt2"; do mountpoint -q "$m" && umount "$m"; done
    [[ $KEEP == 1 ]] || rm -rf "$W"
}
trap cleanup EXIT
BIN=${STOWAGE_BIN:-$W/stowage}
[[ -n ${STOWAGE_BIN:-} ]] || (cd "$REPO" && go build -o "$BIN" ./cmd/stowage)
# go-fuse loopback helper, from peers.sh
awk '/^IFS= read -r -d .. FUSE_SRC <<.GOEOF/{f=1;next} /^GOEOF/{f=0} f' "$PEERS" >"$W/gofuse/main.go"
(cd "$W/gofuse" && { [[ -f go.mod ]] || go mod init fusebench; } && GOFLAGS=-mod=mod go get github.com/hanwen/go-fuse/v2@v2.12.1 &&
    GOFLAGS=-mod=mod go build -o fusebench .) >"$W/build.log" 2>&1
cat >"$W/httpsrv/main.go" <<'GO'
package main

import (
	"log"
	"net/http"
	"os"
)

func main() { log.Fatal(http.ListenAndServe(os.Args[1], http.FileServer(http.Dir(os.Args[2])))) }
GO
(cd "$W/httpsrv" && { [[ -f go.mod ]] || go mod init httpsrv; } && go build -o httpsrv .) >>"$W/build.log" 2>&1
SRC=$W/src/dense.raw
[[ -f $SRC ]] || head -c $((SIZE_MIB << 20)) /dev/urandom >"$SRC"
SIZE=$((SIZE_MIB << 20))
now_us() { local t=$EPOCHREALTIME; echo "${t/./}"; }
mibs() { awk -v us="$1" -v m="$SIZE_MIB" 'BEGIN { printf "%.0f", m / (us / 1e6) }'; }
rd() { local t0 t1; t0=$(now_us); dd if="$1" of=/dev/null bs=1M status=none; t1=$(now_us); mibs $((t1 - t0)); }
res() { fincore -nb -o RES "$1" | tr -d ' '; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; sleep 3; }
waitfile() { local i; for ((i = 0; i < 200; i++)); do [[ -e $1 ]] && return 0; sleep 0.05; done; return 1; }
med() { sort -g | awk '{ v[NR] = $1 } END { printf "%.3f", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

echo "## warm (complete template, passthrough), $STEADY rounds"
"$BIN" cache mount --cache-dir "$W/cache" "$W/src" "$W/mnt" >"$W/ours.out" 2>"$W/ours.log" & PIDS+=($!)
"$W/gofuse/fusebench" -passthrough=true "$W/src" "$W/mnt2" >"$W/gofuse.out" 2>&1 & PIDS+=($!)
waitfile "$W/mnt/dense.raw"; waitfile "$W/mnt2/dense.raw"
dd if="$W/mnt/dense.raw" of=/dev/null bs=1M status=none
for ((i = 0; i < 100; i++)); do grep -q "template complete" "$W/ours.log" && break; sleep 0.1; done
DATA=$W/cache/dense.raw/data
: >"$W/warm.tsv"
for ((i = 0; i < STEADY; i++)); do
    cat "$SRC" "$DATA" >/dev/null
    a=$(rd "$W/mnt/dense.raw") b=$(rd "$W/mnt2/dense.raw") c=$(rd "$SRC") d=$(rd "$DATA")
    [[ $(res "$SRC") == "$SIZE" && $(res "$DATA") == "$SIZE" ]] && echo "$a $b $c $d" >>"$W/warm.tsv"
done
for p in "${PIDS[@]}"; do kill -TERM "$p"; wait "$p" || true; done
PIDS=()
echo "rounds kept: $(wc -l <"$W/warm.tsv") of $STEADY"
for k in 1 2 3 4; do
    printf '%s median %s MiB/s\n' "$(echo "ours-passthrough go-fuse-passthrough direct-source direct-datafile" | cut -d' ' -f$k)" \
        "$(awk -v k=$k '{ print $k }' "$W/warm.tsv" | med)"
done
echo "median per-round ratios: ours/direct $(awk '{ print $1 / $3 }' "$W/warm.tsv" | med)," \
    "ours/go-fuse $(awk '{ print $1 / $2 }' "$W/warm.tsv" | med), go-fuse/direct $(awk '{ print $2 / $3 }' "$W/warm.tsv" | med)"

echo "## HTTP source: cold read and first byte, $ROUNDS rounds"
"$W/httpsrv/httpsrv" 127.0.0.1:18081 "$W/src" >"$W/httpsrv.log" 2>&1 & SRV=$!; PIDS+=($SRV)
URL=http://127.0.0.1:18081/dense.raw
for ((i = 0; i < 100; i++)); do curl -sfI "$URL" >/dev/null && break; sleep 0.05; done
mnt_url() {
    rm -rf "$W/hcache"
    "$BIN" cache mount --prefetch-rate off --cache-dir "$W/hcache" "$URL" "$W/mnt" >"$W/h.out" 2>>"$W/h.log" & MP=$!
    waitfile "$W/mnt/dense.raw"
}
umnt() { kill -TERM "$MP"; wait "$MP" || true; }
for ((r = 1; r <= ROUNDS; r++)); do
    drop; c=$(curl -s -o /dev/null -w '%{time_total}' "$URL"); cr=$(awk -v t="$c" -v m="$SIZE_MIB" 'BEGIN { printf "%.0f", m / t }')
    mnt_url; drop; o=$(rd "$W/mnt/dense.raw"); umnt
    drop; cf=$(curl -s -o /dev/null -r 0-4095 -w '%{time_starttransfer}' "$URL" | awk '{ printf "%.1f", $1 * 1000 }')
    mnt_url; drop; t0=$(now_us); dd if="$W/mnt/dense.raw" of=/dev/null bs=4k count=1 status=none; t1=$(now_us); umnt
    of=$(awk -v us=$((t1 - t0)) 'BEGIN { printf "%.1f", us / 1000 }')
    echo "round $r: curl $cr MiB/s, mount $o MiB/s, ratio $(awk -v a="$o" -v b="$cr" 'BEGIN { printf "%.2f", a / b }');" \
        "first byte: curl $cf ms, mount $of ms"
done
