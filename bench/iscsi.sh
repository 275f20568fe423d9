#!/usr/bin/env bash
# bench/iscsi.sh — copies into an iSCSI LUN: `stowage copy SRC iscsi://…`
# (the agent's path: qemu-img through libiscsi with zero detection,
# --target-is-zero on a new LUN, 8 parallel out-of-order writes) against
# plain `qemu-img convert -n` to the same target, in the same run. The
# target is a real tgtd on loopback (thin-provisioned file-backed LUNs, a
# new LUN for every copy); sizes are checked with the LUN's backing file
# (allocated MiB: sparse copies must allocate only data).
# Images: dense (random, SIZE_GIB) and sparse (10% data in 1 MiB extents).
# Writes bench/results/iscsi-<time>.md/.png/.tsv through bench/cmd/benchreport.
# Env: SIZE_GIB=1, RUNS=3, STOWAGE_BIN (default: built from this tree),
#      WORKDIR=/tmp/stowage-bench/iscsi (wiped), OUTDIR=bench/results
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_GIB=${SIZE_GIB:-1}
RUNS=${RUNS:-3}
W=${WORKDIR:-/tmp/stowage-bench/iscsi}
OUTDIR=${OUTDIR:-bench/results}
SIZE=$((SIZE_GIB << 30))
[[ $(id -u) -eq 0 ]] || { echo "iscsi.sh: must run as root (tgtd)" >&2; exit 1; }
for b in tgtd tgtadm qemu-img; do command -v $b >/dev/null || { echo "iscsi.sh: needs $b (apt-get install tgt qemu-utils qemu-block-extra)" >&2; exit 1; }; done
[[ $W == /tmp/* ]] || { echo "iscsi.sh: refusing to wipe $W" >&2; exit 1; }
rm -rf "$W"; mkdir -p "$W" "$OUTDIR"
BIN=${STOWAGE_BIN:-$W/stowage}
[[ -n ${STOWAGE_BIN:-} ]] || go build -o "$BIN" ./cmd/stowage
log() { printf '[%s] iscsi: %s\n' "$(date +%T)" "$*" >&2; }
now_us() { local t=$EPOCHREALTIME; echo "${t/./}"; }

# A tgtd of our own on loopback: a free port, a control port no one uses.
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
CTL=$((20000 + RANDOM % 10000))
IQN=iqn.2026-12.org.stowage.bench:t1
tgtd -f -C "$CTL" --iscsi portal=127.0.0.1:$PORT >"$W/tgtd.log" 2>&1 &
TGTD=$!
trap 'kill -9 $TGTD 2>/dev/null; rm -f /run/tgtd/socket.$CTL /run/tgtd/socket.$CTL.lock; rm -rf "$W"' EXIT
adm() { tgtadm -C "$CTL" --lld iscsi "$@"; }
for _ in $(seq 50); do adm --op show --mode sys >/dev/null 2>&1 && break; sleep 0.1; done
adm --op new --mode target --tid 1 -T "$IQN"
adm --op bind --mode target --tid 1 -I 127.0.0.1

# A fresh thin LUN 1 backed by $W/lun.img for every copy.
fresh_lun() {
	adm --op delete --mode logicalunit --tid 1 --lun 1 >/dev/null 2>&1 || true
	rm -f "$W/lun.img"; truncate -s "$SIZE" "$W/lun.img"
	adm --op new --mode logicalunit --tid 1 --lun 1 -b "$W/lun.img"
	adm --op update --mode logicalunit --tid 1 --lun 1 --params thin_provisioning=1
}
alloc_mib() { echo $(( $(stat -c %b "$1") * 512 >> 20 )); }

log "images: dense (random) and sparse (10% in 1 MiB extents), $SIZE_GIB GiB"
head -c "$SIZE" /dev/urandom >"$W/dense.raw"
truncate -s "$SIZE" "$W/sparse.raw"
for ((i = 0; i < SIZE >> 20; i += 10)); do
	head -c $((1 << 20)) /dev/urandom | dd of="$W/sparse.raw" bs=1M seek=$i conv=notrunc status=none
done

OPTS="driver=raw,file.driver=iscsi,file.transport=tcp,file.portal=127.0.0.1:$PORT,file.target=$IQN,file.lun=1"
declare -A T A
run_one() { # tool image
	local tool=$1 img=$2 t0 t1
	fresh_lun
	sync; echo 3 >/proc/sys/vm/drop_caches
	t0=$(now_us)
	case $tool in
	stowage) "$BIN" copy --lun-is-zero "$W/$img.raw" "iscsi://127.0.0.1:$PORT/$IQN/1" >/dev/null ;;
	qemu-img) qemu-img convert -n -f raw "$W/$img.raw" --target-image-opts "$OPTS" ;;
	esac
	t1=$(now_us)
	qemu-img compare -q --image-opts "driver=raw,file.filename=$W/$img.raw" "$OPTS" || { log "$tool $img: the LUN differs"; exit 1; }
	T[$tool.$img]+="$(( (t1 - t0) / 1000 )) "
	A[$tool.$img]+="$(alloc_mib "$W/lun.img") "
}
for r in $(seq "$RUNS"); do
	for img in dense sparse; do
		for tool in stowage qemu-img; do
			log "run $r: $tool $img"
			run_one "$tool" "$img"
		done
	done
done

stats() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{ v[NR]=$1 } END { print v[int((NR+1)/2)], v[1], v[NR] }'; }
STAMP=$(date -u +%Y%m%dT%H%MZ)
TSV="$OUTDIR/iscsi-$STAMP.tsv"
: >"$TSV"
for img in dense sparse; do
	for tool in stowage qemu-img; do
		read -r med min max < <(echo "${T[$tool.$img]}" | stats)
		mibs=$(( (SIZE >> 20) * 1000 / (med > 0 ? med : 1) ))
		read -r amed _ _ < <(echo "${A[$tool.$img]}" | stats)
		label=$([[ $tool == stowage ]] && echo "stowage copy --lun-is-zero" || echo "qemu-img convert -n")
		printf 'i\t%s into a LUN (%s GiB): %s\tMiB/s\t%s\t%s\t%s\t%s ms median; LUN backing allocates %s MiB\n' \
			"$img" "$SIZE_GIB" "$label" "$mibs" "$(( (SIZE >> 20) * 1000 / max ))" "$(( (SIZE >> 20) * 1000 / min ))" "$med" "$amed" >>"$TSV"
	done
done
go run ./bench/cmd/benchreport -title "Copy into an iSCSI LUN (tgtd on loopback)" \
	-cmd "sudo bash bench/iscsi.sh (SIZE_GIB=$SIZE_GIB RUNS=$RUNS)" \
	-md "$OUTDIR/iscsi-$STAMP.md" -png "$OUTDIR/iscsi-$STAMP.png" -tsv "$TSV"
log "wrote $OUTDIR/iscsi-$STAMP.md"
cat "$TSV"
