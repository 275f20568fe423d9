package nbdexports

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stowage/stowage/agent/exports"
)

// TestOwnersListedAndRestored: every export records its Owner and when it
// was made; List answers them under the URIs Export returned, a restart
// (Load) keeps them, and an Unexport removes its export from the listing.
func TestOwnersListedAndRestored(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "nbd-exports.json")
	p := image(t, dir, "v.raw", "DATA")
	a := exports.Owner{TaskID: "job-1.attach.export_nbd-0123456789ab", ParentID: "job-1.attach", Store: "s1", Key: "volumes/v.raw"}
	b := exports.Owner{TaskID: "job-2.copy.export_nbd-0123456789ab", ParentID: "job-2.copy", Store: "s1", Key: "volumes/v.raw"}
	before := time.Now()
	exp := time.Now().Add(time.Hour).Truncate(time.Second)

	s1 := New(quiet(), WithStateFile(state))
	if l := s1.List(); l != nil {
		t.Fatalf("listed before an address is known: %+v", l)
	}
	addr, stop := serve(t, s1, "127.0.0.1:0")
	ua, err := s1.Export(p, false, time.Time{}, a)
	if err != nil {
		t.Fatal(err)
	}
	ub, err := s1.Export(p, true, exp, b)
	if err != nil {
		t.Fatal(err)
	}
	check := func(s *Server) {
		t.Helper()
		got := map[string]Info{}
		for _, i := range s.List() {
			got[i.URI] = i
		}
		ia, ib := got[ua], got[ub]
		if len(got) != 2 || ia.Owner != a || ib.Owner != b || ia.Path != p || ia.ReadOnly || !ib.ReadOnly || !ia.Expires.IsZero() || !ib.Expires.Equal(exp) {
			t.Fatalf("listed %+v", got)
		}
		for _, i := range []Info{ia, ib} {
			if i.Created.Before(before.Truncate(time.Second)) || i.Created.After(time.Now()) {
				t.Errorf("created %v", i.Created)
			}
		}
	}
	check(s1)
	stop()

	s2 := New(quiet(), WithStateFile(state))
	if err := s2.Load(nil); err != nil {
		t.Fatal(err)
	}
	_, stop2 := serve(t, s2, addr) // the same --nbd-listen: the same URIs
	defer stop2()
	check(s2)
	if got, err := readHead(ua, 4, nil); err != nil || got != "DATA" {
		t.Fatalf("restored export: %q %v", got, err)
	}
	if err := s2.Unexport(ub); err != nil {
		t.Fatal(err)
	}
	if l := s2.List(); len(l) != 1 || l[0].URI != ua {
		t.Fatalf("after Unexport: %+v", l)
	}
}

// TestLoadsStateWithoutOwners: a state file written before exports
// recorded their owners loads; its exports are listed with an empty Owner
// and no creation time, and serve as before.
func TestLoadsStateWithoutOwners(t *testing.T) {
	dir := t.TempDir()
	p := image(t, dir, "old.raw", "OLDDATA")
	name := "00112233445566778899aabbccddeeff"
	exp := time.Now().Add(time.Hour).UTC().Format(time.RFC3339Nano)
	// Exactly what the previous code wrote.
	old := fmt.Sprintf(`{"version":1,"exports":[{"name":%q,"path":%q,"read_only":true,"expires":%q}]}`, name, p, exp)
	state := filepath.Join(dir, "nbd-exports.json")
	if err := os.WriteFile(state, []byte(old), 0o600); err != nil {
		t.Fatal(err)
	}
	s := New(quiet(), WithStateFile(state))
	if err := s.Load(nil); err != nil {
		t.Fatal(err)
	}
	addr, stop := serve(t, s, "127.0.0.1:0")
	defer stop()
	l := s.List()
	if len(l) != 1 || l[0].URI != "nbd://"+addr+"/"+name || l[0].Owner != (exports.Owner{}) || !l[0].Created.IsZero() || !l[0].ReadOnly || l[0].Expires.IsZero() {
		t.Fatalf("listed %+v", l)
	}
	if got, err := readHead(l[0].URI, 7, nil); err != nil || got != "OLDDATA" {
		t.Fatalf("old export: %q %v", got, err)
	}
}
