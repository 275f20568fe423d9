package hostfs

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stowage/stowage/drivers"
)

// TestCancelledOnRequestDiscardsStage: a download cancelled on request
// (`stowage job cancel`) stops, publishes nothing and removes its staging
// file and the copy engine's files; the same download interrupted
// otherwise keeps them for a resume (TestFetchResumesAfterCancel).
func TestCancelledOnRequestDiscardsStage(t *testing.T) {
	needQemuImg(t)
	srcDir := t.TempDir()
	data := bytes.Repeat([]byte{1, 2, 3, 4, 5, 6, 7, 8}, 4<<20) // 32 MiB
	if err := os.WriteFile(filepath.Join(srcDir, "big.raw"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	// A server that stalls after the first requests until the client goes.
	var served atomic.Int64
	fs := http.FileServer(http.Dir(srcDir))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Range") != "bytes=0-0" && served.Add(1) > 2 {
			<-r.Context().Done()
			return
		}
		fs.ServeHTTP(w, r)
	}))
	defer srv.Close()
	l := New("h1")
	steps := map[string]func(ctx context.Context, dest string) error{
		"fetch": func(ctx context.Context, dest string) error {
			_, err := l.FetchImage(ctx, FetchRequest{Source: srv.URL + "/big.raw", Dest: dest, Format: drivers.FormatRaw}, nil)
			return err
		},
		"copy": func(ctx context.Context, dest string) error {
			_, err := l.CopyImage(ctx, CopyRequest{Source: srv.URL + "/big.raw", SourceFormat: drivers.FormatRaw, Dest: dest}, nil)
			return err
		},
	}
	for name, step := range steps {
		t.Run(name, func(t *testing.T) {
			served.Store(0)
			dst := t.TempDir()
			ctx, cancel := context.WithCancelCause(t.Context())
			go func() {
				for served.Load() < 3 {
					select {
					case <-t.Context().Done():
						return
					case <-time.After(time.Millisecond):
					}
				}
				cancel(drivers.ErrCancelledOnRequest)
			}()
			start := time.Now()
			err := step(ctx, filepath.Join(dst, "big.raw"))
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("cancelled %s: %v", name, err)
			}
			if d := time.Since(start); d > 10*time.Second {
				t.Errorf("cancelled %s took %s to return", name, d)
			}
			onlyEntries(t, dst) // no object, no stage, no checkpoint
		})
	}
}
