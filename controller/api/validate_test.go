package api

import (
	"context"
	"errors"
	"strings"
	"testing"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/errdefs/errconnect"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/rpclimit"
)

// The rules the .proto files declare (buf.validate) refuse bad requests
// with invalid_argument naming the field, before the handler runs:
// nothing is created. Streams (WatchJob) are checked too.
func TestRequestRulesFromTheProto(t *testing.T) {
	e := newEdge(t, false, rpclimit.Default())
	ctx := context.Background()
	countVolumes := func() int {
		vs, err := e.db.Volumes().List(ctx, meta.Filter[*stowagev1.Volume]{})
		if err != nil {
			t.Fatal(err)
		}
		return len(vs)
	}
	countStores := func() int {
		ss, err := e.db.Stores().List(ctx, meta.Filter[*stowagev1.DataStore]{})
		if err != nil {
			t.Fatal(err)
		}
		return len(ss)
	}
	volumesBefore, storesBefore := countVolumes(), countStores()
	for _, c := range []struct {
		name string
		call func() error
		says string
	}{
		{"volume from a template and a snapshot", func() error {
			_, err := e.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: "v", TemplateId: "t", SnapshotId: "s"}))
			return err
		}, "only one of template_id, snapshot_id can be set"},
		{"negative size", func() error {
			_, err := e.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: "v", Size: -512}))
			return err
		}, "size: must be greater than or equal to 0"},
		{"bad storage tag", func() error {
			_, err := e.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: "v", Size: 512, Tags: []string{"ok", "not ok"}}))
			return err
		}, "tags[1]: does not match regex pattern"},
		{"undefined format", func() error {
			_, err := e.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: "v", Size: 512, Format: 42}))
			return err
		}, "format: value must be one of the defined enum values"},
		{"store without a role", func() error {
			_, err := e.stores.AddStore(ctx, connect.NewRequest(&stowagev1.AddStoreRequest{Name: "x", Provider: "filesystem", Url: "file:///srv/x"}))
			return err
		}, "role: must not be in list [0]"},
		{"threshold above 1", func() error {
			_, err := e.stores.AddStore(ctx, connect.NewRequest(&stowagev1.AddStoreRequest{Name: "x", Role: stowagev1.StoreRole_STORE_ROLE_PRIMARY,
				Provider: "filesystem", Url: "file:///srv/x", CapacityDisableThreshold: proto.Float64(1.5)}))
			return err
		}, "capacity_disable_threshold: must be greater than 0 and less than or equal to 1"},
		{"job without an id", func() error {
			_, err := e.jobs.GetJob(ctx, connect.NewRequest(&stowagev1.GetJobRequest{}))
			return err
		}, "id: value is required"},
		{"undefined state filter", func() error {
			_, err := e.volumes.ListVolumes(ctx, connect.NewRequest(&stowagev1.ListVolumesRequest{State: 99}))
			return err
		}, "state: value must be one of the defined enum values"},
		{"negative join token ttl", func() error {
			_, err := e.hosts.CreateJoinToken(ctx, connect.NewRequest(&stowagev1.CreateJoinTokenRequest{TtlSeconds: -1}))
			return err
		}, "ttl_seconds: must be greater than or equal to 0"},
		{"maintenance of no host", func() error {
			_, err := e.hosts.EnableHostMaintenance(ctx, connect.NewRequest(&stowagev1.EnableHostMaintenanceRequest{}))
			return err
		}, "id: value is required"},
		{"watch of no job (a stream)", func() error {
			s, err := e.jobs.WatchJob(ctx, connect.NewRequest(&stowagev1.WatchJobRequest{}))
			if err != nil {
				return err
			}
			for s.Receive() {
			}
			return s.Err()
		}, "id: value is required"},
	} {
		err := c.call()
		var ce *connect.Error
		if !errors.As(err, &ce) || ce.Code() != connect.CodeInvalidArgument || !strings.Contains(ce.Message(), c.says) {
			t.Errorf("%s: %v; want invalid_argument saying %q", c.name, err, c.says)
			continue
		}
		if !errors.Is(errconnect.FromConnect(err), errdefs.ErrInvalid) {
			t.Errorf("%s: %v does not come back as ErrInvalid", c.name, err)
		}
	}
	if n := countVolumes(); n != volumesBefore {
		t.Errorf("refused creates left %d volumes (before: %d)", n, volumesBefore)
	}
	if n := countStores(); n != storesBefore {
		t.Errorf("refused adds left %d stores (before: %d)", n, storesBefore)
	}
	// A valid request passes the rules (a dry run: a plan, nothing written).
	if _, err := e.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: "v", Size: 1 << 20, Tags: []string{"ssd:fast"}, DryRun: true})); err != nil &&
		connect.CodeOf(err) == connect.CodeInvalidArgument {
		t.Errorf("a valid request was refused: %v", err)
	}
}

// Validation runs after authentication: a caller without a token learns
// nothing about what its request lacks.
func TestRequestRulesAfterAuthentication(t *testing.T) {
	e := newEdge(t, true, rpclimit.Default())
	_, err := e.jobs.GetJob(context.Background(), connect.NewRequest(&stowagev1.GetJobRequest{}))
	if connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Errorf("GetJob without a token and without an id: %v, want unauthenticated", err)
	}
}
