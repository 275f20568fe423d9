package stream

import (
	"encoding/json"
	"fmt"
	"os"
	"syscall"
)

// checkpointVersion changes whenever the checkpoint format does.
const checkpointVersion = 1

// checkpoint records which chunks of a copy are done. It is written only
// after the sink was synced, so every chunk it lists is durable; an older
// checkpoint is always a safe (smaller) answer.
type checkpoint struct {
	Version   int    `json:"version"`
	Identity  string `json:"identity"`
	Size      int64  `json:"size"`
	ChunkSize int    `json:"chunk_size"`
	// Done is a bitmap, one bit per chunk, LSB first.
	Done []byte `json:"done"`
	// Hashes holds the xxh3 of each done chunk, little endian, 8 bytes each.
	Hashes []byte `json:"hashes"`
	// SHAOffset is how many bytes SHAState has consumed (in order); SHAState
	// is the marshalled sha256 state, empty when no SHA-256 is computed.
	SHAOffset int64  `json:"sha_offset,omitempty"`
	SHAState  []byte `json:"sha_state,omitempty"`
}

func loadCheckpoint(path string) (*checkpoint, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var c checkpoint
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, fmt.Errorf("checkpoint %s: %w", path, err)
	}
	if c.Version != checkpointVersion {
		return nil, fmt.Errorf("checkpoint %s: version %d, want %d", path, c.Version, checkpointVersion)
	}
	return &c, nil
}

// save writes c to path atomically (temporary file, fsync, rename).
func (c *checkpoint) save(path string) error {
	b, err := json.Marshal(c)
	if err != nil {
		return err
	}
	tmp := path + ".new"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|syscall.O_NOFOLLOW, 0o644)
	if err != nil {
		return fmt.Errorf("write checkpoint: %w", err)
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		os.Remove(tmp)
		return fmt.Errorf("write checkpoint %s: %w", tmp, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		os.Remove(tmp)
		return fmt.Errorf("sync checkpoint %s: %w", tmp, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close checkpoint %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("rename checkpoint %s: %w", tmp, err)
	}
	return nil
}

func bitGet(b []byte, i int64) bool { return b[i>>3]&(1<<(i&7)) != 0 }
func bitSet(b []byte, i int64)      { b[i>>3] |= 1 << (i & 7) }
func bitClear(b []byte, i int64)    { b[i>>3] &^= 1 << (i & 7) }
