package stream

import (
	"context"
	"sync"
	"time"
)

// rateLimiter spaces reads so that their total stays under a byte rate.
type rateLimiter struct {
	mu   sync.Mutex
	rate float64 // bytes per second
	next time.Time
}

func newRateLimiter(bytesPerSecond int64) *rateLimiter {
	if bytesPerSecond <= 0 {
		return nil
	}
	return &rateLimiter{rate: float64(bytesPerSecond)}
}

// wait blocks until n more bytes may be read.
func (r *rateLimiter) wait(ctx context.Context, n int) error {
	if r == nil || n <= 0 {
		return nil
	}
	r.mu.Lock()
	now := time.Now()
	if r.next.Before(now) {
		r.next = now
	}
	at := r.next
	r.next = r.next.Add(time.Duration(float64(n) / r.rate * float64(time.Second)))
	r.mu.Unlock()
	d := time.Until(at)
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
