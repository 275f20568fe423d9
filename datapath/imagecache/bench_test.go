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
// file on one loopback HTTP origin (see BENCH.md). Every read, through the
// mount, of the data file or of the origin, is a loop of 1 MiB read(2)
// calls into one buffer (like dd bs=1M), discarding the bytes.
//
//	TTFB          open + 4 KiB read of a never-read template through the mount
//	ColdSeq       sequential read of a never-read template through the mount;
//	              each iteration also times one SourceDirect GET (untimed
//	              for the row, reported as source-MB/s) and reports the
//	              ratio of the two sums as cold/source
//	SourceDirect  one GET of the whole template from the origin
//	WarmMount     sequential read of a complete template through the mount
//	              (passthrough when the kernel has it), page cache warm;
//	              each iteration also times one WarmDirect read and reports
//	              warm/direct
//	WarmDirect    sequential read of that template's data file, page cache warm
//
// Templates are removed (untimed) after their iteration, so that every
// cold iteration starts from the same state instead of piling up page
// cache and writeback from the earlier ones.
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
	// readAll reads r to its end in len(buf) read calls; no ReaderFrom or
	// WriterTo shortcut picks another size.
	readAll := func(b *testing.B, r io.Reader) {
		n, err := io.CopyBuffer(struct{ io.Writer }{io.Discard}, struct{ io.Reader }{r}, buf)
		if err != nil || n != size {
			b.Fatalf("read %d: %v", n, err)
		}
	}
	seq := func(b *testing.B, p string) {
		f, err := os.Open(p)
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		readAll(b, f)
	}
	get := func(b *testing.B) {
		resp, err := http.Get(url)
		if err != nil {
			b.Fatal(err)
		}
		defer resp.Body.Close()
		readAll(b, resp.Body)
	}
	id := 0
	fresh := func(b *testing.B) (string, string) {
		id++
		name := fmt.Sprintf("t%d", id)
		if _, err := c.Add(ctx, name, url, 0); err != nil {
			b.Fatal(err)
		}
		return name, filepath.Join(mnt, name)
	}
	drop := func(b *testing.B, name string) {
		if err := c.Remove(ctx, name); err != nil {
			b.Fatal(err)
		}
	}
	mbps := func(n int, d time.Duration) float64 { return float64(n) * size / 1e6 / d.Seconds() }
	b.Run("TTFB", func(b *testing.B) {
		for b.Loop() {
			b.StopTimer()
			name, p := fresh(b)
			b.StartTimer()
			f, err := os.Open(p)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := f.ReadAt(buf[:4096], 0); err != nil {
				b.Fatal(err)
			}
			f.Close()
			b.StopTimer()
			drop(b, name)
			b.StartTimer()
		}
	})
	b.Run("ColdSeq", func(b *testing.B) {
		b.SetBytes(size)
		var cold, src time.Duration
		n := 0
		for b.Loop() {
			b.StopTimer()
			name, p := fresh(b)
			t0 := time.Now()
			get(b)
			src += time.Since(t0)
			b.StartTimer()
			t0 = time.Now()
			seq(b, p)
			cold += time.Since(t0)
			b.StopTimer()
			drop(b, name)
			n++
			b.StartTimer()
		}
		b.ReportMetric(mbps(n, src), "source-MB/s")
		b.ReportMetric(src.Seconds()/cold.Seconds(), "cold/source")
	})
	b.Run("SourceDirect", func(b *testing.B) {
		b.SetBytes(size)
		for b.Loop() {
			get(b)
		}
	})
	name, p := fresh(b)
	seq(b, p)
	tm, _ := c.Get(name)
	for !tm.Complete() {
		time.Sleep(10 * time.Millisecond)
	}
	b.Run("WarmMount", func(b *testing.B) {
		b.SetBytes(size)
		seq(b, p) // page cache of the passthrough file
		seq(b, tm.DataPath())
		var warm, direct time.Duration
		n := 0
		for b.Loop() {
			t0 := time.Now()
			seq(b, p)
			warm += time.Since(t0)
			b.StopTimer()
			t0 = time.Now()
			seq(b, tm.DataPath())
			direct += time.Since(t0)
			n++
			b.StartTimer()
		}
		b.ReportMetric(mbps(n, direct), "direct-MB/s")
		b.ReportMetric(direct.Seconds()/warm.Seconds(), "warm/direct")
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
