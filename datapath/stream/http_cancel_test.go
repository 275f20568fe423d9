package stream

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"
	"time"
)

// TestHTTPSequentialCancel cancels sequential reads (a server without
// ranges) while the body streams: the goroutine context.AfterFunc starts
// to close the body must not read the source's body field while the
// reader clears it (a data race the race-built e2e binaries found; run
// with -race).
func TestHTTPSequentialCancel(t *testing.T) {
	const size = 64 << 20
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(size))
		if r.Method == http.MethodHead {
			return
		}
		chunk := bytes.Repeat([]byte{7}, 64<<10)
		for sent := 0; sent < size; sent += len(chunk) {
			if _, err := w.Write(chunk); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			select {
			case <-r.Context().Done():
				return
			case <-time.After(time.Millisecond):
			}
		}
	}))
	defer ts.Close()
	s, err := OpenHTTPSource(context.Background(), ts.URL+"/img", HTTPOptions{MaxRetries: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if !s.Sequential() {
		t.Fatal("a server without ranges is read sequentially")
	}
	buf := make([]byte, 8<<20)
	for i := range 20 {
		ctx, cancel := context.WithCancel(context.Background())
		time.AfterFunc(time.Duration(2+i%5)*time.Millisecond, cancel)
		if _, err := s.ReadAtContext(ctx, buf, 0); err == nil {
			t.Fatalf("read %d: not cancelled", i)
		}
		cancel()
	}
}
