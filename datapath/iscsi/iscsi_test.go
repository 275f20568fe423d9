package iscsi_test

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stowage/stowage/agent/iscsi/tgt"
	"github.com/stowage/stowage/datapath/iscsi"
	"github.com/stowage/stowage/datapath/iscsi/tgttest"
	"github.com/stowage/stowage/errdefs"
)

const (
	targetIQN = "iqn.2026-12.io.stowage:dp"
	initiator = "iqn.2026-12.io.stowage:host1"
	chapUser  = "host1"
	chapPass  = "chap-secret-0123"
	lunSize   = 64 << 20
)

// setup starts tgtd with one CHAP-protected target that allows initiator,
// and returns a function that adds a LUN backed by a new file (sparse, or
// filled with random bytes when dense) and returns its Target and backing.
func setup(t *testing.T) (newLUN func(dense, thin bool) (iscsi.Target, string)) {
	t.Helper()
	tgttest.Require(t, "qemu-img", "qemu-io")
	portal, ctl := tgttest.Start(t)
	ctx := t.Context()
	m := tgt.New(tgt.WithControlPort(ctl), tgt.WithLogger(slog.New(slog.NewTextHandler(t.Output(), nil))))
	if err := m.EnsureTarget(ctx, targetIQN); err != nil {
		t.Fatal(err)
	}
	if err := m.Allow(ctx, targetIQN, initiator); err != nil {
		t.Fatal(err)
	}
	if err := m.SetCHAP(ctx, targetIQN, chapUser, chapPass); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	i := 0
	thick := tgt.New(tgt.WithControlPort(ctl), tgt.WithThinProvisioning(false), tgt.WithLogger(slog.New(slog.NewTextHandler(t.Output(), nil))))
	return func(dense, thin bool) (iscsi.Target, string) {
		t.Helper()
		i++
		backing := filepath.Join(dir, fmt.Sprintf("lun%d.raw", i))
		if dense {
			buf := make([]byte, lunSize)
			rand.Read(buf)
			if err := os.WriteFile(backing, buf, 0o600); err != nil {
				t.Fatal(err)
			}
		} else if err := os.WriteFile(backing, nil, 0o600); err != nil || os.Truncate(backing, lunSize) != nil {
			t.Fatal(err)
		}
		add := m.AddLUN
		if !thin {
			add = thick.AddLUN
		}
		n, err := add(ctx, targetIQN, backing)
		if err != nil {
			t.Fatal(err)
		}
		return iscsi.Target{Portal: portal, IQN: targetIQN, LUN: n, User: chapUser, Secret: chapPass, Initiator: initiator}, backing
	}
}

// qcow2 makes a 64 MiB qcow2 image with qemu-io writes ("write -P 0xab
// 0 1M", ...) and returns its path.
func qcow2(t *testing.T, writes ...string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "src.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", p, fmt.Sprint(lunSize)).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v: %s", err, out)
	}
	args := []string{"-f", "qcow2"}
	for _, w := range writes {
		args = append(args, "-c", w)
	}
	if out, err := exec.Command("qemu-io", append(args, p)...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v: %s", err, out)
	}
	return p
}

