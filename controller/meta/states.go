package meta

import (
	"fmt"
	"strings"

	"google.golang.org/protobuf/reflect/protoreflect"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// EnumName renders a protobuf enum value the way CloudStack prints its states:
// the type prefix stripped and the rest in CamelCase, so
// STORE_STATE_PREPARE_FOR_MAINTENANCE is "PrepareForMaintenance" and
// STORE_ROLE_IMAGE_CACHE is "ImageCache". The prefix is taken from the
// enum's zero value (FOO_UNSPECIFIED). A number the enum does not define
// renders as "StoreState(42)".
func EnumName(e protoreflect.Enum) string {
	desc := e.Descriptor()
	v := desc.Values().ByNumber(e.Number())
	if v == nil {
		return fmt.Sprintf("%s(%d)", desc.Name(), e.Number())
	}
	name := string(v.Name())
	if zero := desc.Values().ByNumber(0); zero != nil {
		if prefix, ok := strings.CutSuffix(string(zero.Name()), "UNSPECIFIED"); ok {
			name = strings.TrimPrefix(name, prefix)
		}
	}
	var b strings.Builder
	for word := range strings.SplitSeq(name, "_") {
		if word == "" {
			continue
		}
		b.WriteString(word[:1])
		b.WriteString(strings.ToLower(word[1:]))
	}
	return b.String()
}

// StoreStateName renders a store state ("Up", "PrepareForMaintenance").
func StoreStateName(s stowagev1.StoreState) string { return EnumName(s) }

// HostStateName renders a host state ("Connecting", "Disconnected").
func HostStateName(s stowagev1.HostState) string { return EnumName(s) }

// ObjectStateName renders the state of an object on a store ("Ready").
func ObjectStateName(s stowagev1.ObjectState) string { return EnumName(s) }

// VolumeStateName renders a volume state ("RevertSnapshotting", "Destroy").
func VolumeStateName(s stowagev1.VolumeState) string { return EnumName(s) }

// SnapshotStateName renders a snapshot state ("CreatedOnPrimary", "BackedUp").
func SnapshotStateName(s stowagev1.SnapshotState) string { return EnumName(s) }

// JobStateName renders a job state ("Pending", "Cancelling").
func JobStateName(s stowagev1.JobState) string { return EnumName(s) }

// StoreRoleName renders a store role ("Primary", "Image", "ImageCache").
func StoreRoleName(r stowagev1.StoreRole) string { return EnumName(r) }

// TokenRoleName is the indexed name of a token role ("Admin", "Operator", "Reader").
func TokenRoleName(r stowagev1.TokenRole) string { return EnumName(r) }

// StoreEvent is an event of the data store state machine (CloudStack's
// StoragePoolStatus, which CloudStack sets by hand; Stowage makes it a table).
type StoreEvent string

// Store events.
const (
	StoreAttachSucceeded      StoreEvent = "AttachSucceeded"
	StoreAttachFailed         StoreEvent = "AttachFailed"
	StoreMaintenanceRequested StoreEvent = "MaintenanceRequested"
	StoreMaintenanceSucceeded StoreEvent = "MaintenanceSucceeded"
	StoreMaintenanceFailed    StoreEvent = "MaintenanceFailed"
	StoreCancelMaintenance    StoreEvent = "CancelMaintenance"
	// StoreControllerRestarted is sent by recovery at start to a store the
	// previous controller left in PrepareForMaintenance.
	StoreControllerRestarted StoreEvent = "ControllerRestarted"
	StoreDisable             StoreEvent = "Disable"
	StoreEnable              StoreEvent = "Enable"
	StoreRemoveRequested     StoreEvent = "RemoveRequested"
)

// HostEvent is an event of the host state machine.
type HostEvent string

// Host events.
const (
	HostConnected HostEvent = "Connected"
	// HostReconnect means the agent registered again (it restarted, or the
	// controller asked it to).
	HostReconnect        HostEvent = "Reconnect"
	HostHeartbeatMissed  HostEvent = "HeartbeatMissed"
	HostHeartbeatResumed HostEvent = "HeartbeatResumed"
	// HostMaintenanceRequested starts a drain (an Up or Connecting host:
	// PrepareForMaintenance) or, for a Disconnected host that can take no
	// task anyway, puts it in Maintenance at once.
	HostMaintenanceRequested HostEvent = "MaintenanceRequested"
	// HostMaintenanceSucceeded: a draining host's heartbeat reported no
	// running task.
	HostMaintenanceSucceeded HostEvent = "MaintenanceSucceeded"
	HostMaintenanceCancelled HostEvent = "MaintenanceCancelled"
)

// ObjectEvent is an event of the object-on-store state machine
// (ObjectInDataStoreStateMachine), shared by TemplateOnStore and SnapshotOnStore.
type ObjectEvent string

// Object-on-store events.
const (
	ObjectCreateRequested    ObjectEvent = "CreateRequested"
	ObjectOperationSucceeded ObjectEvent = "OperationSucceeded"
	ObjectOperationFailed    ObjectEvent = "OperationFailed"
	ObjectCopyRequested      ObjectEvent = "CopyRequested"
	ObjectMigrateRequested   ObjectEvent = "MigrateRequested"
	// ObjectMigrationSucceeded ends the source side of a migration: the data
	// now lives elsewhere, so the object is Destroyed.
	ObjectMigrationSucceeded ObjectEvent = "MigrationSucceeded"
	ObjectDestroyRequested   ObjectEvent = "DestroyRequested"
)

// VolumeEvent is an event of the volume state machine (Volume.State).
type VolumeEvent string

// Volume events.
const (
	VolumeCreateRequested         VolumeEvent = "CreateRequested"
	VolumeOperationSucceeded      VolumeEvent = "OperationSucceeded"
	VolumeOperationFailed         VolumeEvent = "OperationFailed"
	VolumeSnapshotRequested       VolumeEvent = "SnapshotRequested"
	VolumeRevertSnapshotRequested VolumeEvent = "RevertSnapshotRequested"
	VolumeMigrationRequested      VolumeEvent = "MigrationRequested"
	VolumeResizeRequested         VolumeEvent = "ResizeRequested"
	VolumeCopyRequested           VolumeEvent = "CopyRequested"
	VolumeDestroyRequested        VolumeEvent = "DestroyRequested"
	VolumeRecoverRequested        VolumeEvent = "RecoverRequested"
	VolumeExpungeRequested        VolumeEvent = "ExpungeRequested"
)

// SnapshotEvent is an event of the snapshot state machine (Snapshot.State).
type SnapshotEvent string

// Snapshot events.
const (
	SnapshotCreateRequested    SnapshotEvent = "CreateRequested"
	SnapshotOperationSucceeded SnapshotEvent = "OperationSucceeded"
	SnapshotOperationFailed    SnapshotEvent = "OperationFailed"
	SnapshotBackupRequested    SnapshotEvent = "BackupRequested"
	SnapshotCopyRequested      SnapshotEvent = "CopyRequested"
	SnapshotDestroyRequested   SnapshotEvent = "DestroyRequested"
	// SnapshotBackupFailed ends a failed first backup: the copy on primary
	// is intact, so the snapshot is CreatedOnPrimary again (CloudStack's
	// Error here is one of its users' complaints).
	SnapshotBackupFailed SnapshotEvent = "BackupFailed"
	// SnapshotBackupFailedKeep ends a failed backup of a snapshot that
	// already has one: it stays BackedUp.
	SnapshotBackupFailedKeep SnapshotEvent = "BackupFailedKeep"
	// SnapshotHide hides a snapshot the user deleted while a child in its
	// delta chain still needs it.
	SnapshotHide SnapshotEvent = "Hide"
)

// JobEvent is an event of the job state machine.
type JobEvent string

// Job events.
const (
	JobStart           JobEvent = "Start"
	JobSucceed         JobEvent = "Succeed"
	JobFail            JobEvent = "Fail"
	JobCancelRequested JobEvent = "CancelRequested"
	JobCancelled       JobEvent = "Cancelled"
)

// The state tables. Each row reads "in any of these states, this event moves
// the record to that state"; anything not listed is refused.

type (
	storeEdge    = Edge[stowagev1.StoreState, StoreEvent]
	hostEdge     = Edge[stowagev1.HostState, HostEvent]
	objectEdge   = Edge[stowagev1.ObjectState, ObjectEvent]
	volumeEdge   = Edge[stowagev1.VolumeState, VolumeEvent]
	snapshotEdge = Edge[stowagev1.SnapshotState, SnapshotEvent]
	jobEdge      = Edge[stowagev1.JobState, JobEvent]
)

var storeMachine = func() *Machine[stowagev1.StoreState, StoreEvent] {
	const (
		initialized = stowagev1.StoreState_STORE_STATE_INITIALIZED
		up          = stowagev1.StoreState_STORE_STATE_UP
		prepare     = stowagev1.StoreState_STORE_STATE_PREPARE_FOR_MAINTENANCE
		maintenance = stowagev1.StoreState_STORE_STATE_MAINTENANCE
		errorInMnt  = stowagev1.StoreState_STORE_STATE_ERROR_IN_MAINTENANCE
		disabled    = stowagev1.StoreState_STORE_STATE_DISABLED
		removed     = stowagev1.StoreState_STORE_STATE_REMOVED
	)
	type S = stowagev1.StoreState
	return NewMachine(initialized, StoreStateName,
		storeEdge{From: []S{initialized}, Event: StoreAttachSucceeded, To: up},
		storeEdge{From: []S{initialized}, Event: StoreAttachFailed, To: removed},
		storeEdge{From: []S{up, errorInMnt}, Event: StoreMaintenanceRequested, To: prepare},
		storeEdge{From: []S{prepare}, Event: StoreMaintenanceSucceeded, To: maintenance},
		storeEdge{From: []S{prepare}, Event: StoreMaintenanceFailed, To: errorInMnt},
		storeEdge{From: []S{prepare}, Event: StoreControllerRestarted, To: errorInMnt},
		storeEdge{From: []S{maintenance, errorInMnt}, Event: StoreCancelMaintenance, To: up},
		storeEdge{From: []S{up}, Event: StoreDisable, To: disabled},
		storeEdge{From: []S{disabled}, Event: StoreEnable, To: up},
		storeEdge{From: []S{up, maintenance, disabled, errorInMnt}, Event: StoreRemoveRequested, To: removed},
	)
}()

var hostMachine = func() *Machine[stowagev1.HostState, HostEvent] {
	const (
		connecting   = stowagev1.HostState_HOST_STATE_CONNECTING
		up           = stowagev1.HostState_HOST_STATE_UP
		disconnected = stowagev1.HostState_HOST_STATE_DISCONNECTED
		maintenance  = stowagev1.HostState_HOST_STATE_MAINTENANCE
		prepare      = stowagev1.HostState_HOST_STATE_PREPARE_FOR_MAINTENANCE
	)
	type S = stowagev1.HostState
	return NewMachine(connecting, HostStateName,
		hostEdge{From: []S{connecting}, Event: HostConnected, To: up},
		hostEdge{From: []S{up, disconnected, connecting}, Event: HostReconnect, To: connecting},
		hostEdge{From: []S{up, connecting}, Event: HostHeartbeatMissed, To: disconnected},
		hostEdge{From: []S{disconnected}, Event: HostHeartbeatResumed, To: up},
		hostEdge{From: []S{up, connecting}, Event: HostMaintenanceRequested, To: prepare},
		hostEdge{From: []S{disconnected}, Event: HostMaintenanceRequested, To: maintenance},
		hostEdge{From: []S{prepare}, Event: HostMaintenanceSucceeded, To: maintenance},
		hostEdge{From: []S{prepare, maintenance}, Event: HostMaintenanceCancelled, To: connecting},
	)
}()

var objectMachine = func() *Machine[stowagev1.ObjectState, ObjectEvent] {
	const (
		allocated  = stowagev1.ObjectState_OBJECT_STATE_ALLOCATED
		creating   = stowagev1.ObjectState_OBJECT_STATE_CREATING
		ready      = stowagev1.ObjectState_OBJECT_STATE_READY
		copying    = stowagev1.ObjectState_OBJECT_STATE_COPYING
		migrating  = stowagev1.ObjectState_OBJECT_STATE_MIGRATING
		destroying = stowagev1.ObjectState_OBJECT_STATE_DESTROYING
		destroyed  = stowagev1.ObjectState_OBJECT_STATE_DESTROYED
		failed     = stowagev1.ObjectState_OBJECT_STATE_FAILED
	)
	type S = stowagev1.ObjectState
	return NewMachine(allocated, ObjectStateName,
		objectEdge{From: []S{allocated}, Event: ObjectCreateRequested, To: creating},
		objectEdge{From: []S{allocated}, Event: ObjectOperationFailed, To: failed},
		objectEdge{From: []S{creating}, Event: ObjectOperationSucceeded, To: ready},
		objectEdge{From: []S{creating}, Event: ObjectOperationFailed, To: failed},
		// A failed copy or migration leaves the source as it was.
		objectEdge{From: []S{ready}, Event: ObjectCopyRequested, To: copying},
		objectEdge{From: []S{copying}, Event: ObjectOperationSucceeded, To: ready},
		objectEdge{From: []S{copying}, Event: ObjectOperationFailed, To: ready},
		objectEdge{From: []S{ready}, Event: ObjectMigrateRequested, To: migrating},
		objectEdge{From: []S{migrating}, Event: ObjectOperationSucceeded, To: ready},
		objectEdge{From: []S{migrating}, Event: ObjectMigrationSucceeded, To: destroyed},
		objectEdge{From: []S{migrating}, Event: ObjectOperationFailed, To: ready},
		objectEdge{From: []S{ready, failed, allocated}, Event: ObjectDestroyRequested, To: destroying},
		objectEdge{From: []S{destroying}, Event: ObjectOperationSucceeded, To: destroyed},
		// A failed delete is retried later; the object stays Destroying.
		objectEdge{From: []S{destroying}, Event: ObjectOperationFailed, To: destroying},
	)
}()

var volumeMachine = func() *Machine[stowagev1.VolumeState, VolumeEvent] {
	const (
		allocated    = stowagev1.VolumeState_VOLUME_STATE_ALLOCATED
		creating     = stowagev1.VolumeState_VOLUME_STATE_CREATING
		ready        = stowagev1.VolumeState_VOLUME_STATE_READY
		snapshotting = stowagev1.VolumeState_VOLUME_STATE_SNAPSHOTTING
		reverting    = stowagev1.VolumeState_VOLUME_STATE_REVERT_SNAPSHOTTING
		migrating    = stowagev1.VolumeState_VOLUME_STATE_MIGRATING
		resizing     = stowagev1.VolumeState_VOLUME_STATE_RESIZING
		copying      = stowagev1.VolumeState_VOLUME_STATE_COPYING
		destroy      = stowagev1.VolumeState_VOLUME_STATE_DESTROY
		expunging    = stowagev1.VolumeState_VOLUME_STATE_EXPUNGING
		expunged     = stowagev1.VolumeState_VOLUME_STATE_EXPUNGED
		failed       = stowagev1.VolumeState_VOLUME_STATE_FAILED
	)
	type S = stowagev1.VolumeState
	// Operations on a Ready volume return to Ready whether they succeed or fail.
	busy := []S{snapshotting, reverting, migrating, resizing, copying}
	return NewMachine(allocated, VolumeStateName,
		volumeEdge{From: []S{allocated}, Event: VolumeCreateRequested, To: creating},
		volumeEdge{From: []S{creating}, Event: VolumeOperationSucceeded, To: ready},
		volumeEdge{From: []S{creating}, Event: VolumeOperationFailed, To: failed},
		volumeEdge{From: []S{ready}, Event: VolumeSnapshotRequested, To: snapshotting},
		volumeEdge{From: []S{ready}, Event: VolumeRevertSnapshotRequested, To: reverting},
		volumeEdge{From: []S{ready}, Event: VolumeMigrationRequested, To: migrating},
		volumeEdge{From: []S{ready}, Event: VolumeResizeRequested, To: resizing},
		volumeEdge{From: []S{ready}, Event: VolumeCopyRequested, To: copying},
		volumeEdge{From: busy, Event: VolumeOperationSucceeded, To: ready},
		volumeEdge{From: busy, Event: VolumeOperationFailed, To: ready},
		volumeEdge{From: []S{ready, allocated, failed}, Event: VolumeDestroyRequested, To: destroy},
		volumeEdge{From: []S{destroy}, Event: VolumeRecoverRequested, To: ready},
		volumeEdge{From: []S{destroy}, Event: VolumeExpungeRequested, To: expunging},
		volumeEdge{From: []S{expunging}, Event: VolumeOperationSucceeded, To: expunged},
		volumeEdge{From: []S{expunging}, Event: VolumeOperationFailed, To: destroy},
	)
}()

var snapshotMachine = func() *Machine[stowagev1.SnapshotState, SnapshotEvent] {
	const (
		allocated  = stowagev1.SnapshotState_SNAPSHOT_STATE_ALLOCATED
		creating   = stowagev1.SnapshotState_SNAPSHOT_STATE_CREATING
		onPrimary  = stowagev1.SnapshotState_SNAPSHOT_STATE_CREATED_ON_PRIMARY
		backingUp  = stowagev1.SnapshotState_SNAPSHOT_STATE_BACKING_UP
		backedUp   = stowagev1.SnapshotState_SNAPSHOT_STATE_BACKED_UP
		copying    = stowagev1.SnapshotState_SNAPSHOT_STATE_COPYING
		destroying = stowagev1.SnapshotState_SNAPSHOT_STATE_DESTROYING
		destroyed  = stowagev1.SnapshotState_SNAPSHOT_STATE_DESTROYED
		errored    = stowagev1.SnapshotState_SNAPSHOT_STATE_ERROR
		hidden     = stowagev1.SnapshotState_SNAPSHOT_STATE_HIDDEN
	)
	type S = stowagev1.SnapshotState
	return NewMachine(allocated, SnapshotStateName,
		snapshotEdge{From: []S{allocated}, Event: SnapshotCreateRequested, To: creating},
		snapshotEdge{From: []S{creating}, Event: SnapshotOperationSucceeded, To: onPrimary},
		snapshotEdge{From: []S{creating}, Event: SnapshotOperationFailed, To: errored},
		snapshotEdge{From: []S{onPrimary, backedUp}, Event: SnapshotBackupRequested, To: backingUp},
		snapshotEdge{From: []S{backingUp}, Event: SnapshotOperationSucceeded, To: backedUp},
		snapshotEdge{From: []S{backingUp}, Event: SnapshotOperationFailed, To: errored},
		snapshotEdge{From: []S{backingUp}, Event: SnapshotBackupFailed, To: onPrimary},
		snapshotEdge{From: []S{backingUp}, Event: SnapshotBackupFailedKeep, To: backedUp},
		snapshotEdge{From: []S{backedUp}, Event: SnapshotCopyRequested, To: copying},
		snapshotEdge{From: []S{copying}, Event: SnapshotOperationSucceeded, To: backedUp},
		snapshotEdge{From: []S{copying}, Event: SnapshotOperationFailed, To: backedUp},
		snapshotEdge{From: []S{onPrimary, backedUp, errored, hidden}, Event: SnapshotDestroyRequested, To: destroying},
		snapshotEdge{From: []S{destroying}, Event: SnapshotOperationSucceeded, To: destroyed},
		// As in CloudStack: a failed delete puts the snapshot back to BackedUp.
		snapshotEdge{From: []S{destroying}, Event: SnapshotOperationFailed, To: backedUp},
		snapshotEdge{From: []S{onPrimary, backedUp}, Event: SnapshotHide, To: hidden},
	)
}()

var jobMachine = func() *Machine[stowagev1.JobState, JobEvent] {
	const (
		pending    = stowagev1.JobState_JOB_STATE_PENDING
		running    = stowagev1.JobState_JOB_STATE_RUNNING
		cancelling = stowagev1.JobState_JOB_STATE_CANCELLING
		succeeded  = stowagev1.JobState_JOB_STATE_SUCCEEDED
		failed     = stowagev1.JobState_JOB_STATE_FAILED
		cancelled  = stowagev1.JobState_JOB_STATE_CANCELLED
	)
	type S = stowagev1.JobState
	return NewMachine(pending, JobStateName,
		jobEdge{From: []S{pending}, Event: JobStart, To: running},
		jobEdge{From: []S{running, cancelling}, Event: JobSucceed, To: succeeded},
		jobEdge{From: []S{running, pending, cancelling}, Event: JobFail, To: failed},
		jobEdge{From: []S{running, pending}, Event: JobCancelRequested, To: cancelling},
		jobEdge{From: []S{cancelling}, Event: JobCancelled, To: cancelled},
	)
}()
