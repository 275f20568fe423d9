package main

import (
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// goList runs `go list` over the module with a template, one line per package.
func goList(t *testing.T, format string) []string {
	t.Helper()
	out, err := exec.Command("go", "list", "-f", format, "github.com/stowage/stowage/...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	return strings.Split(strings.TrimSpace(string(out)), "\n")
}

// TestArchitecture enforces the layering of docs/architecture.md.
func TestArchitecture(t *testing.T) {
	const mod = "github.com/stowage/stowage/"
	for _, line := range goList(t, `{{.ImportPath}} {{join .Deps " "}}`) {
		fields := strings.Fields(line)
		pkg, deps := fields[0], fields[1:]
		for _, d := range deps {
			if strings.HasPrefix(pkg, mod+"datapath") && (strings.HasPrefix(d, mod+"controller") || strings.HasPrefix(d, "github.com/dgraph-io/badger")) {
				t.Errorf("%s imports %s: datapath must not know the controller or Badger", pkg, d)
			}
			if strings.HasPrefix(d, "github.com/dgraph-io/badger") && !strings.HasPrefix(pkg, mod+"controller/meta") && !importsMeta(deps) {
				t.Errorf("%s imports Badger outside controller/meta", pkg)
			}
			if strings.HasPrefix(pkg, mod+"drivers") && (strings.HasPrefix(d, mod+"controller") || strings.HasPrefix(d, mod+"agent")) {
				t.Errorf("%s imports %s: drivers must know neither the controller nor the agent", pkg, d)
			}
			if strings.HasPrefix(pkg, mod+"datapath") && (strings.HasPrefix(d, mod+"agent") || strings.HasPrefix(d, mod+"drivers") ||
				strings.HasPrefix(d, mod+"hostops") || strings.HasPrefix(d, mod+"proto") || strings.HasPrefix(d, "connectrpc.com/")) {
				t.Errorf("%s imports %s: datapath knows no agent, driver, RPC or API", pkg, d)
			}
			if strings.HasPrefix(pkg, mod+"controller") && strings.HasPrefix(d, mod+"agent") {
				t.Errorf("%s imports %s: the controller reaches agents only through hostops", pkg, d)
			}
			if pkg == mod+"redact" && strings.Contains(strings.SplitN(d, "/", 2)[0], ".") {
				t.Errorf("%s imports %s: redact is a leaf every layer imports, standard library only", pkg, d)
			}
			if strings.HasPrefix(pkg, mod+"hostops") && (strings.HasPrefix(d, mod+"agent") || strings.HasPrefix(d, mod+"controller")) {
				t.Errorf("%s imports %s: hostops is neither the agent nor the controller", pkg, d)
			}
		}
	}
	// Production code never imports "testing", except the conformance suites
	// that exist to be imported by tests.
	for _, line := range goList(t, `{{.ImportPath}} {{join .Imports " "}}`) {
		fields := strings.Fields(line)
		if strings.HasSuffix(fields[0], "test") {
			continue
		}
		for _, imp := range fields[1:] {
			if imp == "testing" {
				t.Errorf("%s imports testing in production code", fields[0])
			}
		}
	}
}

// importsMeta reports whether Badger arrives through controller/meta.
func importsMeta(deps []string) bool {
	for _, d := range deps {
		if d == "github.com/stowage/stowage/controller/meta" {
			return true
		}
	}
	return false
}

// TestPackageDocs: every package has a doc comment.
func TestPackageDocs(t *testing.T) {
	for _, line := range goList(t, `{{.ImportPath}}|{{.Doc}}`) {
		pkg, doc, _ := strings.Cut(line, "|")
		if strings.Contains(pkg, "/proto/gen/") {
			continue
		}
		if strings.TrimSpace(doc) == "" {
			t.Errorf("package %s has no package doc comment", pkg)
		}
	}
}

// hostPathInController matches what building a host path or a store layout
// in controller/ looks like: a store's "path" detail, the old
// datastore.Path, path joins, and the filesystem provider's layout
// directories as string literals.
var hostPathInController = regexp.MustCompile(`Details\(\)\["path"\]|Details\["path"\]|datastore\.Path\(|filepath\.Join|path\.Join|"(volumes|templates|snapshots)/`)

// TestControllerSpeaksObjects fails the build when controller/ builds a
// host path or a store layout string: where an object lives on its store is
// its driver's business (drivers.Driver.Locate), the controller only
// records the key.
func TestControllerSpeaksObjects(t *testing.T) {
	root := filepath.Join("..", "..", "controller")
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(p, ".go") || strings.HasSuffix(p, "_test.go") {
			return err
		}
		if strings.Contains(filepath.ToSlash(p), "controller/meta/") {
			return nil // the controller's own database directory, not a store
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		for i, line := range strings.Split(string(b), "\n") {
			if m := hostPathInController.FindString(line); m != "" {
				t.Errorf("%s:%d builds a host path or store layout (%s): ask the store's driver instead", p, i+1, m)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
