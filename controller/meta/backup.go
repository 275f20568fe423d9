package meta

// Logical backup and restore of the whole store, through the kvStore seam:
// the same code serves every engine (Badger today, etcd when it lands), and
// a backup taken on one restores into the other.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"strconv"
	"time"

	"github.com/stowage/stowage/errdefs"
)

// The backup stream, all integers big-endian:
//
//	header   "STOWMETA"  u32 format version (1)  u32 schema version  i64 taken at (Unix ns)
//	record   'K'  u32 key length  key  u32 value length  value        (one per key, ascending)
//	trailer  'E'  u64 record count  [32]byte SHA-256 of every byte before it
//
// Nothing may follow the trailer. Keys come in strictly ascending order, so
// a stream cannot hold a key twice. The checksum covers the header, every
// record and the count, so a flipped bit, a cut stream or a spliced one is
// refused.
const (
	backupMagic         = "STOWMETA"
	backupFormatVersion = 1
	backupRecordTag     = 'K'
	backupTrailerTag    = 'E'
	// Bounds on one record, far above what the repository writes (ids are
	// at most 128 bytes, records a few KiB): a corrupt length is refused
	// before it is allocated.
	maxBackupKeyLen = 64 << 10
	maxBackupValLen = 64 << 20
)

// restoreMarkerKey is set while a restore is writing: Open (migrate)
// refuses a store that holds it, so a store a crashed or failed restore
// left half written is never served. Restore removes it last, in the
// transaction after the migrations and Check passed.
const restoreMarkerKey = "meta/restore-incomplete"

// Restore batches: small enough for any engine's transaction limits (etcd
// takes at most 128 operations and 1.5 MiB per request by default).
const (
	restoreBatchKeys  = 100
	restoreBatchBytes = 512 << 10
)

// BackupInfo describes one backup stream.
type BackupInfo struct {
	// FormatVersion is the version of the stream format (1).
	FormatVersion int
	// SchemaVersion is the key layout version of the store it was taken
	// from (see migrations.go).
	SchemaVersion int
	// TakenAt is when the snapshot was read.
	TakenAt time.Time
	// Records is the number of keys (records, index entries, the schema
	// version).
	Records int64
	// Bytes is the length of the whole stream.
	Bytes int64
	// SHA256 is the checksum in the trailer.
	SHA256 [sha256.Size]byte
}

// Checksum is SHA256 in hex.
func (i BackupInfo) Checksum() string { return hex.EncodeToString(i.SHA256[:]) }

// Backup writes every key and value of the store, read from one consistent
// snapshot, to w in the backup stream format, and returns what it wrote.
// It does not block writers (the snapshot is a read transaction). The
// stream holds everything in the store, API token and join token hashes
// included: treat it as a secret.
func (db *DB) Backup(ctx context.Context, w io.Writer) (BackupInfo, error) {
	info := BackupInfo{FormatVersion: backupFormatVersion}
	err := db.view(ctx, func(tx *Tx) error {
		v, err := readSchemaVersion(tx.kv)
		if err != nil {
			return err
		}
		info.SchemaVersion = v
		info.TakenAt = db.now()
		bw := &backupWriter{w: bufio.NewWriterSize(w, 256<<10), h: sha256.New()}
		bw.header(info)
		err = tx.kv.scan(nil, nil, false, func(key, val []byte) error {
			if string(key) == restoreMarkerKey {
				return fmt.Errorf("meta: backup: a restore into this store did not finish: %w", errdefs.ErrFailedPrecondition)
			}
			if info.Records%1024 == 0 {
				if err := ctx.Err(); err != nil {
					return fmt.Errorf("meta: backup: %w", err)
				}
			}
			info.Records++
			bw.record(key, val)
			return bw.err
		})
		if err != nil {
			return err
		}
		info.SHA256 = bw.trailer(info.Records)
		info.Bytes = bw.n
		if bw.err != nil {
			return fmt.Errorf("meta: backup: write: %w", bw.err)
		}
		return nil
	})
	if err != nil {
		return BackupInfo{}, err
	}
	return info, nil
}

// backupWriter writes the stream and hashes it; the first error sticks.
type backupWriter struct {
	w   *bufio.Writer
	h   hash.Hash
	n   int64
	err error
}

func (b *backupWriter) write(p []byte) {
	if b.err != nil {
		return
	}
	b.h.Write(p)
	n, err := b.w.Write(p)
	b.n += int64(n)
	b.err = err
}

