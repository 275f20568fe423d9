// Package meta is the controller's metadata repository: typed records
// (the protobuf messages of stowage/v1), their secondary indexes and their
// state machines, on an embedded Badger database.
//
// # Records and operations
//
// Each record kind (Stores, Hosts, Templates, TemplatesOnStore, Volumes,
// Snapshots, SnapshotsOnStore, Jobs, Tokens) is described by a Kind: key prefix,
// indexes, and for all but Templates and Tokens a state Machine. A DB hands out one
// repository per kind (db.Stores(), db.Volumes(), ...) whose methods each
// run in their own transaction:
//
//	st, err := db.Stores().Create(ctx, &stowagev1.DataStore{Id: meta.NewID(), Name: "p1"})
//	st, err = db.Stores().Transition(ctx, st.Id, meta.StoreAttachSucceeded, nil)   // Initialized -> Up
//	st, err = db.Stores().Update(ctx, st.Id, st.Revision, func(s *stowagev1.DataStore) error {
//		s.UsedBytes = used // anything but id, revision and state
//		return nil
//	})
//	ups, err := db.Stores().ListInState(ctx, stowagev1.StoreState_STORE_STATE_UP)
//
// Several records change atomically through DB.Txn and the kinds' ...Tx
// methods:
//
//	err := db.Txn(ctx, func(tx *meta.Tx) error {
//		if _, err := meta.Volumes.CreateTx(tx, vol); err != nil {
//			return err
//		}
//		_, err := meta.Jobs.CreateTx(tx, job)
//		return err
//	})
//
// Every write is a compare-and-set on the record's revision, which starts
// at 1 and grows by one per write: Update, TransitionIf and Delete take the
// revision the caller read (0 means "whatever is stored") and fail with
// errdefs.ErrConflict when it moved on. States change only through
// Transition, which asks the kind's Machine for the next state in the same
// transaction that writes it; an event the machine does not allow in the
// current state fails with errdefs.ErrFailedPrecondition and writes
// nothing. Transactions that lose a race inside the engine are re-run a
// bounded number of times, so of concurrent writers with the same expected
// revision (or the same event) exactly one succeeds. Errors wrap the
// errdefs classes and name the kind and the id.
//
// # Key layout
//
// Keys are plain text; values are deterministic protobuf encodings. Ids are
// 1-128 characters of [A-Za-z0-9._:-]. Indexed values are percent-encoded
// (url.PathEscape) so that "/" in a value cannot reach into the next
// segment. Empty values are not indexed. Enum values are indexed by their
// CloudStack-style names (EnumName: "Up", "PrepareForMaintenance").
//
//	meta/schema-version                          "4" (decimal): the layout version, see migrations.go
//	meta/restore-incomplete                      only while Restore writes (backup.go): Open refuses the store
//	<kind>/<id>                                  the record (protobuf)
//	idx/<kind>/<field>/<value>/<id>              secondary index entry (empty value)
//	uniq/<kind>/<field>/<value>                  unique index entry -> owner id
//
//	store/<id>                                   DataStore
//	  idx/store/role/<Primary|Image|ImageCache>/<id>
//	  idx/store/state/<StoreState>/<id>
//	  uniq/store/name/<name>                     names are unique
//	host/<id>                                    Host
//	  idx/host/state/<HostState>/<id>
//	  idx/host/zone/<zone>/<id>
//	  idx/host/hostname/<hostname>/<id>          not unique: a re-installed host gets a new id
//	template/<id>                                Template (no state)
//	  idx/template/name/<name>/<id>
//	template_on_store/<id>                       TemplateOnStore
//	  idx/template_on_store/template_id/<template id>/<id>
//	  idx/template_on_store/store_id/<store id>/<id>
//	  idx/template_on_store/state/<ObjectState>/<id>
//	  uniq/template_on_store/template_store/<TemplateStoreKey(template id, store id)>
//	volume/<id>                                  Volume
//	  idx/volume/store_id/<store id>/<id>
//	  idx/volume/template_id/<template id>/<id>
//	  idx/volume/state/<VolumeState>/<id>
//	  idx/volume/name/<name>/<id>                not unique, as in CloudStack
//	snapshot/<id>                                Snapshot
//	  idx/snapshot/volume_id/<volume id>/<id>
//	  idx/snapshot/parent_id/<parent snapshot id>/<id>
//	  idx/snapshot/state/<SnapshotState>/<id>
//	snapshot_on_store/<id>                       SnapshotOnStore
//	  idx/snapshot_on_store/snapshot_id/<snapshot id>/<id>
//	  idx/snapshot_on_store/store_id/<store id>/<id>
//	  idx/snapshot_on_store/state/<ObjectState>/<id>
//	job/<id>                                     Job
//	  idx/job/state/<JobState>/<id>
//	  idx/job/target_id/<target id>/<id>
//	  uniq/job/idempotency_key/<key>             only when the key is set
//	  idx/job/created_by/<caller>/<id>           only for jobs an API caller submitted
//	token/<id>                                   TokenRecord (API token: SHA-256 of the secret only)
//	  idx/token/role/<Admin|Operator|Reader>/<id>
//	join_token/<id>                              JoinToken (hash only)
//
// Listings come out ordered by id; ids from NewID are UUIDv7, so that is
// also creation order. Changing the layout means a new entry in the
// migrations slice (migrations.go), applied by Open, with its own test.
//
// # Backup and restore
//
// DB.Backup writes every key of one read snapshot in a versioned,
// SHA-256-checksummed stream (backup.go); Restore loads one into an empty
// store through the same kvStore seam, so it works on every engine, then
// migrates and checks it. VerifyBackup checks a stream without a store.
//
// # Storage engines
//
// Badger is confined to badger.go, etcd to etcd.go and leader.go, behind the
// small kvStore interface of kv.go (get, set, delete and prefix scan inside
// one serializable transaction, and a watch of one key). Open takes a
// directory (Badger, embedded: one controller) or
// etcd://host:port[,...]/prefix (several controllers share it).
//
// On etcd every key above is stored under <prefix>/kv/. A transaction reads
// at one revision and buffers its writes; its commit is one etcd
// transaction guarded by every key it read still having the revision it
// was read at (a deleted key fails that too), no key written after the read
// revision inside a range it scanned, and the leader fence (below). When
// those guards would exceed the cluster's --max-txn-ops, a coarser one
// replaces them: <prefix>/commit, rewritten by every write, unchanged since
// the read revision. A transaction writing more keys than --max-txn-ops is
// refused (errdefs.ErrResourceExhausted). The test suite runs every test
// on both engines (main_test.go).
//
// # Leadership
//
// Campaign elects one leader among the controllers sharing an etcd prefix
// (an etcd lease under <prefix>/leader/, clientv3/concurrency); Leader says
// who leads. Once a process leads, each of its commits also requires its
// election key to exist with the revision it was created at, so a leader
// whose lease expired cannot write over its successor. On Badger the one
// process that holds the directory leads at once.
package meta
