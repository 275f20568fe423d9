package meta

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// The expected state tables, written from the design (not copied from
// states.go): "From Event To" per line. Every (state, event) pair not
// listed must be refused.
const (
	wantStoreTable = `
Initialized AttachSucceeded Up
Initialized AttachFailed Removed
Up MaintenanceRequested PrepareForMaintenance
ErrorInMaintenance MaintenanceRequested PrepareForMaintenance
PrepareForMaintenance MaintenanceSucceeded Maintenance
PrepareForMaintenance MaintenanceFailed ErrorInMaintenance
PrepareForMaintenance ControllerRestarted ErrorInMaintenance
Maintenance CancelMaintenance Up
ErrorInMaintenance CancelMaintenance Up
Up Disable Disabled
Disabled Enable Up
Up RemoveRequested Removed
Maintenance RemoveRequested Removed
Disabled RemoveRequested Removed
ErrorInMaintenance RemoveRequested Removed
`
	wantHostTable = `
Connecting Connected Up
Up Reconnect Connecting
Disconnected Reconnect Connecting
Connecting Reconnect Connecting
Up HeartbeatMissed Disconnected
Connecting HeartbeatMissed Disconnected
Disconnected HeartbeatResumed Up
Up MaintenanceRequested PrepareForMaintenance
Connecting MaintenanceRequested PrepareForMaintenance
Disconnected MaintenanceRequested Maintenance
PrepareForMaintenance MaintenanceSucceeded Maintenance
PrepareForMaintenance MaintenanceCancelled Connecting
Maintenance MaintenanceCancelled Connecting
`
	wantObjectTable = `
Allocated CreateRequested Creating
Allocated OperationFailed Failed
Creating OperationSucceeded Ready
Creating OperationFailed Failed
Ready CopyRequested Copying
Copying OperationSucceeded Ready
Copying OperationFailed Ready
Ready MigrateRequested Migrating
Migrating OperationSucceeded Ready
Migrating MigrationSucceeded Destroyed
Migrating OperationFailed Ready
Ready DestroyRequested Destroying
Failed DestroyRequested Destroying
Allocated DestroyRequested Destroying
Destroying OperationSucceeded Destroyed
Destroying OperationFailed Destroying
`
	wantVolumeTable = `
Allocated CreateRequested Creating
Creating OperationSucceeded Ready
Creating OperationFailed Failed
Ready SnapshotRequested Snapshotting
Snapshotting OperationSucceeded Ready
Snapshotting OperationFailed Ready
Ready RevertSnapshotRequested RevertSnapshotting
RevertSnapshotting OperationSucceeded Ready
RevertSnapshotting OperationFailed Ready
Ready MigrationRequested Migrating
Migrating OperationSucceeded Ready
Migrating OperationFailed Ready
Ready ResizeRequested Resizing
Resizing OperationSucceeded Ready
Resizing OperationFailed Ready
Ready CopyRequested Copying
Copying OperationSucceeded Ready
Copying OperationFailed Ready
Ready DestroyRequested Destroy
Allocated DestroyRequested Destroy
Failed DestroyRequested Destroy
Destroy RecoverRequested Ready
Destroy ExpungeRequested Expunging
Expunging OperationSucceeded Expunged
Expunging OperationFailed Destroy
`
	wantSnapshotTable = `
Allocated CreateRequested Creating
Creating OperationSucceeded CreatedOnPrimary
Creating OperationFailed Error
CreatedOnPrimary BackupRequested BackingUp
BackingUp OperationSucceeded BackedUp
BackingUp OperationFailed Error
BackingUp BackupFailed CreatedOnPrimary
BackingUp BackupFailedKeep BackedUp
BackedUp BackupRequested BackingUp
BackedUp CopyRequested Copying
Copying OperationSucceeded BackedUp
Copying OperationFailed BackedUp
CreatedOnPrimary DestroyRequested Destroying
BackedUp DestroyRequested Destroying
Error DestroyRequested Destroying
Hidden DestroyRequested Destroying
Destroying OperationSucceeded Destroyed
Destroying OperationFailed BackedUp
CreatedOnPrimary Hide Hidden
BackedUp Hide Hidden
`
	wantJobTable = `
Pending Start Running
Running Succeed Succeeded
Running Fail Failed
Pending Fail Failed
Running CancelRequested Cancelling
Pending CancelRequested Cancelling
Cancelling Cancelled Cancelled
Cancelling Fail Failed
Cancelling Succeed Succeeded
`
)

