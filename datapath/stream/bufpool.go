package stream

import (
	"sync"

	"golang.org/x/sys/unix"
)

// bufPool hands out page-aligned buffers of one size, allocated with mmap so
// that they suit O_DIRECT and stay out of the Go heap. Freed buffers are
// kept (up to maxPooledBytes per size) for the next copy in the process:
// first-touch of fresh memory is expensive on the hosts we measured, so a
// buffer that was used once is worth keeping.
type bufPool struct {
	mu   sync.Mutex
	free map[int][][]byte
}

const maxPooledBytes = 128 << 20

var buffers = &bufPool{free: map[int][][]byte{}}

// get returns a buffer of exactly size bytes.
func (p *bufPool) get(size int) ([]byte, error) {
	p.mu.Lock()
	if l := p.free[size]; len(l) > 0 {
		b := l[len(l)-1]
		p.free[size] = l[:len(l)-1]
		p.mu.Unlock()
		return b, nil
	}
	p.mu.Unlock()
	b, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err == nil && size >= hugePage {
		// One fault per 2 MiB instead of 512: the first touch of a fresh
		// buffer is most of a short (sparse) copy's fixed cost. A hint
		// only (THP may be off).
		_ = unix.Madvise(b, unix.MADV_HUGEPAGE)
	}
	return b, err
}

// hugePage is the size of a transparent huge page on x86-64 and arm64 (4K).
const hugePage = 2 << 20

// put returns b to the pool, or unmaps it when the pool is full.
func (p *bufPool) put(b []byte) {
	b = b[:cap(b)]
	p.mu.Lock()
	if (len(p.free[len(b)])+1)*len(b) <= maxPooledBytes {
		p.free[len(b)] = append(p.free[len(b)], b)
		p.mu.Unlock()
		return
	}
	p.mu.Unlock()
	_ = unix.Munmap(b)
}
