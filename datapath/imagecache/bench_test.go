package imagecache

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// BenchmarkMount measures the mount against its source and its own data
// file on one loopback HTTP origin (see BENCH.md):
//
//	TTFB          open + 4 KiB read of a cold template through the mount
//	ColdSeq       sequential 1 MiB reads of a cold template through the mount
//	SourceDirect  one GET of the whole template from the origin
//	WarmMount     sequential read of a complete template through the mount
//	WarmDirect    sequential read of that template's data file
func BenchmarkMount(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root for FUSE mounts")
	}
	const size = 64 << 20
	o := newOrigin(&testing.T{})
	defer o.srv.Close()
	url := o.put("bench.raw", randBytes(size, 42))
	opts := Options{Dir: b.TempDir(), PrefetchRate: -1}
	c, err := New(opts)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	mnt := b.TempDir()
	m, err := MountCache(context.Background(), c, mnt, MountOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer func() { m.Unmount(5 * time.Second); m.Wait() }()
	ctx := context.Background()
	buf := make([]byte, 1<<20)
	seq := func(b *testing.B, p string) {
		f, err := os.Open(p)
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		n, err := io.CopyBuffer(io.Discard, struct{ io.Reader }{f}, buf)
		if err != nil || n != size {
			b.Fatalf("read %d: %v", n, err)
		}
	}
	id := 0
	fresh := func(b *testing.B) string {
		id++
		name := fmt.Sprintf("t%d", id)
		if _, err := c.Add(ctx, name, url, 0); err != nil {
			b.Fatal(err)
		}
		return filepath.Join(mnt, name)
	}
	b.Run("TTFB", func(b *testing.B) {
		for b.Loop() {
			b.StopTimer()
			p := fresh(b)
			b.StartTimer()
			f, err := os.Open(p)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := f.ReadAt(buf[:4096], 0); err != nil {
				b.Fatal(err)
			}
			f.Close()
		}
	})
	b.Run("ColdSeq", func(b *testing.B) {
		b.SetBytes(size)
		for b.Loop() {
			b.StopTimer()
			p := fresh(b)
			b.StartTimer()
			seq(b, p)
		}
	})
	b.Run("SourceDirect", func(b *testing.B) {
		b.SetBytes(size)
		for b.Loop() {
			resp, err := http.Get(url)
			if err != nil {
				b.Fatal(err)
			}
			n, err := io.CopyBuffer(io.Discard, resp.Body, buf)
			resp.Body.Close()
			if err != nil || n != size {
				b.Fatalf("GET %d: %v", n, err)
			}
		}
	})
	p := fresh(b)
	seq(b, p)
	tm, _ := c.Get(filepath.Base(p))
	for !tm.Complete() {
		time.Sleep(10 * time.Millisecond)
	}
	b.Run("WarmMount", func(b *testing.B) {
		b.SetBytes(size)
		seq(b, p) // page cache of the passthrough file
		for b.Loop() {
			seq(b, p)
		}
	})
	b.Run("WarmDirect", func(b *testing.B) {
		b.SetBytes(size)
		seq(b, tm.DataPath())
		for b.Loop() {
			seq(b, tm.DataPath())
		}
	})
	b.Logf("passthrough=%v daemon READs=%d", m.Passthrough(), m.Reads())
}
