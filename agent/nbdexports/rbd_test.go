package nbdexports

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stowage/stowage/agent/exports"
	"github.com/stowage/stowage/errdefs"
)

// TestRBDExportLeavesNoKey: an RBD export that cannot be made leaves
// nothing behind, above all not the cephx key it was given: a key that
// is not base64 is refused before anything is written, an agent without a
// run directory refuses, and one whose daemon cannot reach the cluster (no
// monitor listens) fails within the daemon's ready timeout with the key
// file, the export and its state entry gone. (Exports of a real cluster's
// images: drivers/rbd and cmd/stowage's TestRBDStoreEndToEnd.)
func TestRBDExportLeavesNoKey(t *testing.T) {
	needBin(t, "qemu-storage-daemon")
	key := "AQDKcFNnAAAAABAAS2V5S2V5S2V5S2V5S2V5S2V5Sw=="
	img := RBDImage{Pool: "p", Image: "volume-v1", User: "stowage", Key: key, Mons: []string{closedPort(t)}}

	bare := New(nil)
	bare.SetAddress("127.0.0.1:1")
	if _, err := bare.ExportRBD(img, false, time.Time{}, exports.Owner{}); !errors.Is(err, errdefs.ErrNotImplemented) {
		t.Errorf("an agent without a run directory: %v, want not implemented", err)
	}

	run := runDir(t)
	state := filepath.Join(filepath.Dir(run), "nbd-exports.json")
	s := New(nil, WithQcow2(run, ""), WithStateFile(state))
	s.SetAddress("127.0.0.1:1")
	bad := img
	bad.Key = "not base64!"
	if _, err := s.ExportRBD(bad, false, time.Time{}, exports.Owner{}); !errors.Is(err, errdefs.ErrInvalid) || strings.Contains(err.Error(), bad.Key) {
		t.Errorf("a key that is not base64: %v, want invalid, without the key", err)
	}
	t0 := time.Now()
	_, err := s.ExportRBD(img, false, time.Time{}, exports.Owner{})
	if err == nil {
		t.Fatal("an export of an image of a cluster nobody runs succeeded")
	}
	if strings.Contains(err.Error(), key) {
		t.Errorf("the error quotes the key: %v", err)
	}
	t.Logf("refused after %s: %v", time.Since(t0).Round(time.Millisecond), err)
	left, _ := filepath.Glob(filepath.Join(run, "*"))
	for _, f := range left {
		if b, _ := os.ReadFile(f); strings.Contains(string(b), key) || strings.HasSuffix(f, ".key") {
			t.Errorf("a failed export left %s (with the key)", f)
		}
	}
	if n := len(s.List()); n != 0 {
		t.Errorf("%d exports listed after a failed one", n)
	}
	if b, err := os.ReadFile(state); err == nil && strings.Contains(string(b), "volume-v1") {
		t.Errorf("the state file records the failed export:\n%s", b)
	}
}

// closedPort is a loopback host:port nothing listens on.
func closedPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}
