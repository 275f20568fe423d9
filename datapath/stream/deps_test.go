package stream

import (
	"os/exec"
	"strings"
	"testing"
)

// TestNoControllerImports keeps the data path free of the control plane:
// datapath/ must never import controller/ or Badger.
func TestNoControllerImports(t *testing.T) {
	if testing.Short() {
		t.Skip("runs go list")
	}
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("no go toolchain")
	}
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	for _, p := range strings.Fields(string(out)) {
		if strings.HasPrefix(p, "github.com/stowage/stowage/controller") || strings.Contains(p, "dgraph-io/badger") {
			t.Errorf("datapath/stream depends on %s", p)
		}
	}
}