func (b *backupWriter) header(info BackupInfo) {
	var h [len(backupMagic) + 4 + 4 + 8]byte
	copy(h[:], backupMagic)
	binary.BigEndian.PutUint32(h[8:], uint32(info.FormatVersion))
	binary.BigEndian.PutUint32(h[12:], uint32(info.SchemaVersion))
	binary.BigEndian.PutUint64(h[16:], uint64(info.TakenAt.UnixNano()))
	b.write(h[:])
}

func (b *backupWriter) record(key, val []byte) {
	var l [5]byte
	l[0] = backupRecordTag
	binary.BigEndian.PutUint32(l[1:], uint32(len(key)))
	b.write(l[:])
	b.write(key)
	binary.BigEndian.PutUint32(l[1:], uint32(len(val)))
	b.write(l[1:])
	b.write(val)
}

func (b *backupWriter) trailer(count int64) [sha256.Size]byte {
	var t [9]byte
	t[0] = backupTrailerTag
	binary.BigEndian.PutUint64(t[1:], uint64(count))
	b.write(t[:])
	var sum [sha256.Size]byte
	copy(sum[:], b.h.Sum(nil))
	if b.err == nil {
		n, err := b.w.Write(sum[:])
		b.n += int64(n)
		b.err = err
	}
	if b.err == nil {
		b.err = b.w.Flush()
	}
	return sum
}

// VerifyBackup reads a whole backup stream and checks its format, order,
// count and checksum without writing anything. A damaged or cut stream is
// errdefs.ErrDataLoss; an unknown format or a schema newer than this build
// knows is errdefs.ErrFailedPrecondition.
func VerifyBackup(ctx context.Context, r io.Reader) (BackupInfo, error) {
	return readBackup(ctx, r, nil)
}

// hashingReader hashes and counts what it reads.
type hashingReader struct {
	r io.Reader
	h hash.Hash
	n int64
}

func (h *hashingReader) Read(p []byte) (int, error) {
	n, err := h.r.Read(p)
	h.h.Write(p[:n])
	h.n += int64(n)
	return n, err
}

