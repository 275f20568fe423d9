package meta

import (
	"google.golang.org/protobuf/types/known/timestamppb"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// Index names, for ListBy, GetBy and Filter.Index. Which kind has which
// index is listed in the package documentation.
const (
	IndexName           = "name"
	IndexRole           = "role"
	IndexState          = "state"
	IndexZone           = "zone"
	IndexHostname       = "hostname"
	IndexTemplateID     = "template_id"
	IndexStoreID        = "store_id"
	IndexTemplateStore  = "template_store" // unique; value TemplateStoreKey(template, store)
	IndexVolumeID       = "volume_id"
	IndexParentID       = "parent_id"
	IndexSnapshotID     = "snapshot_id"
	IndexTargetID       = "target_id"
	IndexIdempotencyKey = "idempotency_key" // unique
	IndexCreatedBy      = "created_by"
)

type (
	storeRec    = *stowagev1.DataStore
	hostRec     = *stowagev1.Host
	templateRec = *stowagev1.Template
	tosRec      = *stowagev1.TemplateOnStore
	volumeRec   = *stowagev1.Volume
	snapshotRec = *stowagev1.Snapshot
	sosRec      = *stowagev1.SnapshotOnStore
	jobRec      = *stowagev1.Job
	joinRec     = *stowagev1.JoinToken
	tokenRec    = *stowagev1.TokenRecord
)

// The record kinds. Use them for the ...Tx methods inside DB.Txn; outside a
// transaction use the DB's repositories (db.Stores(), ...).
var (
	// Stores are data stores (primary, image, image cache).
	Stores = newStatefulKind(&Kind[storeRec]{
		name:   "store",
		noun:   "store",
		newRec: func() storeRec { return &stowagev1.DataStore{} },
		setRev: func(r storeRec, v uint64) { r.Revision = v },
		touch: func(r storeRec, now *timestamppb.Timestamp, created bool) {
			if created && r.CreatedAt == nil {
				r.CreatedAt = now
			}
			r.UpdatedAt = now
		},
		indexes: []index[storeRec]{
			{field: IndexName, unique: true, value: storeRec.GetName},
			{field: IndexRole, value: func(r storeRec) string { return StoreRoleName(r.GetRole()) }},
			{field: IndexState, value: func(r storeRec) string { return StoreStateName(r.GetState()) }},
		},
	}, storeMachine, storeRec.GetState, func(r storeRec, s stowagev1.StoreState) { r.State = s })

	// Hosts are hypervisor hosts running an agent.
	Hosts = newStatefulKind(&Kind[hostRec]{
		name:   "host",
		noun:   "host",
		newRec: func() hostRec { return &stowagev1.Host{} },
		setRev: func(r hostRec, v uint64) { r.Revision = v },
		touch: func(r hostRec, now *timestamppb.Timestamp, created bool) {
			if created && r.RegisteredAt == nil {
				r.RegisteredAt = now
			}
		},
		indexes: []index[hostRec]{
			{field: IndexState, value: func(r hostRec) string { return HostStateName(r.GetState()) }},
			{field: IndexZone, value: hostRec.GetZone},
			{field: IndexHostname, value: hostRec.GetHostname},
		},
	}, hostMachine, hostRec.GetState, func(r hostRec, s stowagev1.HostState) { r.State = s })

	// Templates are registered templates and ISOs. They have no state of
	// their own: their copies (TemplatesOnStore) do.
	Templates = &Kind[templateRec]{
		name:   "template",
		noun:   "template",
		newRec: func() templateRec { return &stowagev1.Template{} },
		setRev: func(r templateRec, v uint64) { r.Revision = v },
		touch: func(r templateRec, now *timestamppb.Timestamp, created bool) {
			if created && r.CreatedAt == nil {
				r.CreatedAt = now
			}
		},
		indexes: []index[templateRec]{
			{field: IndexName, value: templateRec.GetName},
		},
	}

	// TemplatesOnStore are templates on one store each (template_store_ref,
	// template_spool_ref): at most one per (template, store).
	TemplatesOnStore = newStatefulKind(&Kind[tosRec]{
		name:   "template_on_store",
		noun:   "template on store",
		newRec: func() tosRec { return &stowagev1.TemplateOnStore{} },
		setRev: func(r tosRec, v uint64) { r.Revision = v },
		touch:  noTouch[tosRec],
		indexes: []index[tosRec]{
			{field: IndexTemplateID, value: tosRec.GetTemplateId},
			{field: IndexStoreID, value: tosRec.GetStoreId},
			{field: IndexTemplateStore, label: "template/store", unique: true, value: func(r tosRec) string {
				if r.GetTemplateId() == "" || r.GetStoreId() == "" {
					return ""
				}
				return TemplateStoreKey(r.GetTemplateId(), r.GetStoreId())
			}},
			{field: IndexState, value: func(r tosRec) string { return ObjectStateName(r.GetState()) }},
		},
	}, objectMachine, tosRec.GetState, func(r tosRec, s stowagev1.ObjectState) { r.State = s })

	// Volumes are virtual disks on primary stores.
	Volumes = newStatefulKind(&Kind[volumeRec]{
		name:   "volume",
		noun:   "volume",
		newRec: func() volumeRec { return &stowagev1.Volume{} },
		setRev: func(r volumeRec, v uint64) { r.Revision = v },
		touch: func(r volumeRec, now *timestamppb.Timestamp, created bool) {
			if created && r.CreatedAt == nil {
				r.CreatedAt = now
			}
		},
		indexes: []index[volumeRec]{
			{field: IndexStoreID, value: volumeRec.GetStoreId},
			{field: IndexTemplateID, value: volumeRec.GetTemplateId},
			{field: IndexState, value: func(r volumeRec) string { return VolumeStateName(r.GetState()) }},
			{field: IndexName, value: volumeRec.GetName},
		},
	}, volumeMachine, volumeRec.GetState, func(r volumeRec, s stowagev1.VolumeState) { r.State = s })

	// Snapshots are point-in-time copies of volumes.
	Snapshots = newStatefulKind(&Kind[snapshotRec]{
		name:   "snapshot",
		noun:   "snapshot",
		newRec: func() snapshotRec { return &stowagev1.Snapshot{} },
		setRev: func(r snapshotRec, v uint64) { r.Revision = v },
		touch: func(r snapshotRec, now *timestamppb.Timestamp, created bool) {
			if created && r.CreatedAt == nil {
				r.CreatedAt = now
			}
		},
		indexes: []index[snapshotRec]{
			{field: IndexVolumeID, value: snapshotRec.GetVolumeId},
			{field: IndexParentID, value: snapshotRec.GetParentId},
			{field: IndexState, value: func(r snapshotRec) string { return SnapshotStateName(r.GetState()) }},
		},
	}, snapshotMachine, snapshotRec.GetState, func(r snapshotRec, s stowagev1.SnapshotState) { r.State = s })

	// SnapshotsOnStore are snapshots on one store each (snapshot_store_ref),
	// on primary or in an image store.
	SnapshotsOnStore = newStatefulKind(&Kind[sosRec]{
		name:   "snapshot_on_store",
		noun:   "snapshot on store",
		newRec: func() sosRec { return &stowagev1.SnapshotOnStore{} },
		setRev: func(r sosRec, v uint64) { r.Revision = v },
		touch:  noTouch[sosRec],
		indexes: []index[sosRec]{
			{field: IndexSnapshotID, value: sosRec.GetSnapshotId},
			{field: IndexStoreID, value: sosRec.GetStoreId},
			{field: IndexState, value: func(r sosRec) string { return ObjectStateName(r.GetState()) }},
		},
	}, objectMachine, sosRec.GetState, func(r sosRec, s stowagev1.ObjectState) { r.State = s })

	// Jobs are asynchronous operations.
	Jobs = newStatefulKind(&Kind[jobRec]{
		name:   "job",
		noun:   "job",
		newRec: func() jobRec { return &stowagev1.Job{} },
		setRev: func(r jobRec, v uint64) { r.Revision = v },
		touch: func(r jobRec, now *timestamppb.Timestamp, created bool) {
			if created && r.CreatedAt == nil {
				r.CreatedAt = now
			}
			r.UpdatedAt = now
		},
		indexes: []index[jobRec]{
			{field: IndexState, value: func(r jobRec) string { return JobStateName(r.GetState()) }},
			{field: IndexTargetID, value: jobRec.GetTargetId},
			{field: IndexIdempotencyKey, unique: true, value: jobRec.GetIdempotencyKey},
			{field: IndexCreatedBy, value: jobRec.GetCreatedBy},
		},
	}, jobMachine, jobRec.GetState, func(r jobRec, s stowagev1.JobState) { r.State = s })

	// Tokens are the API's bearer tokens (controller/apiauth): the SHA-256
	// of each secret, never the secret. They have no state machine: a token
	// is usable until it expires or is revoked.
	Tokens = &Kind[tokenRec]{
		name:   "token",
		noun:   "token",
		newRec: func() tokenRec { return &stowagev1.TokenRecord{} },
		setRev: func(r tokenRec, v uint64) { r.Revision = v },
		touch: func(r tokenRec, now *timestamppb.Timestamp, created bool) {
			if created && r.CreatedAt == nil {
				r.CreatedAt = now
			}
		},
		indexes: []index[tokenRec]{
			{field: IndexRole, value: func(r tokenRec) string { return TokenRoleName(r.GetRole()) }},
		},
	}
)

// JoinTokens are the hashes of the one-time tokens agents join with
// (keyed by the token's id; no indexes).
var JoinTokens = &Kind[joinRec]{
	name:   "join_token",
	noun:   "join token",
	newRec: func() joinRec { return &stowagev1.JoinToken{} },
	setRev: func(r joinRec, v uint64) { r.Revision = v },
	touch: func(r joinRec, now *timestamppb.Timestamp, created bool) {
		if created && r.CreatedAt == nil {
			r.CreatedAt = now
		}
	},
}

// reindexer is the untyped face of a kind, for migrations and Check.
type reindexer interface {
	reindex(kt kvTxn) error
	verify(kt kvTxn) error
}

// allKinds lists every kind, for migrations.
var allKinds = []reindexer{Stores, Hosts, Templates, TemplatesOnStore, Volumes, Snapshots, SnapshotsOnStore, Jobs, Tokens, JoinTokens}
