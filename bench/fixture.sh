#!/usr/bin/env bash
# bench/fixture.sh — a real-image fixture: an ext4 filesystem image filled
# with real files from this machine (/usr/share, /usr/lib: text, binaries,
# compressed data, files of every size), as raw and as qcow2, the way a real
# template looks to the copy engine: many extents of every size, metadata
# blocks, trimmed holes where files were deleted, and mostly empty space.
#
#   bash bench/fixture.sh OUTDIR           # OUTDIR/fs.raw, OUTDIR/fs.qcow2
#
# Env: FIX_MIB=1024   virtual size of the image (MiB)
#      FIX_FILL=25    percent of it filled with files (before the churn)
#      FIX_SRC="/usr/share /usr/lib"  where the files come from
# Steps: mkfs.ext4 -d from a staging copy of the first files (sorted
# path order, so the same machine gives the same image), then, when loop
# mounts work (root), churn: delete every third file and write a second
# batch, which fragments the free space (as a template that lived a while
# has), then delete every fifth file of the result; freed blocks are
# trimmed after each round of deletions (fstrim punches holes through the
# loop device, as virt-sparsify would before capturing a template).
# Prints one "- fixture: ..." facts line on stdout. Needs e2fsprogs and qemu-img; root for the churn.
set -euo pipefail
OUT=${1:?usage: fixture.sh OUTDIR}
FIX_MIB=${FIX_MIB:-1024}
FIX_FILL=${FIX_FILL:-25}
FIX_SRC=${FIX_SRC:-/usr/share /usr/lib}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STAGE=$OUT/.stage
MNT=$OUT/.mnt
RAW=$OUT/fs.raw
QCOW=$OUT/fs.qcow2
cleanup() {
    mountpoint -q "$MNT" 2>/dev/null && umount "$MNT"
    rm -rf "$STAGE" "$MNT"
}
trap cleanup EXIT
rm -rf "$STAGE" "$RAW" "$QCOW"
mkdir -p "$STAGE"

budget=$((FIX_MIB * 1048576 * FIX_FILL / 100))
# list regular files (< 4 MiB each) in path order with their sizes; take
# the first `budget` bytes for the first batch and the next budget/3 for the
# churn batch
# shellcheck disable=SC2086
find $FIX_SRC -xdev -type f -size -4096k -readable -printf '%s\t%p\n' 2>/dev/null | sort -k2 |
    awk -F'\t' -v b="$budget" -v out="$OUT" '
        { if (s < b) { print $2 > (out "/.batch1"); s += $1 }
          else if (t < b / 3) { print $2 > (out "/.batch2"); t += $1 }
          }'
tar -C / -cf - --files-from=<(sed 's|^/||' "$OUT/.batch1") 2>/dev/null | tar -C "$STAGE" -xf -
truncate -s "${FIX_MIB}M" "$RAW"
mkfs.ext4 -q -F -L stowage-fixture -d "$STAGE" "$RAW"
rm -rf "$STAGE"
churn=no
if [[ $(id -u) -eq 0 ]] && mkdir -p "$MNT" && mount -o loop,noinit_itable "$RAW" "$MNT" 2>/dev/null; then
    find "$MNT" -type f | sort | awk 'NR % 3 == 0' | xargs -r -d '\n' rm -f
    sync
    # trim the freed blocks (the loop device punches holes in the image), as
    # fstrim or virt-sparsify before capturing a template would
    fstrim "$MNT" 2>/dev/null || true
    # eight top-level directories: ext4's Orlov allocator spreads them over
    # the block groups, into the holes the deletions left
    for ((d = 0; d < 8; d++)); do
        mkdir -p "$MNT/batch2-$d"
        awk -v d=$d 'NR % 8 == d { sub("^/", ""); print }' "$OUT/.batch2" >"$OUT/.list"
        tar -C / -cf - --files-from="$OUT/.list" 2>/dev/null | tar -C "$MNT/batch2-$d" -xf -
    done
    rm -f "$OUT/.list"
    # a second round of deletions, trimmed: the image as captured
    find "$MNT" -type f | sort | awk 'NR % 5 == 0' | xargs -r -d '\n' rm -f
    sync
    fstrim "$MNT" 2>/dev/null || true
    umount "$MNT"
    churn=yes
fi
rm -f "$OUT/.batch1" "$OUT/.batch2"
e2fsck -fn "$RAW" >/dev/null 2>&1
qemu-img convert -q -f raw -O qcow2 "$RAW" "$QCOW"
sync
nfiles=$(debugfs -R 'stats' "$RAW" 2>/dev/null | awk -F: '/^Inode count/ { ic = $2 } /^Free inodes/ { fi = $2 } END { print ic - fi }')
exts=$(qemu-img map -f raw --output=json "$RAW" | grep -c '"data": true')
echo "- fixture: ext4 image of real files from $FIX_SRC, ${FIX_MIB} MiB virtual, $(du -m "$RAW" | cut -f1) MiB allocated in $exts data extents (qemu-img map), ${nfiles} inodes in use, churned (a third deleted, more written, a fifth deleted): $churn; qcow2: $(du -m "$QCOW" | cut -f1) MiB"
