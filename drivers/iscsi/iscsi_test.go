package iscsi

import (
	"errors"
	"strings"
	"testing"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

func TestParseStore(t *testing.T) {
	details := map[string]string{DetailTargetHost: "h1", DetailBackingDir: "/srv/san1"}
	s, err := parseStore("s1", "iscsi://10.0.0.5/iqn.2026-12.org.example:san1", details)
	if err != nil || s.portal != "10.0.0.5:3260" || s.iqn != "iqn.2026-12.org.example:san1" || s.targetHost != "h1" || s.dir != "/srv/san1" {
		t.Fatalf("%+v %v", s, err)
	}
	for _, c := range []struct {
		url     string
		details map[string]string
	}{
		{"iscsi://10.0.0.5/IQN.2026-12.org.example:san1", details},                                                            // upper case
		{"iscsi://10.0.0.5/eui.02004567a425678d", details},                                                                    // not an iqn. name
		{"iscsi://u:p@10.0.0.5/iqn.2026-12.org.example:san1", details},                                                        // credentials in the URL
		{"iscsi://10.0.0.5/iqn.2026-12.org.example:san1?x=1", details},                                                        // a query
		{"file:///srv/san1", details},                                                                                         // not iSCSI
		{"iscsi://10.0.0.5/iqn.2026-12.org.example:san1", nil},                                                                // no details
		{"iscsi://10.0.0.5/iqn.2026-12.org.example:san1", map[string]string{DetailTargetHost: "h1", DetailBackingDir: "rel"}}, // relative dir
	} {
		if _, err := parseStore("s1", c.url, c.details); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("%s %v: %v, want invalid", c.url, c.details, err)
		}
	}
}

func TestCHAPAndNames(t *testing.T) {
	key := []byte("0123456789abcdef0123456789abcdef")
	u1, s1 := CHAP(key, "store-a", "h1")
	u2, s2 := CHAP(key, "store-b", "h1")
	u3, s3 := CHAP(key, "store-a", "h2")
	// tgtd's accounts are global: two stores on one tgtd must not share
	// a host's user, or one store's secret replaces the other's.
	if len(s1) != 16 || s1 == s2 || s1 == s3 || u1 == u2 || u1 == u3 || u2 == u3 {
		t.Fatalf("users and secrets must differ per store and host: %s/%s %s/%s %s/%s", u1, s1, u2, s2, u3, s3)
	}
	if again, s := CHAP(key, "store-a", "h1"); again != u1 || s != s1 {
		t.Fatal("CHAP is not deterministic")
	}
	if _, other := CHAP([]byte("another key another key another."), "store-a", "h1"); other == s1 {
		t.Fatal("the secret does not depend on the key")
	}
	if n := InitiatorName("Host_1.Rack"); n != "iqn.2026-12.org.stowage:host.host-1.rack" || !validIQN(n) {
		t.Fatalf("initiator name %q", n)
	}
	d := &Driver{}
	if _, err := d.initiator(store{id: "s"}, "h1"); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("no CHAP key: %v", err)
	}
}

func TestLocateAndGrantURI(t *testing.T) {
	d := &Driver{chapKey: []byte("0123456789abcdef0123456789abcdef")}
	k, err := d.Locate(drivers.DataObject{ID: "v1", Type: drivers.ObjectVolume})
	if err != nil || k != "luns/volume-v1.lun" {
		t.Fatalf("%q %v", k, err)
	}
	for _, id := range []string{"", "..", "a/b", "x\x00"} {
		if _, err := d.Locate(drivers.DataObject{ID: id, Type: drivers.ObjectVolume}); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("id %q: %v", id, err)
		}
	}
	s := store{id: "s1", portal: "10.0.0.5:3260", iqn: "iqn.2026-12.org.example:san1"}
	u, err := d.lunURI(s, "h1", 3)
	_, secret := CHAP(d.chapKey, "s1", "h1")
	if err != nil || !strings.HasPrefix(string(u), "iscsi://stw-") || !strings.Contains(string(u), ":"+secret+"@10.0.0.5:3260/iqn.2026-12.org.example:san1/3?initiator=") {
		t.Fatalf("grant %q %v", u, err)
	}
	if lunSize(drivers.DataObject{Size: 1000, Format: drivers.FormatRaw}) != 1024 {
		t.Fatal("a raw LUN is its size rounded to sectors")
	}
	if q := lunSize(drivers.DataObject{Size: 64 << 20, Format: drivers.FormatQCOW2}); q < 64<<20+8<<20 {
		t.Fatalf("a qcow2 copy needs room for its metadata: %d", q)
	}
}
