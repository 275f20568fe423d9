package stream

import "bytes"

// zeroPage is a read-only source of zeros for comparisons and hashing.
var zeroPage = make([]byte, 1<<20)

// isZero reports whether b is all zeros (about 36 GB/s with bytes.Equal,
// see docs in ECOSYSTEM.md).
func isZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(zeroPage))
		if !bytes.Equal(b[:n], zeroPage[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}

// zeroRuns splits buf, which holds the bytes at virtual offset off, into
// alternating runs of data and zeros at a granularity of block bytes
// (aligned to absolute offsets) and calls fn for each maximal run.
func zeroRuns(buf []byte, off int64, block int, fn func(start, end int, zero bool) error) error {
	if len(buf) == 0 {
		return nil
	}
	runStart, runZero := 0, false
	first := true
	for i := 0; i < len(buf); {
		// the block containing i ends at the next multiple of block in absolute terms
		end := i + block - int((off+int64(i))%int64(block))
		if end > len(buf) {
			end = len(buf)
		}
		z := isZero(buf[i:end])
		if first {
			runZero, first = z, false
		} else if z != runZero {
			if err := fn(runStart, i, runZero); err != nil {
				return err
			}
			runStart, runZero = i, z
		}
		i = end
	}
	return fn(runStart, len(buf), runZero)
}
