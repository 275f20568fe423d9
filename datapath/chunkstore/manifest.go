package chunkstore

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math/bits"
	"os"
	"time"

	"github.com/stowage/stowage/errdefs"
)

// ManifestVersion is the version of the manifest format this package writes.
const ManifestVersion = 1

// ZeroChunk stands for an all-zero chunk in Manifest.Chunks; it is never stored.
const ZeroChunk = "zero"

// DefaultChunkSize is the chunk size when none is given.
const DefaultChunkSize = 4 << 20

// Chunk sizes are powers of two in [MinChunkSize, MaxChunkSize].
const (
	MinChunkSize = 64 << 10
	MaxChunkSize = 256 << 20
)

// Manifest describes one backup: the image's virtual size, the chunk size
// and, per chunk in order, its SHA-256 (lower-case hex) or ZeroChunk. The
// last chunk is shorter when Size is not a multiple of ChunkSize.
//
//	{"version":1,"size":10737418240,"chunk_size":4194304,
//	 "chunks":["zero","9f86d0…",…],"created_at":"2026-01-02T03:04:05Z"}
type Manifest struct {
	Version   int       `json:"version"`
	Size      int64     `json:"size"`
	ChunkSize int64     `json:"chunk_size"`
	Chunks    []string  `json:"chunks"`
	CreatedAt time.Time `json:"created_at"`
	// Source names the image that was backed up (BackupOptions.Source), so
	// that a later backup can check that a parent is the backup of its
	// backing file before trusting it.
	Source string `json:"source,omitempty"`
}

// checkChunkSize enforces the chunk size rule.
func checkChunkSize(n int64) error {
	if n < MinChunkSize || n > MaxChunkSize || bits.OnesCount64(uint64(n)) != 1 {
		return fmt.Errorf("chunk size %d: want a power of two from %d to %d: %w", n, MinChunkSize, MaxChunkSize, errdefs.ErrInvalid)
	}
	return nil
}

// numChunks is how many chunks an image of size bytes has.
func numChunks(size, chunkSize int64) int64 { return (size + chunkSize - 1) / chunkSize }

// chunkLen is the length of chunk i.
func (m *Manifest) chunkLen(i int) int64 {
	off := int64(i) * m.ChunkSize
	return min(m.ChunkSize, m.Size-off)
}

// Validate checks the structure of m: version, sizes, the number of chunks
// and that every entry is ZeroChunk or a SHA-256 in lower-case hex.
func (m *Manifest) Validate() error {
	switch {
	case m.Version != ManifestVersion:
		return fmt.Errorf("manifest version %d: this build reads version %d", m.Version, ManifestVersion)
	case m.Size < 0:
		return fmt.Errorf("manifest size %d is negative", m.Size)
	}
	if err := checkChunkSize(m.ChunkSize); err != nil {
		return err
	}
	if want := numChunks(m.Size, m.ChunkSize); int64(len(m.Chunks)) != want {
		return fmt.Errorf("manifest has %d chunks, size %d in chunks of %d needs %d", len(m.Chunks), m.Size, m.ChunkSize, want)
	}
	for i, c := range m.Chunks {
		if c != ZeroChunk && !isHash(c) {
			return fmt.Errorf("manifest chunk %d is %q, not %q or a lower-case hex SHA-256", i, c, ZeroChunk)
		}
	}
	return nil
}

// isHash reports whether s is 64 lower-case hex digits.
func isHash(s string) bool {
	if len(s) != 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// LoadManifest reads and validates the manifest file at path (a manifest
// of a directory store, Open). A missing file is errdefs.ErrNotFound; an
// unreadable or invalid one errdefs.ErrDataLoss. Store.Manifest reads one
// from any store.
func LoadManifest(path string) (*Manifest, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("manifest %s: %w", path, errors.Join(err, errdefs.ErrNotFound))
		}
		return nil, fmt.Errorf("manifest %s: %w", path, err)
	}
	return parseManifest(path, b)
}

func parseManifest(name string, b []byte) (*Manifest, error) {
	var m Manifest
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return nil, fmt.Errorf("manifest %s is not a manifest: %v: %w", name, err, errdefs.ErrDataLoss)
	}
	if err := m.Validate(); err != nil {
		return nil, fmt.Errorf("manifest %s: %v: %w", name, err, errdefs.ErrDataLoss)
	}
	return &m, nil
}

// encodeManifest validates and encodes m.
func encodeManifest(name string, m *Manifest) ([]byte, error) {
	if err := m.Validate(); err != nil {
		return nil, fmt.Errorf("manifest %s: %v: %w", name, err, errdefs.ErrInvalid)
	}
	b, err := json.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("manifest %s: encode: %w", name, err)
	}
	return b, nil
}

// WriteManifest writes m to the file path atomically: a temporary file in
// the same directory, fsync, a rename that never replaces an existing
// manifest (errdefs.ErrAlreadyExists), and a directory fsync.
func WriteManifest(path string, m *Manifest) error {
	b, err := encodeManifest(path, m)
	if err != nil {
		return err
	}
	return createFile(path, b)
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // never fails (crypto/rand)
	return hex.EncodeToString(b)
}
