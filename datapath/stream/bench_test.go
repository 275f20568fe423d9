package stream

import (
	"context"
	"crypto/sha256"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/zeebo/xxh3"
)

// The inner loops of the engine, per 4 MiB chunk (b.SetBytes: MB/s).

func benchChunk(random bool) []byte {
	b := make([]byte, DefaultChunkSize)
	if random {
		r := rand.New(rand.NewPCG(1, 1))
		for i := range b {
			b[i] = byte(r.Uint32()) | 1
		}
	}
	return b
}

func BenchmarkIsZeroAllZero(b *testing.B) {
	buf := benchChunk(false)
	b.SetBytes(int64(len(buf)))
	for b.Loop() {
		if !isZero(buf) {
			b.Fatal("not zero")
		}
	}
}

// BenchmarkZeroRunsData is zero detection at 4 KiB granularity over data:
// each block stops at its first non-zero byte, so data costs almost nothing;
// BenchmarkZeroRunsZeros is the full-compare case.
func BenchmarkZeroRunsData(b *testing.B) {
	buf := benchChunk(true)
	b.SetBytes(int64(len(buf)))
	for b.Loop() {
		zeroRuns(buf, 0, DefaultZeroBlock, func(int, int, bool) error { return nil })
	}
}

func BenchmarkZeroRunsZeros(b *testing.B) {
	buf := benchChunk(false)
	b.SetBytes(int64(len(buf)))
	for b.Loop() {
		zeroRuns(buf, 0, DefaultZeroBlock, func(int, int, bool) error { return nil })
	}
}

func BenchmarkChunkHashXXH3(b *testing.B) {
	buf := benchChunk(true)
	b.SetBytes(int64(len(buf)))
	for b.Loop() {
		xxh3.Hash(buf)
	}
}

func BenchmarkChunkHashSHA256(b *testing.B) {
	buf := benchChunk(true)
	h := sha256.New()
	b.SetBytes(int64(len(buf)))
	for b.Loop() {
		h.Write(buf)
	}
}

// benchCopy copies a 64 MiB file (warm: it was just written) into the same
// temporary directory; the number includes the final fsync and rename.
func benchCopy(b *testing.B, l layout, o Options) {
	dir := b.TempDir()
	path, _ := makeImage(b, dir, l, 1)
	out := filepath.Join(dir, "out")
	ctx := context.Background()
	b.SetBytes(l.size)
	for b.Loop() {
		src, err := OpenSource(ctx, path, SourceOptions{})
		if err != nil {
			b.Fatal(err)
		}
		dst, err := OpenSink(ctx, out, src.Size(), SinkOptions{})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := Copy(ctx, src, dst, o); err != nil {
			b.Fatal(err)
		}
		src.Close()
		os.Remove(out)
	}
}

var benchDense = layout{name: "dense", size: 64 << 20, parts: []part{{0, 64 << 20, false}}}

var benchSparse = layout{name: "sparse", size: 256 << 20, parts: []part{
	{1 << 20, 1 << 20, false}, {40 << 20, 2 << 20, false}, {100 << 20, 1 << 20, true},
	{130 << 20, 3 << 20, false}, {200 << 20, 1 << 20, false}, {255 << 20, 1 << 20, false},
}}

func BenchmarkCopyDenseWarm(b *testing.B) { benchCopy(b, benchDense, Options{}) }

func BenchmarkCopyDenseWarmSHA256(b *testing.B) { benchCopy(b, benchDense, Options{SHA256: true}) }

// BenchmarkCopySparse reports MB/s of virtual size (7 MiB of data in 256 MiB).
func BenchmarkCopySparse(b *testing.B) { benchCopy(b, benchSparse, Options{}) }

func BenchmarkVerifyDenseWarm(b *testing.B) {
	dir := b.TempDir()
	path, _ := makeImage(b, dir, benchDense, 1)
	other := filepath.Join(dir, "other")
	ctx := context.Background()
	src, _ := OpenSource(ctx, path, SourceOptions{})
	dst, _ := OpenSink(ctx, other, src.Size(), SinkOptions{})
	if _, err := Copy(ctx, src, dst, Options{Mode: CopyReadWrite}); err != nil {
		b.Fatal(err)
	}
	src.Close()
	b.SetBytes(benchDense.size)
	for b.Loop() {
		x, _ := OpenSource(ctx, path, SourceOptions{ReadMode: ReadBuffered})
		y, _ := OpenSource(ctx, other, SourceOptions{ReadMode: ReadBuffered})
		if _, err := Verify(ctx, x, y, VerifyOptions{}); err != nil {
			b.Fatal(err)
		}
		x.Close()
		y.Close()
	}
}