func allocated(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func TestWriteCompareRead(t *testing.T) {
	newLUN := setup(t)
	ctx := t.Context()
	dst, backing := newLUN(false, true)
	src := qcow2(t, "write -P 0xab 0 1M", "write -P 0xcd 30M 2M", "write -P 0x11 63M 1M", "write -P 0x5a 40000k 4k")

	if size, err := iscsi.Size(ctx, dst); err != nil || size != lunSize {
		t.Fatalf("Size = %d, %v", size, err)
	}
	var calls int
	var last, total int64
	err := iscsi.Write(ctx, src, "qcow2", dst, func(d, tot int64) { calls++; last, total = d, tot }, iscsi.TargetIsZero())
	if err != nil {
		t.Fatal(err)
	}
	if calls == 0 || last != lunSize || total != lunSize {
		t.Errorf("progress: %d calls, last %d/%d", calls, last, total)
	}
	if err := iscsi.Compare(ctx, dst, src, "qcow2"); err != nil {
		t.Fatal(err)
	}
	t.Logf("4.004 MiB of data: backing allocates %d KiB", allocated(t, backing)>>10)

	// Read back to a raw file: byte-equal with the source as raw, sparse.
	back := filepath.Join(t.TempDir(), "back.raw")
	if err := iscsi.Read(ctx, dst, back, "raw"); err != nil {
		t.Fatal(err)
	}
	want := filepath.Join(t.TempDir(), "want.raw")
	if out, err := exec.Command("qemu-img", "convert", "-f", "qcow2", "-O", "raw", src, want).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	a, _ := os.ReadFile(back)
	b, _ := os.ReadFile(want)
	if len(a) != lunSize || !bytes.Equal(a, b) {
		t.Fatalf("read back %d bytes, differs from the source", len(a))
	}
	if got := allocated(t, back); got > 6<<20 {
		t.Errorf("read-back file allocates %d bytes for 4 MiB of data", got)
	}

	// A change on the LUN is found by Compare.
	if out, err := exec.Command("qemu-io", "-f", "raw", "-c", "write -P 0x77 8M 4k", back).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if err := iscsi.Write(ctx, back, "raw", dst, nil); err != nil {
		t.Fatal(err)
	}
	if err := iscsi.Compare(ctx, dst, src, "qcow2"); !errors.Is(err, errdefs.ErrDataLoss) || !strings.Contains(err.Error(), "8388608") {
		t.Fatalf("Compare after a change: %v, want data loss at offset 8388608", err)
	}
}

// A 10%-dense image allocates about 10% of the LUN's backing: on a fresh
// sparse LUN with TargetIsZero (holes skipped), and on a LUN full of old
// data without it (holes zeroed with UNMAP, which tgt's thin provisioning
// turns into punched holes). Without thin provisioning on the LUN, the
// zeros a plain Write sends are written out: logged, not asserted.
func TestSparseAllocation(t *testing.T) {
	newLUN := setup(t)
	ctx := t.Context()
	var writes []string
	for off := int64(0); off+256<<10 <= lunSize; off += 2560 << 10 {
		writes = append(writes, fmt.Sprintf("write -P 0x%02x %d 256k", 1+len(writes), off))
	}
	data := int64(len(writes)) * 256 << 10
	src := qcow2(t, writes...)

	for _, tc := range []struct {
		name         string
		dense, thin  bool
		targetIsZero bool
	}{
		{"fresh LUN, target is zero", false, true, true},
		{"fresh LUN", false, true, false},
		{"LUN full of old data", true, true, false},
		// The contrast: without thin provisioning tgt writes the zeros out.
		{"fresh LUN without thin provisioning", false, false, false},
	} {
		dst, backing := newLUN(tc.dense, tc.thin)
		var opts []iscsi.WriteOption
		if tc.targetIsZero {
			opts = append(opts, iscsi.TargetIsZero())
		}
		if err := iscsi.Write(ctx, src, "qcow2", dst, nil, opts...); err != nil {
			t.Fatal(err)
		}
		if err := iscsi.Compare(ctx, dst, src, "qcow2"); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		got := allocated(t, backing)
		t.Logf("%s: %d KiB of data (%.1f%%), backing allocates %d KiB (%.1f%% of %d MiB)",
			tc.name, data>>10, 100*float64(data)/lunSize, got>>10, 100*float64(got)/lunSize, lunSize>>20)
		if tc.thin && got > data+data/4 {
			t.Errorf("%s: backing allocates %d bytes for %d bytes of data", tc.name, got, data)
		}
	}
}

func TestErrors(t *testing.T) {
	newLUN := setup(t)
	ctx := t.Context()
	dst, _ := newLUN(false, true)

	wrong := dst
	wrong.Secret = "wrong-secret-9876"
	_, err := iscsi.Size(ctx, wrong)
	if !errors.Is(err, errdefs.ErrUnauthenticated) || !strings.Contains(err.Error(), "CHAP") || strings.Contains(err.Error(), wrong.Secret) {
		t.Fatalf("wrong CHAP secret: %v; want unauthenticated naming CHAP, without the secret", err)
	}
	noChap := dst
	noChap.User, noChap.Secret = "", ""
	t.Logf("wrong secret: %v", err)
	if _, err := iscsi.Size(ctx, noChap); !errors.Is(err, errdefs.ErrUnauthenticated) {
		t.Fatalf("no CHAP: %v; want unauthenticated", err)
	}
	src := qcow2(t, "write -P 0xab 0 1M")
	if err := iscsi.Write(ctx, src, "qcow2", wrong, nil); !errors.Is(err, errdefs.ErrUnauthenticated) || strings.Contains(err.Error(), wrong.Secret) {
		t.Fatalf("Write with a wrong secret: %v", err)
	}

	big := filepath.Join(t.TempDir(), "big.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", big, fmt.Sprint(2*lunSize)).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if err := iscsi.Write(ctx, big, "qcow2", dst, nil); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("Write of an image larger than the LUN: %v; want failed precondition", err)
	}

	other := dst
	other.Initiator = "iqn.2026-12.io.stowage:intruder"
	if _, err := iscsi.Size(ctx, other); !errdefs.IsNotFound(err) || !strings.Contains(err.Error(), "not allowed") {
		t.Fatalf("initiator not allowed: %v; want not found", err)
	}
	noLUN := dst
	noLUN.LUN = 9
	if _, err := iscsi.Size(ctx, noLUN); !errdefs.IsNotFound(err) {
		t.Fatalf("missing LUN: %v; want not found", err)
	}

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := l.Addr().String()
	l.Close()
	down := dst
	down.Portal = closed
	if _, err := iscsi.Size(ctx, down); !errdefs.IsUnavailable(err) {
		t.Fatalf("closed portal: %v; want unavailable", err)
	}
}
