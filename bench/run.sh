#!/usr/bin/env bash
# bench/run.sh — Stowage's copy benchmark in one command (as root):
#
#   bash bench/run.sh            # SIZE_GIB=2 RUNS=3, about 15 minutes
#
# It builds stowage, runs shared/bench/peers.sh sections b (dense copy, cold
# and warm) and c (sparse copy) with stowage hooked in through OURS_COPY, so
# that stowage and the peers (nbdcopy, qemu-img convert, cp, dd) are timed in
# the same invocation, then bench/extra.sh (zero-filled image, stowage's
# modes), and writes bench/results/copy-<stamp>.md (same-run ratios) and
# .png (bar chart), plus the raw TSVs and the peers.sh report.
#
# Env: SIZE_GIB=2 RUNS=3 SETTLE=3 SECTIONS="b c" EXTRA=1
#      STOWAGE_BIN=   use this binary instead of building ./cmd/stowage
#      PEERS=<repo>/../shared/bench/peers.sh  WORKDIR=/tmp/stowage-bench
#      OUTDIR=<repo>/bench/results
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEERS=${PEERS:-$REPO/../shared/bench/peers.sh}
export SIZE_GIB=${SIZE_GIB:-2} RUNS=${RUNS:-3} SETTLE=${SETTLE:-3}
SECTIONS=${SECTIONS:-"b c"}
EXTRA=${EXTRA:-1}
WORK=${WORKDIR:-/tmp/stowage-bench}
OUTDIR=${OUTDIR:-$REPO/bench/results}
[[ $(id -u) -eq 0 ]] || { echo "bench/run.sh: run as root (drop_caches, mounts)" >&2; exit 1; }
[[ -f $PEERS ]] || { echo "bench/run.sh: $PEERS not found (set PEERS=)" >&2; exit 1; }
mkdir -p "$WORK" "$OUTDIR"
STAMP=$(date -u +%Y%m%dT%H%MZ)
BIN=$WORK/stowage
if [[ -n ${STOWAGE_BIN:-} ]]; then
    cp "$STOWAGE_BIN" "$BIN"
else
    echo "bench: building stowage" >&2
    (cd "$REPO" && go build -o "$BIN" ./cmd/stowage)
fi

PEERS_TSV=$OUTDIR/copy-$STAMP.peers.tsv
EXTRA_TSV=$OUTDIR/copy-$STAMP.extra.tsv
echo "bench: peers.sh SECTIONS=\"$SECTIONS\" SIZE_GIB=$SIZE_GIB RUNS=$RUNS (log: $WORK/peers.log)" >&2
OURS_COPY="$BIN copy {src} {dst}" OURS_NAME=stowage OUT_TSV=$PEERS_TSV SECTIONS=$SECTIONS \
    WORKDIR=$WORK/peers LOG=$WORK/peers.log bash "$PEERS" >"$OUTDIR/copy-$STAMP.peers.md"
TSVS=(-tsv "$PEERS_TSV")
if [[ $EXTRA == 1 ]]; then
    echo "bench: extra.sh" >&2
    BIN=$BIN OUT_TSV=$EXTRA_TSV WORKDIR=$WORK/extra bash "$REPO/bench/extra.sh"
    TSVS+=(-tsv "$EXTRA_TSV")
fi
# machine facts from the peers report
awk '/^- /' "$OUTDIR/copy-$STAMP.peers.md" >"$WORK/facts.md" || true
(cd "$REPO" && go run ./bench/cmd/benchreport "${TSVS[@]}" -facts "$WORK/facts.md" \
    -cmd "SIZE_GIB=$SIZE_GIB RUNS=$RUNS SECTIONS='$SECTIONS' EXTRA=$EXTRA bash bench/run.sh" \
    -md "$OUTDIR/copy-$STAMP.md" -png "$OUTDIR/copy-$STAMP.png")
cat "$OUTDIR/copy-$STAMP.md"
echo "bench: wrote $OUTDIR/copy-$STAMP.md and .png" >&2
