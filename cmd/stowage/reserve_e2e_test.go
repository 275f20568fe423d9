package main

import (
	"context"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// TestReservationEndToEnd: a create admitted to a store reserves what it
// will write there until its job has ended and the store reported it, and
// placement counts that as used. The store is a small ext4 on a loop
// device (its use moves only with what this test writes), its disable
// threshold set 40 MiB above its use: a full copy of a 32 MiB dense
// template (32 MiB cached on the store + 32 MiB volume) is admitted, and a
// second plan made while it runs is refused naming the reservation, which
// it would not be by the store's use alone. Once the first job ended, the
// reservation is gone from the metrics and the store's report shows the
// bytes instead.
func TestReservationEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	const tsize = 32 << 20
	w := newSmallStore(t, t.TempDir(), tsize, 256<<20)
	ctx, a, small, server, tmpl := context.Background(), w.a, w.store, w.server, w.tmpl.GetId()

	getStore := func() *stowagev1.DataStore {
		t.Helper()
		r, err := a.stores.GetStore(ctx, connect.NewRequest(&stowagev1.GetStoreRequest{Id: small.GetId()}))
		if err != nil {
			t.Fatal(err)
		}
		return r.Msg.GetStore()
	}
	waitFor(t, "the store's capacity reported", 20*time.Second, func() bool { return getStore().GetCapacityBytes() > 0 })
	st := getStore()
	used, capacity := st.GetCapacityBytes()-st.GetAvailableBytes(), st.GetCapacityBytes()
	threshold := float64(used+40<<20) / float64(capacity)
	if _, err := a.stores.UpdateStore(ctx, connect.NewRequest(&stowagev1.UpdateStoreRequest{Id: small.GetId(), CapacityDisableThreshold: proto.Float64(threshold)})); err != nil {
		t.Fatal(err)
	}
	t.Logf("store small: %d of %d bytes used, disable threshold %.4f (40 MiB above)", used, capacity, threshold)

	create := func(name string, dry bool) (*stowagev1.CreateVolumeResponse, error) {
		r, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{
			Name: name, TemplateId: tmpl, Strategy: "full", Zone: "z1", DryRun: dry, IdempotencyKey: "key-" + name}))
		if err != nil {
			return nil, err
		}
		return r.Msg, nil
	}
	// Alone, the plan fits: 16 MiB of the 40 are left after the 32 of
	// the template's virtual size.
	if _, err := create("probe", true); err != nil {
		t.Fatalf("dry run before any reservation: %v", err)
	}
	first, err := create("v1", false)
	if err != nil {
		t.Fatal(err)
	}
	_, err = create("v2", true)
	// v1 reserved the template's copy cached on the store and its own full
	// copy: twice the image file's allocated size (its last block may be
	// allocated whole).
	want := regexp.MustCompile(`store small skipped: would be [0-9.]+% full with 33554432 more bytes \(([0-9]+) bytes of it reserved by jobs in flight\)`)
	var m []string
	if err != nil {
		m = want.FindStringSubmatch(err.Error())
	}
	if m == nil {
		t.Fatalf("a plan while v1's copy runs: %v; want small skipped for v1's reservation", err)
	}
	if n, _ := strconv.ParseInt(m[1], 10, 64); n < 2*tsize || n > 2*tsize+2<<20 {
		t.Fatalf("v1 reserved %d bytes, want about twice the template (%d)", n, 2*tsize)
	}
	// A retry of v1's request (a client that lost the reply) gets v1's
	// job, not a refusal for v1's own reservation.
	if again, err := create("v1", false); err != nil || again.GetJob().GetId() != first.GetJob().GetId() {
		t.Fatalf("v1's request again: %v, %v; want job %s", again.GetJob().GetId(), err, first.GetJob().GetId())
	}
	mustSucceed(t, a, first.GetJob())

	// Ended: the reservation goes (after two heartbeat intervals) and the
	// store's report carries the bytes.
	var reserved string
	waitFor(t, "the reservation released", 20*time.Second, func() bool {
		reserved = grepLines(scrapeMetrics(t, server), `stowage_store_reserved_bytes{role="Primary",store="small"}`)
		return strings.HasSuffix(reserved, " 0")
	})
	waitFor(t, "the store's use reported", 20*time.Second, func() bool {
		s := getStore()
		return s.GetCapacityBytes()-s.GetAvailableBytes() >= used+2*tsize
	})
	_, err = create("v2", true)
	if err == nil || strings.Contains(err.Error(), "reserved by jobs in flight") || !strings.Contains(err.Error(), "store small skipped") {
		t.Fatalf("a plan after v1 ended: %v; want small skipped for its use alone", err)
	}
	t.Logf("after v1: %s; %v", reserved, err)
}