// readBackup parses a stream and calls fn (when not nil) for each record in
// order. fn runs before the trailer is checked: a caller that writes must
// be able to undo it when readBackup fails.
func readBackup(ctx context.Context, r io.Reader, fn func(key, val []byte) error) (BackupInfo, error) {
	hr := &hashingReader{r: bufio.NewReaderSize(r, 256<<10), h: sha256.New()}
	var info BackupInfo
	damaged := func(format string, args ...any) error {
		return fmt.Errorf("meta: backup stream: "+format+": %w", append(args, errdefs.ErrDataLoss)...)
	}
	full := func(p []byte, what string) error {
		if _, err := io.ReadFull(hr, p); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return damaged("cut short in %s after %d bytes", what, hr.n)
			}
			return fmt.Errorf("meta: backup stream: read %s: %w", what, err)
		}
		return nil
	}
	var h [len(backupMagic) + 4 + 4 + 8]byte
	if err := full(h[:], "the header"); err != nil {
		return info, err
	}
	if string(h[:8]) != backupMagic {
		return info, fmt.Errorf("meta: not a Stowage metadata backup (magic %q): %w", h[:8], errdefs.ErrInvalid)
	}
	info.FormatVersion = int(binary.BigEndian.Uint32(h[8:]))
	info.SchemaVersion = int(binary.BigEndian.Uint32(h[12:]))
	info.TakenAt = time.Unix(0, int64(binary.BigEndian.Uint64(h[16:])))
	if info.FormatVersion != backupFormatVersion {
		return info, fmt.Errorf("meta: backup format version %d: this build reads only version %d: %w",
			info.FormatVersion, backupFormatVersion, errdefs.ErrFailedPrecondition)
	}
	if latest := latestSchemaVersion(); info.SchemaVersion > latest {
		return info, fmt.Errorf("meta: backup of schema version %d is newer than %d, the newest this build of Stowage knows; "+
			"restore it with a newer Stowage: %w", info.SchemaVersion, latest, errdefs.ErrFailedPrecondition)
	}
	if info.SchemaVersion < 1 {
		return info, damaged("schema version %d", info.SchemaVersion)
	}
	var (
		prev    []byte
		lenBuf  [4]byte
		key     []byte
		val     []byte
		tag     [1]byte
		sawVers bool
	)
	for {
		if err := full(tag[:], "a record tag"); err != nil {
			return info, err
		}
		if tag[0] == backupTrailerTag {
			break
		}
		if tag[0] != backupRecordTag {
			return info, damaged("unknown tag %#x at byte %d", tag[0], hr.n-1)
		}
		if info.Records%1024 == 0 {
			if err := ctx.Err(); err != nil {
				return info, fmt.Errorf("meta: backup stream: %w", err)
			}
		}
		if err := full(lenBuf[:], "a key length"); err != nil {
			return info, err
		}
		kl := binary.BigEndian.Uint32(lenBuf[:])
		if kl == 0 || kl > maxBackupKeyLen {
			return info, damaged("key length %d at byte %d", kl, hr.n-4)
		}
		key = grow(key, int(kl))
		if err := full(key, "a key"); err != nil {
			return info, err
		}
		if err := full(lenBuf[:], "a value length"); err != nil {
			return info, err
		}
		vl := binary.BigEndian.Uint32(lenBuf[:])
		if vl > maxBackupValLen {
			return info, damaged("value length %d at byte %d", vl, hr.n-4)
		}
		val = grow(val, int(vl))
		if err := full(val, "a value"); err != nil {
			return info, err
		}
		if prev != nil && bytes.Compare(key, prev) <= 0 {
			return info, damaged("key %q does not follow %q", key, prev)
		}
		prev = append(prev[:0], key...)
		switch string(key) {
		case restoreMarkerKey:
			return info, fmt.Errorf("meta: backup stream holds %s: it was taken from a store a restore had not finished: %w",
				restoreMarkerKey, errdefs.ErrFailedPrecondition)
		case schemaVersionKey:
			if string(val) != strconv.Itoa(info.SchemaVersion) {
				return info, damaged("schema version key %q, header says %d", val, info.SchemaVersion)
			}
			sawVers = true
		}
		info.Records++
		if fn != nil {
			if err := fn(key, val); err != nil {
				return info, err
			}
		}
	}
	var cnt [8]byte
	if err := full(cnt[:], "the trailer"); err != nil {
		return info, err
	}
	if n := int64(binary.BigEndian.Uint64(cnt[:])); n != info.Records {
		return info, damaged("trailer counts %d records, the stream holds %d", n, info.Records)
	}
	want := hr.h.Sum(nil)
	var sum [sha256.Size]byte
	if err := full(sum[:], "the checksum"); err != nil {
		return info, err
	}
	if !bytes.Equal(sum[:], want) {
		return info, damaged("SHA-256 mismatch: the trailer says %x, the stream hashes to %x", sum, want)
	}
	if n, _ := hr.Read(tag[:]); n != 0 {
		return info, damaged("data after the trailer")
	}
	if !sawVers {
		return info, damaged("no %s key", schemaVersionKey)
	}
	info.SHA256 = sum
	info.Bytes = hr.n
	return info, nil
}

// grow returns b resized to n, reusing its array when it is big enough.
func grow(b []byte, n int) []byte {
	if cap(b) >= n {
		return b[:n]
	}
	return make([]byte, n)
}

// Restore loads a backup into db, which must be empty: opened on an empty
// directory (or an empty etcd prefix) and holding nothing but the schema
// version Open wrote. It then runs the migrations (a backup of an older
// schema is brought up to date as Open does) and Check.
//
// src is read twice: first to verify it whole (format, order, count,
// SHA-256), so a damaged, cut or unknown stream is refused before anything
// is written; then to write it in batches. While it writes, the store
// holds a marker key that makes Open refuse it, removed in the last
// transaction: a restore that fails is undone (the store is emptied
// again), and one cut short by a crash or a failed undo leaves a store no
// controller will open ("a restore into this store did not finish").
//
// Nothing else may use the store meanwhile: run it with the controllers
// stopped.
func Restore(ctx context.Context, db *DB, src io.ReadSeeker) (BackupInfo, error) {
	info, err := VerifyBackup(ctx, src)
	if err != nil {
		return info, err
	}
	if _, err := src.Seek(0, io.SeekStart); err != nil {
		return info, fmt.Errorf("meta: restore: rewind the backup: %w", err)
	}
	// Claim the empty store.
	var openedVersion []byte
	err = db.raw(ctx, true, func(kt kvTxn) error {
		err := kt.scan(nil, nil, false, func(key, val []byte) error {
			switch string(key) {
			case schemaVersionKey:
				openedVersion = append([]byte(nil), val...)
				return nil
			case restoreMarkerKey:
				return fmt.Errorf("meta: restore: a restore into this store did not finish; empty it (a new directory or etcd prefix) and restore again: %w",
					errdefs.ErrFailedPrecondition)
			}
			return fmt.Errorf("meta: restore: the store is not empty (it holds %q); restore only into an empty store: %w",
				key, errdefs.ErrFailedPrecondition)
		})
		if err != nil {
			return err
		}
		return kt.set([]byte(restoreMarkerKey), []byte(info.Checksum()))
	})
	if err != nil {
		return info, err
	}
	if err := restoreInto(ctx, db, src, info); err != nil {
		if uerr := db.undoRestore(context.WithoutCancel(ctx), openedVersion); uerr != nil {
			return info, errors.Join(err, fmt.Errorf("meta: restore: undo failed, the store keeps %s and will not open: %w", restoreMarkerKey, uerr))
		}
		return info, err
	}
	return info, nil
}