// fsmSuite drives every (state, event) pair of one kind through the store.
type fsmSuite[T Record, S ~int32, E ~string] struct {
	kind    *StatefulKind[T, S, E]
	repo    func(*DB) *StatefulRepo[T, S, E]
	enum    protoreflect.EnumDescriptor
	initial string
	events  []E // every event constant of the kind
	newRec  func(id string) T
	want    string
}

func TestTransitionsEveryKind(t *testing.T) {
	t.Run("store", func(t *testing.T) {
		t.Parallel()
		runFSMSuite(t, fsmSuite[*stowagev1.DataStore, stowagev1.StoreState, StoreEvent]{
			kind: Stores, repo: (*DB).Stores, enum: stowagev1.StoreState(0).Descriptor(), initial: "Initialized",
			events: []StoreEvent{StoreAttachSucceeded, StoreAttachFailed, StoreMaintenanceRequested,
				StoreMaintenanceSucceeded, StoreMaintenanceFailed, StoreCancelMaintenance,
				StoreControllerRestarted, StoreDisable, StoreEnable, StoreRemoveRequested},
			newRec: func(id string) *stowagev1.DataStore {
				return &stowagev1.DataStore{Id: id, Name: "name-" + id, Role: stowagev1.StoreRole_STORE_ROLE_PRIMARY}
			},
			want: wantStoreTable,
		})
	})
	t.Run("host", func(t *testing.T) {
		t.Parallel()
		runFSMSuite(t, fsmSuite[*stowagev1.Host, stowagev1.HostState, HostEvent]{
			kind: Hosts, repo: (*DB).Hosts, enum: stowagev1.HostState(0).Descriptor(), initial: "Connecting",
			events: []HostEvent{HostConnected, HostReconnect, HostHeartbeatMissed, HostHeartbeatResumed,
				HostMaintenanceRequested, HostMaintenanceSucceeded, HostMaintenanceCancelled},
			newRec: func(id string) *stowagev1.Host {
				return &stowagev1.Host{Id: id, Hostname: "kvm-" + id, Zone: "z1"}
			},
			want: wantHostTable,
		})
	})
	objectEvents := []ObjectEvent{ObjectCreateRequested, ObjectOperationSucceeded, ObjectOperationFailed,
		ObjectCopyRequested, ObjectMigrateRequested, ObjectMigrationSucceeded, ObjectDestroyRequested}
	t.Run("template_on_store", func(t *testing.T) {
		t.Parallel()
		runFSMSuite(t, fsmSuite[*stowagev1.TemplateOnStore, stowagev1.ObjectState, ObjectEvent]{
			kind: TemplatesOnStore, repo: (*DB).TemplatesOnStore, enum: stowagev1.ObjectState(0).Descriptor(),
			initial: "Allocated", events: objectEvents,
			newRec: func(id string) *stowagev1.TemplateOnStore {
				return &stowagev1.TemplateOnStore{Id: id, TemplateId: "t-" + id, StoreId: "s1"}
			},
			want: wantObjectTable,
		})
	})
	t.Run("snapshot_on_store", func(t *testing.T) {
		t.Parallel()
		runFSMSuite(t, fsmSuite[*stowagev1.SnapshotOnStore, stowagev1.ObjectState, ObjectEvent]{
			kind: SnapshotsOnStore, repo: (*DB).SnapshotsOnStore, enum: stowagev1.ObjectState(0).Descriptor(),
			initial: "Allocated", events: objectEvents,
			newRec: func(id string) *stowagev1.SnapshotOnStore {
				return &stowagev1.SnapshotOnStore{Id: id, SnapshotId: "snap-" + id, StoreId: "s1"}
			},
			want: wantObjectTable,
		})
	})
	t.Run("volume", func(t *testing.T) {
		t.Parallel()
		runFSMSuite(t, fsmSuite[*stowagev1.Volume, stowagev1.VolumeState, VolumeEvent]{
			kind: Volumes, repo: (*DB).Volumes, enum: stowagev1.VolumeState(0).Descriptor(), initial: "Allocated",
			events: []VolumeEvent{VolumeCreateRequested, VolumeOperationSucceeded, VolumeOperationFailed,
				VolumeSnapshotRequested, VolumeRevertSnapshotRequested, VolumeMigrationRequested,
				VolumeResizeRequested, VolumeCopyRequested, VolumeDestroyRequested, VolumeRecoverRequested,
				VolumeExpungeRequested},
			newRec: func(id string) *stowagev1.Volume {
				return &stowagev1.Volume{Id: id, Name: "disk", StoreId: "s1", TemplateId: "t1"}
			},
			want: wantVolumeTable,
		})
	})
	t.Run("snapshot", func(t *testing.T) {
		t.Parallel()
		runFSMSuite(t, fsmSuite[*stowagev1.Snapshot, stowagev1.SnapshotState, SnapshotEvent]{
			kind: Snapshots, repo: (*DB).Snapshots, enum: stowagev1.SnapshotState(0).Descriptor(), initial: "Allocated",
			events: []SnapshotEvent{SnapshotCreateRequested, SnapshotOperationSucceeded, SnapshotOperationFailed,
				SnapshotBackupRequested, SnapshotCopyRequested, SnapshotDestroyRequested, SnapshotHide,
				SnapshotBackupFailed, SnapshotBackupFailedKeep},
			newRec: func(id string) *stowagev1.Snapshot {
				return &stowagev1.Snapshot{Id: id, VolumeId: "v1", ParentId: "p1"}
			},
			want: wantSnapshotTable,
		})
	})
	t.Run("job", func(t *testing.T) {
		t.Parallel()
		runFSMSuite(t, fsmSuite[*stowagev1.Job, stowagev1.JobState, JobEvent]{
			kind: Jobs, repo: (*DB).Jobs, enum: stowagev1.JobState(0).Descriptor(), initial: "Pending",
			events: []JobEvent{JobStart, JobSucceed, JobFail, JobCancelRequested, JobCancelled},
			newRec: func(id string) *stowagev1.Job {
				return &stowagev1.Job{Id: id, Kind: "test", TargetId: "v1", IdempotencyKey: "key-" + id}
			},
			want: wantJobTable,
		})
	})
}

