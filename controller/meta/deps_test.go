package meta

import (
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// etcdAllowed are the files that may import etcd: the backend, the
// leader election on it, and the tests that start an etcd server.
var etcdAllowed = map[string]bool{
	filepath.Join("controller", "meta", "etcd.go"):          true,
	filepath.Join("controller", "meta", "leader.go"):        true,
	filepath.Join("controller", "meta", "main_test.go"):     true,
	filepath.Join("controller", "meta", "etcdauth_test.go"): true,
}

// TestBadgerConfined enforces the storage seam: in the whole module only
// controller/meta/badger.go imports Badger and only the etcd backend
// imports etcd, so the engines stay interchangeable behind kvStore.
func TestBadgerConfined(t *testing.T) {
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		t.Fatalf("module root not found at %s: %v", root, err)
	}
	allowed := filepath.Join("controller", "meta", "badger.go")
	checked := 0
	err = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if name := d.Name(); path != root && (strings.HasPrefix(name, ".") || name == "vendor" || name == "testdata") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") {
			return nil
		}
		f, err := parser.ParseFile(token.NewFileSet(), path, nil, parser.ImportsOnly)
		if err != nil {
			return nil // not ours to judge here; the build reports it
		}
		checked++
		rel, _ := filepath.Rel(root, path)
		for _, imp := range f.Imports {
			p, _ := strconv.Unquote(imp.Path.Value)
			if strings.HasPrefix(p, "github.com/dgraph-io/badger") && rel != allowed {
				t.Errorf("%s imports %s; only %s may", rel, p, allowed)
			}
			if strings.HasPrefix(p, "go.etcd.io/etcd/") && !etcdAllowed[rel] {
				t.Errorf("%s imports %s; only the etcd backend of controller/meta may", rel, p)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if checked == 0 {
		t.Fatal("no Go files checked")
	}
}

// TestDocListsEveryIndex keeps the key layout in doc.go true: every index
// of every kind is listed there, and nothing else is.
func TestDocListsEveryIndex(t *testing.T) {
	src, err := os.ReadFile("doc.go")
	if err != nil {
		t.Fatal(err)
	}
	documented := map[string]bool{}
	for _, f := range strings.Fields(string(src)) {
		for _, p := range []string{indexPrefix, uniquePrefix} {
			if strings.HasPrefix(f, p) && strings.Count(f, "/") >= 3 && !strings.Contains(f, "<kind>") {
				parts := strings.SplitN(f, "/", 4)
				documented[strings.Join(parts[:3], "/")] = true
			}
		}
	}
	kinds := []struct {
		name    string
		indexes []IndexInfo
	}{
		{Stores.Name(), Stores.Indexes()},
		{Hosts.Name(), Hosts.Indexes()},
		{Templates.Name(), Templates.Indexes()},
		{TemplatesOnStore.Name(), TemplatesOnStore.Indexes()},
		{Volumes.Name(), Volumes.Indexes()},
		{Snapshots.Name(), Snapshots.Indexes()},
		{SnapshotsOnStore.Name(), SnapshotsOnStore.Indexes()},
		{Jobs.Name(), Jobs.Indexes()},
		{JoinTokens.Name(), JoinTokens.Indexes()},
		{Tokens.Name(), Tokens.Indexes()},
	}
	if len(kinds) != len(allKinds) {
		t.Fatalf("test knows %d kinds, the package %d", len(kinds), len(allKinds))
	}
	for _, k := range kinds {
		if !strings.Contains(string(src), "//\t"+k.name+"/<id>") {
			t.Errorf("doc.go does not list records %s/<id>", k.name)
		}
		for _, ix := range k.indexes {
			p := indexPrefix
			if ix.Unique {
				p = uniquePrefix
			}
			key := p + k.name + "/" + ix.Field
			if !documented[key] {
				t.Errorf("doc.go does not list %s", key)
			}
			delete(documented, key)
		}
	}
	for key := range documented {
		t.Errorf("doc.go lists %s, which no kind has", key)
	}
}