// restoreInto writes the verified stream, migrates, checks and removes
// the marker.
func restoreInto(ctx context.Context, db *DB, src io.Reader, want BackupInfo) error {
	type kv struct{ k, v []byte }
	var (
		batch []kv
		size  int
	)
	flush := func() error {
		if len(batch) == 0 {
			return nil
		}
		err := db.raw(ctx, true, func(kt kvTxn) error {
			for _, e := range batch {
				if err := kt.set(e.k, e.v); err != nil {
					return err
				}
			}
			return nil
		})
		batch, size = batch[:0], 0
		if err != nil {
			return fmt.Errorf("meta: restore: write: %w", err)
		}
		return nil
	}
	got, err := readBackup(ctx, src, func(key, val []byte) error {
		batch = append(batch, kv{append([]byte(nil), key...), append([]byte(nil), val...)})
		size += len(key) + len(val)
		if len(batch) >= restoreBatchKeys || size >= restoreBatchBytes {
			return flush()
		}
		return nil
	})
	if err != nil {
		return err
	}
	if err := flush(); err != nil {
		return err
	}
	if got.SHA256 != want.SHA256 {
		return fmt.Errorf("meta: restore: the backup changed between its two reads: %w", errdefs.ErrDataLoss)
	}
	db.mu.RLock()
	err = applyMigrations(ctx, db.kv, migrations)
	db.mu.RUnlock()
	if err != nil {
		return fmt.Errorf("meta: restore: %w", err)
	}
	if err := db.Check(ctx); err != nil {
		return fmt.Errorf("meta: restore: the restored store is inconsistent: %w", err)
	}
	return db.raw(ctx, true, func(kt kvTxn) error { return kt.delete([]byte(restoreMarkerKey)) })
}

// undoRestore empties the store again, leaving the schema version Open had
// written (version; nil: none), and removes the marker last.
func (db *DB) undoRestore(ctx context.Context, version []byte) error {
	for {
		var keys [][]byte
		err := db.raw(ctx, false, func(kt kvTxn) error {
			return kt.scan(nil, nil, true, func(key, _ []byte) error {
				if string(key) == restoreMarkerKey {
					return nil
				}
				keys = append(keys, append([]byte(nil), key...))
				if len(keys) == restoreBatchKeys {
					return errStopScan
				}
				return nil
			})
		})
		if err != nil {
			return err
		}
		if len(keys) == 0 {
			break
		}
		if err := db.raw(ctx, true, func(kt kvTxn) error {
			for _, k := range keys {
				if err := kt.delete(k); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			return err
		}
	}
	return db.raw(ctx, true, func(kt kvTxn) error {
		if version != nil {
			if err := kt.set([]byte(schemaVersionKey), version); err != nil {
				return err
			}
		}
		return kt.delete([]byte(restoreMarkerKey))
	})
}

// raw runs fn in one engine transaction, below the typed repository (no
// retries: backup and restore are the store's only user).
func (db *DB) raw(ctx context.Context, write bool, fn func(kvTxn) error) error {
	release, err := db.enter(ctx)
	if err != nil {
		return err
	}
	defer release()
	if write {
		err = db.kv.update(ctx, fn)
	} else {
		err = db.kv.view(ctx, fn)
	}
	if errors.Is(err, errTxnConflict) {
		return fmt.Errorf("meta: restore raced another writer; stop every controller first: %w", errdefs.ErrAborted)
	}
	return err
}
