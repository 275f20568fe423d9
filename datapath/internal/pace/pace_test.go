package pace

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestLimiterSpacesWaits(t *testing.T) {
	l := NewLimiter(1000) // 1000 B/s: 100 bytes every 100ms
	ctx := context.Background()
	start := time.Now()
	for range 4 {
		if err := l.Wait(ctx, 100); err != nil {
			t.Fatal(err)
		}
	}
	// The first Wait passes at once; the next three each wait 100ms.
	if d := time.Since(start); d < 290*time.Millisecond {
		t.Errorf("4 waits of 100 bytes at 1000 B/s took %v, want at least 300ms", d)
	}
}

func TestLimiterNil(t *testing.T) {
	if l := NewLimiter(0); l != nil {
		t.Fatalf("NewLimiter(0) = %v, want nil (no limit)", l)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var l *Limiter
	if err := l.Wait(ctx, 1<<30); err != nil {
		t.Errorf("nil Limiter: %v, want nil", err)
	}
	if err := NewLimiter(1).Wait(ctx, 0); err != nil {
		t.Errorf("Wait for 0 bytes: %v, want nil", err)
	}
}

func TestLimiterCancel(t *testing.T) {
	l := NewLimiter(1)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := l.Wait(ctx, 1); err != nil { // the first passes at once
		t.Fatal(err)
	}
	start := time.Now()
	err := l.Wait(ctx, 1) // would wait a second
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Wait past the deadline: %v, want context.DeadlineExceeded", err)
	}
	if d := time.Since(start); d > 500*time.Millisecond {
		t.Errorf("Wait returned %v after its context ended", d)
	}
}

func TestSleep(t *testing.T) {
	if err := Sleep(context.Background(), time.Millisecond); err != nil {
		t.Errorf("Sleep: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := Sleep(ctx, time.Hour); !errors.Is(err, context.Canceled) {
		t.Errorf("Sleep with a cancelled context: %v, want context.Canceled", err)
	}
}
