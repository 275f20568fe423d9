package nbd

import (
	"math/bits"
	"sync"
)

// Buffers for payloads come from pools of power-of-two size classes from
// 4 KiB to MaxPayload, kept as *[]byte so that Put does not allocate.
const (
	minClassShift = 12
	maxClassShift = 25 // MaxPayload
)

var pools [maxClassShift - minClassShift + 1]sync.Pool

// getBuf returns a buffer of length n (n <= MaxPayload).
func getBuf(n int) *[]byte {
	c := classOf(n)
	if v := pools[c].Get(); v != nil {
		b := v.(*[]byte)
		*b = (*b)[:n]
		return b
	}
	b := make([]byte, n, 1<<(c+minClassShift))
	return &b
}

// putBuf returns b to its pool.
func putBuf(b *[]byte) {
	if b == nil {
		return
	}
	c := cap(*b)
	if c < 1<<minClassShift || c > 1<<maxClassShift || c&(c-1) != 0 {
		return
	}
	pools[bits.TrailingZeros(uint(c))-minClassShift].Put(b)
}

func classOf(n int) int {
	if n <= 1<<minClassShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minClassShift
}