func runFSMSuite[T Record, S ~int32, E ~string](t *testing.T, c fsmSuite[T, S, E]) {
	ctx := context.Background()
	db := openTest(t)
	repo := c.repo(db)
	m := c.kind.Machine()

	// The states of the enum, by name; the expected table, parsed.
	states := map[string]S{}
	var order []string
	for i := 0; i < c.enum.Values().Len(); i++ {
		v := c.enum.Values().Get(i)
		if v.Number() == 0 {
			continue
		}
		s := S(v.Number())
		states[m.StateName(s)] = s
		order = append(order, m.StateName(s))
	}
	eventNames := map[string]E{}
	for _, e := range c.events {
		eventNames[string(e)] = e
	}
	want := map[string]map[string]string{}
	for line := range strings.Lines(c.want) {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if len(f) != 3 || states[f[0]] == 0 || states[f[2]] == 0 || eventNames[f[1]] == "" {
			t.Fatalf("bad expected table line %q", line)
		}
		if want[f[0]] == nil {
			want[f[0]] = map[string]string{}
		}
		want[f[0]][f[1]] = f[2]
	}
	// The machine mentions exactly the events the test knows.
	if got := m.AllEvents(); !slices.Equal(sortedEvents(got), sortedEvents(c.events)) {
		t.Fatalf("machine events %v, test knows %v", got, c.events)
	}
	if got := m.StateName(m.Initial()); got != c.initial {
		t.Fatalf("initial state %s, want %s", got, c.initial)
	}

	n := 0
	for _, from := range order {
		for _, e := range append(slices.Clone(c.events), E("NoSuchEvent")) {
			n++
			id := fmt.Sprintf("r%03d", n)
			if _, err := repo.Create(ctx, c.newRec(id)); err != nil {
				t.Fatalf("create %s: %v", id, err)
			}
			forceState(t, db, c.kind, id, states[from])
			key := recordKey(c.kind.Name(), id)
			before := rawGet(t, db, key)
			beforeKeys := keysMentioning(t, db, id)

			got, err := repo.Transition(ctx, id, e, nil)
			to, legal := want[from][string(e)]
			after := rawGet(t, db, key)
			stored, derr := c.kind.decode(id, after)
			if derr != nil {
				t.Fatal(derr)
			}
			if !legal {
				if !errors.Is(err, errdefs.ErrFailedPrecondition) {
					t.Errorf("%s -%s->: got %v, want ErrFailedPrecondition", from, e, err)
					continue
				}
				msg := fmt.Sprintf("%s %s: event %s is not allowed in state %s", c.kind.noun, id, e, from)
				if !strings.Contains(err.Error(), msg) {
					t.Errorf("%s -%s->: message %q does not say %q", from, e, err, msg)
				}
				sameBytes(t, fmt.Sprintf("%s -%s->", from, e), before, after)
				old, _ := c.kind.decode(id, before)
				if !proto.Equal(old, stored) {
					t.Errorf("%s -%s->: record changed", from, e)
				}
				if k := keysMentioning(t, db, id); !slices.Equal(k, beforeKeys) {
					t.Errorf("%s -%s->: keys changed from %v to %v", from, e, beforeKeys, k)
				}
				continue
			}
			if err != nil {
				t.Errorf("%s -%s-> %s: %v", from, e, to, err)
				continue
			}
			if name := m.StateName(c.kind.getState(got)); name != to {
				t.Errorf("%s -%s->: got state %s, want %s", from, e, name, to)
			}
			if got.GetRevision() != 2 {
				t.Errorf("%s -%s->: revision %d, want 2", from, e, got.GetRevision())
			}
			if !proto.Equal(got, stored) {
				t.Errorf("%s -%s->: returned record differs from the stored one", from, e)
			}
			// The state index moved with the record.
			inTo, err := repo.ListInState(ctx, states[to])
			if err != nil {
				t.Fatal(err)
			}
			if !containsID(inTo, id) {
				t.Errorf("%s -%s-> %s: not listed in state %s", from, e, to, to)
			}
			if from != to {
				inFrom, err := repo.ListInState(ctx, states[from])
				if err != nil {
					t.Fatal(err)
				}
				if containsID(inFrom, id) {
					t.Errorf("%s -%s-> %s: still listed in state %s", from, e, to, from)
				}
			}
		}
	}
	if err := db.Check(ctx); err != nil {
		t.Fatal(err)
	}
}

