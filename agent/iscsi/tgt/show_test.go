package tgt

import (
	"errors"
	"os"
	"reflect"
	"testing"

	"github.com/stowage/stowage/errdefs"
)

// testdata/show-target.txt is `tgtadm --op show --mode target` from tgt
// (Debian 12) with two targets, one with five LUNs (three thin), a CHAP
// account, two ACLs and a logged-in initiator (qemu-io over libiscsi).
func TestParseShow(t *testing.T) {
	out, err := os.ReadFile("testdata/show-target.txt")
	if err != nil {
		t.Fatal(err)
	}
	got, err := parseShow(string(out))
	if err != nil {
		t.Fatal(err)
	}
	want := []Target{
		{
			TID: 1, IQN: "iqn.2026-12.io.stowage:t1",
			LUNs: []LUN{
				{Number: 1, Backing: "/tmp/tg/a.img", Size: 67_000_000, Thin: true},
				{Number: 2, Backing: "/tmp/tg/c.img", Size: 67_000_000, Thin: true},
				{Number: 3, Backing: "/tmp/tg/b.img", Size: 10_000_000},
				{Number: 4, Backing: "/tmp/tg/d.img", Size: 67_000_000, Thin: true},
				{Number: 5, Backing: "/tmp/tg/e.img", Size: 67_000_000},
			},
			Accounts: []string{"u1"},
			ACLs:     []string{"iqn.2026-12.io.client:c1", "127.0.0.1"},
			Sessions: 1,
			Nexuses:  []Nexus{{SID: 10, Initiator: "iqn.2026-12.io.client:c1", CIDs: []int{0}}},
		},
		{TID: 2, IQN: "iqn.2026-12.io.stowage:t2", LUNs: []LUN{{Number: 1, Backing: "/tmp/tg/f.img", Size: 2_000_000}}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("parseShow:\n got %+v\nwant %+v", got, want)
	}
}

func TestParseShowEmptyAndBad(t *testing.T) {
	if ts, err := parseShow(""); err != nil || len(ts) != 0 {
		t.Fatalf("empty: %v %v", ts, err)
	}
	for _, bad := range []string{
		"Target x: iqn.a:b\n",
		"    LUN information:\n",
		"Target 1: iqn.a:b\n    LUN information:\n        LUN: one\n",
		"Target 1: iqn.a:b\n    LUN information:\n        LUN: 1\n            Size: big, Block size: 512\n",
	} {
		if _, err := parseShow(bad); !errors.Is(err, errdefs.ErrInternal) {
			t.Errorf("parseShow(%q) = %v, want internal", bad, err)
		}
	}
}

func TestClassify(t *testing.T) {
	for msg, want := range map[string]error{
		"can't find the target":                                  errdefs.ErrNotFound,
		"can't find the logical unit":                            errdefs.ErrNotFound,
		"this access control rule does not exist":                errdefs.ErrNotFound,
		"this logical unit number already exists":                errdefs.ErrAlreadyExists,
		"this target already exists":                             errdefs.ErrAlreadyExists,
		"this target is still active":                            errdefs.ErrFailedPrecondition,
		"invalid request":                                        errdefs.ErrInvalid,
		"logicalunit mode: option '-P' is not allowed/supported": errdefs.ErrInvalid,
		"failed to send request hdr to tgt daemon, Transport endpoint is not connected": errdefs.ErrUnavailable,
	} {
		if got := classify(msg); got != want {
			t.Errorf("classify(%q) = %v, want %v", msg, got, want)
		}
	}
}
