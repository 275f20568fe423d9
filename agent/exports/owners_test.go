package exports

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestOwnersListedAndRestored: an export records its maker's Owner and
// when it was made, later Exports of the same file are listed as sharing
// it, and a restart (Load) keeps all of it; an Unexport that ends it
// removes it from the listing.
func TestOwnersListedAndRestored(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "exports.json")
	p := filepath.Join(dir, "v.raw")
	if err := os.WriteFile(p, []byte("DATA"), 0o600); err != nil {
		t.Fatal(err)
	}
	maker := Owner{TaskID: "job-1.copy.export-0123456789ab", ParentID: "job-1.copy", Store: "s1", Key: "volumes/v.raw"}
	joiner := Owner{TaskID: "job-2.copy.export-0123456789ab", ParentID: "job-2.copy", Store: "s1", Key: "volumes/v.raw"}
	before := time.Now()
	exp := time.Now().Add(time.Hour).Truncate(time.Second)

	x1 := New(WithStateFile(state), WithBaseURL("http://agent:8471"))
	u, err := x1.Export(p, exp, maker)
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range []Owner{joiner, maker, joiner, {}} { // the maker, a repeat and no owner add nothing
		if again, err := x1.Export(p, exp, o); err != nil || again != u {
			t.Fatalf("export again: %q %v", again, err)
		}
	}
	check := func(x *Server, users int) {
		t.Helper()
		l := x.List()
		if len(l) != 1 {
			t.Fatalf("listed %d exports, want 1: %+v", len(l), l)
		}
		i := l[0]
		tok, _ := TokenOf(u)
		if !strings.HasSuffix(i.URL, Prefix+tok) || i.Path != p || i.Owner != maker || !i.Expires.Equal(exp) || i.Users != users {
			t.Errorf("listed %+v", i)
		}
		if i.Created.Before(before.Truncate(time.Second)) || i.Created.After(time.Now()) {
			t.Errorf("created %v", i.Created)
		}
		if len(i.SharedWith) != 1 || i.SharedWith[0] != joiner {
			t.Errorf("shared with %+v, want only %+v", i.SharedWith, joiner)
		}
	}
	check(x1, 5)

	x2 := New(WithStateFile(state), WithBaseURL("http://agent:8471"))
	if err := x2.Load(nil); err != nil {
		t.Fatal(err)
	}
	check(x2, 5)
	for range 5 {
		if err := x2.Unexport(u); err != nil {
			t.Fatal(err)
		}
	}
	if l := x2.List(); len(l) != 0 {
		t.Fatalf("after the last Unexport: %+v", l)
	}
}

// TestSharedWithIsBounded: a file exported again and again by ever new
// tasks records only the latest MaxSharedWith of them.
func TestSharedWithIsBounded(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "t.qcow2")
	os.WriteFile(p, []byte("T"), 0o600)
	x := New(WithBaseURL("http://agent:8471"))
	for i := range MaxSharedWith + 5 {
		if _, err := x.Export(p, time.Time{}, Owner{ParentID: fmt.Sprintf("job-%d.mount", i)}); err != nil {
			t.Fatal(err)
		}
	}
	l := x.List()
	if len(l) != 1 || len(l[0].SharedWith) != MaxSharedWith || l[0].SharedWith[MaxSharedWith-1].ParentID != fmt.Sprintf("job-%d.mount", MaxSharedWith+4) ||
		l[0].Owner.ParentID != "job-0.mount" || l[0].Users != MaxSharedWith+5 {
		t.Fatalf("listed %+v", l)
	}
}

// TestLoadsStateWithoutOwners: a state file written before exports
// recorded their owners (version 1, no owner, created nor shared_with)
// loads; its exports are listed with an empty Owner and no creation time,
// and work as before.
func TestLoadsStateWithoutOwners(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "old.raw")
	if err := os.WriteFile(p, []byte("OLD"), 0o600); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	tok := "00112233445566778899aabbccddeeff"
	exp := time.Now().Add(time.Hour).UTC().Format(time.RFC3339Nano)
	// Exactly what the previous code wrote (saved without the new fields).
	old := fmt.Sprintf(`{"version":1,"exports":[{"token":%q,"path":%q,"dev":%d,"ino":%d,"users":2,"expires":%q}]}`, tok, p, st.Dev, st.Ino, exp)
	state := filepath.Join(dir, "exports.json")
	if err := os.WriteFile(state, []byte(old), 0o600); err != nil {
		t.Fatal(err)
	}
	x := New(WithStateFile(state), WithBaseURL("http://agent:8471"))
	if err := x.Load(nil); err != nil {
		t.Fatal(err)
	}
	l := x.List()
	if len(l) != 1 || l[0].URL != "http://agent:8471"+Prefix+tok || l[0].Owner != (Owner{}) || !l[0].Created.IsZero() || l[0].SharedWith != nil || l[0].Users != 2 {
		t.Fatalf("listed %+v", l)
	}
	srv := httptest.NewServer(x)
	defer srv.Close()
	if code, body := get(t, srv.URL+Prefix+tok); code != http.StatusOK || body != "OLD" {
		t.Fatalf("old export serves %d %q", code, body)
	}
	// A new Export joining it records its owner; the state keeps it.
	o := Owner{ParentID: "job-3.copy", Store: "s1", Key: "old.raw"}
	if _, err := x.Export(p, time.Time{}, o); err != nil {
		t.Fatal(err)
	}
	x2 := New(WithStateFile(state), WithBaseURL("http://agent:8471"))
	if err := x2.Load(nil); err != nil {
		t.Fatal(err)
	}
	if l := x2.List(); len(l) != 1 || l[0].Owner != (Owner{}) || len(l[0].SharedWith) != 1 || l[0].SharedWith[0] != o || !l[0].Expires.IsZero() {
		t.Fatalf("after a joining Export and a restart: %+v", l)
	}
}
