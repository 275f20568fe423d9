// Package pace spaces data-path work in time: a Limiter that keeps the
// bytes of all its callers together under a rate, and Sleep, a wait that
// ends early with its context. The copy engine (datapath/stream) paces its
// reads and retries with it, the image cache (datapath/imagecache) its
// background prefetch.
package pace

import (
	"context"
	"sync"
	"time"
)

// Limiter paces byte transfers to a rate shared by its callers: each Wait
// reserves its bytes after those of the Waits before it. A nil *Limiter
// does not limit. Its methods are safe for concurrent use.
type Limiter struct {
	mu   sync.Mutex
	rate float64 // bytes per second
	next time.Time
}

// NewLimiter returns a Limiter of bytesPerSecond, or nil (no limit) when
// bytesPerSecond is not positive.
func NewLimiter(bytesPerSecond int64) *Limiter {
	if bytesPerSecond <= 0 {
		return nil
	}
	return &Limiter{rate: float64(bytesPerSecond)}
}

// Wait returns when n more bytes fit the rate (nil), or with ctx.Err() when
// ctx ends first. With nothing to wait for (a nil Limiter, n <= 0) it
// returns nil at once; when the bytes fit already it returns ctx.Err().
func (l *Limiter) Wait(ctx context.Context, n int64) error {
	if l == nil || n <= 0 {
		return nil
	}
	l.mu.Lock()
	now := time.Now()
	if l.next.Before(now) {
		l.next = now
	}
	at := l.next
	l.next = l.next.Add(time.Duration(float64(n) / l.rate * float64(time.Second)))
	l.mu.Unlock()
	d := time.Until(at)
	if d <= 0 {
		return ctx.Err()
	}
	return Sleep(ctx, d)
}

// Sleep waits for d, or until ctx ends (then it returns ctx.Err()).
func Sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
