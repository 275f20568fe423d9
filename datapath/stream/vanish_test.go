package stream

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"net"
	"net/http"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stowage/stowage/errdefs"
)

// flakyServer serves content slowly on a fixed loopback port and can be
// stopped (listener and connections closed) and started again there.
type flakyServer struct {
	t       *testing.T
	content []byte
	addr    string
	sent    atomic.Int64
	ranges  atomic.Int64 // Range requests answered since the last start
	mu      sync.Mutex
	srv     *http.Server
}

type pacedWriter struct {
	http.ResponseWriter
	s *flakyServer
}

func (w pacedWriter) Write(p []byte) (int, error) {
	n, err := w.ResponseWriter.Write(p)
	w.s.sent.Add(int64(n))
	time.Sleep(time.Duration(n) * time.Second / (8 << 20)) // ~8 MiB/s a connection
	return n, err
}

func (s *flakyServer) start() {
	s.t.Helper()
	addr := s.addr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	var ln net.Listener
	var err error
	for i := 0; i < 50; i++ {
		if ln, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		s.t.Fatal(err)
	}
	s.ranges.Store(0)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Range") != "" {
			s.ranges.Add(1)
		}
		http.ServeContent(pacedWriter{w, s}, r, "", time.Time{}, bytes.NewReader(s.content))
	})}
	s.mu.Lock()
	s.addr, s.srv = ln.Addr().String(), srv
	s.mu.Unlock()
	go srv.Serve(ln)
}

func (s *flakyServer) stop() {
	s.mu.Lock()
	srv := s.srv
	s.srv = nil
	s.mu.Unlock()
	if srv != nil {
		srv.Close()
	}
}

// TestHTTPSourceVanishes stops the server after 2 MiB of an 8 MiB copy:
// back after 1.5 s, a 4 s RetryFor resumes the copy by Range and the bytes
// are whole; without RetryFor (two fast retries) or with the server gone
// for good, the copy fails as unavailable with ErrRetriesExhausted once the
// window is over.
func TestHTTPSourceVanishes(t *testing.T) {
	content := make([]byte, 8<<20)
	rand.Read(content)
	for _, c := range []struct {
		name     string
		retryFor time.Duration
		back     bool
		ok       bool
	}{
		{"back within RetryFor", 4 * time.Second, true, true},
		{"back after the retries", 0, true, false},
		{"never back", time.Second, false, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := &flakyServer{t: t, content: content}
			s.start()
			t.Cleanup(s.stop)
			ctx := context.Background()
			h := HTTPOptions{MaxRetries: 2, RetryBase: 50 * time.Millisecond, RetryMax: 200 * time.Millisecond, StallTimeout: 2 * time.Second, RetryFor: c.retryFor}
			src, err := OpenSource(ctx, "http://"+s.addr+"/img", SourceOptions{HTTP: h})
			if err != nil {
				t.Fatal(err)
			}
			defer src.Close()
			out := filepath.Join(t.TempDir(), "out")
			dst, err := OpenSink(ctx, out, src.Size(), SinkOptions{})
			if err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() {
				_, err := Copy(ctx, src, dst, Options{ChunkSize: 1 << 20, Workers: 2})
				done <- err
			}()
			for s.sent.Load() < 2<<20 {
				time.Sleep(5 * time.Millisecond)
			}
			s.stop()
			down := time.Now()
			if c.back {
				time.Sleep(1500 * time.Millisecond)
				s.start()
			}
			err = <-done
			took := time.Since(down)
			t.Logf("copy ended %v after the server stopped: %v; %d bytes served, %d Range requests after the restart", took.Round(time.Millisecond), err, s.sent.Load(), s.ranges.Load())
			if c.ok {
				if err != nil {
					t.Fatal(err)
				}
				if fileSHA(t, out) != sha(content) {
					t.Fatal("the copy differs")
				}
				if s.ranges.Load() == 0 || s.sent.Load() > int64(len(content))+(2<<20) {
					t.Fatalf("resumed with %d Range requests, %d bytes served for %d", s.ranges.Load(), s.sent.Load(), len(content))
				}
				return
			}
			if !errors.Is(err, ErrRetriesExhausted) || !errors.Is(err, errdefs.ErrUnavailable) {
				t.Fatalf("copy error %v: want unavailable, retries exhausted", err)
			}
			if took < c.retryFor {
				t.Fatalf("gave up after %v, before the %v window", took, c.retryFor)
			}
		})
	}
}