func sortedEvents[E ~string](in []E) []E {
	out := slices.Clone(in)
	slices.Sort(out)
	return out
}

func containsID[T Record](recs []T, id string) bool {
	return slices.ContainsFunc(recs, func(r T) bool { return r.GetId() == id })
}

func TestStateNames(t *testing.T) {
	for _, c := range []struct{ got, want string }{
		{StoreStateName(stowagev1.StoreState_STORE_STATE_PREPARE_FOR_MAINTENANCE), "PrepareForMaintenance"},
		{StoreStateName(stowagev1.StoreState_STORE_STATE_ERROR_IN_MAINTENANCE), "ErrorInMaintenance"},
		{StoreStateName(stowagev1.StoreState_STORE_STATE_UP), "Up"},
		{StoreStateName(stowagev1.StoreState_STORE_STATE_UNSPECIFIED), "Unspecified"},
		{StoreStateName(stowagev1.StoreState(42)), "StoreState(42)"},
		{HostStateName(stowagev1.HostState_HOST_STATE_DISCONNECTED), "Disconnected"},
		{ObjectStateName(stowagev1.ObjectState_OBJECT_STATE_DESTROYING), "Destroying"},
		{VolumeStateName(stowagev1.VolumeState_VOLUME_STATE_REVERT_SNAPSHOTTING), "RevertSnapshotting"},
		{SnapshotStateName(stowagev1.SnapshotState_SNAPSHOT_STATE_CREATED_ON_PRIMARY), "CreatedOnPrimary"},
		{SnapshotStateName(stowagev1.SnapshotState_SNAPSHOT_STATE_BACKED_UP), "BackedUp"},
		{JobStateName(stowagev1.JobState_JOB_STATE_CANCELLING), "Cancelling"},
		{StoreRoleName(stowagev1.StoreRole_STORE_ROLE_IMAGE_CACHE), "ImageCache"},
		{EnumName(stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2), "Qcow2"},
	} {
		if c.got != c.want {
			t.Errorf("got %q, want %q", c.got, c.want)
		}
	}
}

func TestMachine(t *testing.T) {
	type S int32
	type E string
	name := func(s S) string { return fmt.Sprintf("S%d", s) }
	m := NewMachine(S(1), name,
		Edge[S, E]{From: []S{1}, Event: "go", To: 2},
		Edge[S, E]{From: []S{1, 2}, Event: "back", To: 1},
	)
	if to, ok := m.Next(1, "go"); !ok || to != 2 {
		t.Fatalf("Next(1, go) = %v, %v", to, ok)
	}
	if _, ok := m.Next(2, "go"); ok {
		t.Fatal("Next(2, go) allowed")
	}
	if got := m.Events(1); !slices.Equal(got, []E{"back", "go"}) {
		t.Fatalf("Events(1) = %v", got)
	}
	if got := m.States(); !slices.Equal(got, []S{1, 2}) {
		t.Fatalf("States() = %v", got)
	}
	defer func() {
		if recover() == nil {
			t.Fatal("a (state, event) pair with two targets must panic at declaration")
		}
	}()
	NewMachine(S(1), name,
		Edge[S, E]{From: []S{1}, Event: "go", To: 2},
		Edge[S, E]{From: []S{1}, Event: "go", To: 3},
	)
}
