// Package drivers is Stowage's storage plug-in SDK, after CloudStack's
// "Storage subsystem 2.0": a storage vendor implements a Provider, which hands
// out a LifeCycle (manage one data store) and a Driver (create, delete, copy
// and grant access to the objects on its stores). A PrimaryDriver adds
// snapshots. Optional capabilities are one-method interfaces found by type
// assertion; a missing one means errdefs.ErrNotImplemented.
//
// Drivers decide nothing about placement: the controller picks the store and
// the host. Drivers never touch host state directly either: any work that
// must run on a hypervisor host (mkdir, statfs, qemu-img) goes through the
// Endpoint the framework gives them, which runs the step on an agent.
//
// Life of a store, as the controller drives it:
//
//	info, _ := p.LifeCycle().Initialize(ctx, StoreSpec{...}) // layout + capacity, on an agent in scope
//	_ = p.LifeCycle().Attach(ctx, info, scope)               // every Up host in scope can reach it
//	obj, _ := p.Driver().Create(ctx, DataObject{...})        // a volume on the store
//	uri, _ := p.Driver().GrantAccess(ctx, obj, Client{HostID: "h1"})
//	_ = p.LifeCycle().Delete(ctx, info)                      // refused while objects remain
//
// Providers are registered explicitly, in cmd/stowage/builtins.go.
package drivers

import (
	"context"
	"time"
)

// Role is what a store of a provider can hold.
type Role string

// The roles of CloudStack's DataStoreProvider.getTypes.
const (
	RolePrimary    Role = "primary"
	RoleImage      Role = "image"
	RoleImageCache Role = "image-cache"
)

// Scope is where a store is reachable. Cluster and HostID narrow Zone.
type Scope struct {
	Zone    string
	Cluster string
	HostID  string
}

// Contains reports whether a host in zone/cluster with id hostID is in s.
func (s Scope) Contains(zone, cluster, hostID string) bool {
	if s.Zone != zone {
		return false
	}
	if s.Cluster != "" && s.Cluster != cluster {
		return false
	}
	return s.HostID == "" || s.HostID == hostID
}

// String renders s as zone[/cluster[/host]].
func (s Scope) String() string {
	out := s.Zone
	if s.Cluster != "" || s.HostID != "" {
		out += "/" + s.Cluster
	}
	if s.HostID != "" {
		out += "/" + s.HostID
	}
	return out
}

// StoreSpec is what an operator asks for when adding a store.
type StoreSpec struct {
	ID      string // chosen by the controller before Initialize
	Name    string
	Role    Role
	URL     string
	Scope   Scope
	Details map[string]string
}

// StoreInfo is a store as a provider knows it after Initialize.
type StoreInfo struct {
	ID       string
	Name     string
	Role     Role
	Provider string
	URL      string
	Scope    Scope
	// Details carries provider-specific facts (e.g. "path") that later calls need.
	Details        map[string]string
	CapacityBytes  int64
	AvailableBytes int64
}

// ObjectType is the kind of a data object.
type ObjectType string

// The data object types.
const (
	ObjectVolume   ObjectType = "volume"
	ObjectTemplate ObjectType = "template"
	ObjectSnapshot ObjectType = "snapshot"
)

// Format is the on-disk format of an object.
type Format string

// The formats Stowage handles.
const (
	FormatRaw   Format = "raw"
	FormatQCOW2 Format = "qcow2"
	FormatISO   Format = "iso"
	// The foreign template formats: a template of one is kept as
	// uploaded on an image store and converted (qemu-img convert, the
	// format declared, never probed) to raw or qcow2 wherever it is
	// installed; no volume is ever in one, and no overlay backs onto one.
	FormatVHD  Format = "vhd" // qemu's "vpc"
	FormatVHDX Format = "vhdx"
	FormatVMDK Format = "vmdk" // monolithic sparse or streamOptimized only
)

// Foreign reports whether f is a template-only format (vhd, vhdx, vmdk)
// that the copy engine cannot read and a volume cannot be in.
func (f Format) Foreign() bool {
	return f == FormatVHD || f == FormatVHDX || f == FormatVMDK
}

// DataObject is an object on a store: the entity and the store it lives on
// (the same template is a different DataObject on an image and a primary store).
type DataObject struct {
	ID     string
	Type   ObjectType
	Store  StoreInfo
	Format Format
	// Size is the virtual size in bytes.
	Size int64
	// Key is where the object lives on its store: opaque to everyone but
	// the store's driver, which chose it (Driver.Locate) and records it on
	// the object's record (install_path). "" until located.
	Key string
}

// ObjectInfo is what a driver reports about an object it holds or made.
type ObjectInfo struct {
	ID           string
	Type         ObjectType
	Key          string // the object's key on its store
	Format       Format
	Size         int64 // virtual size
	PhysicalSize int64 // bytes allocated
	// StoredSize is the length of the object as stored (a qcow2 file's
	// length, not its virtual size): what a reader of its bytes sees.
	StoredSize int64
	ModifiedAt time.Time
	// SHA256 of the object's bytes as stored, when the step computed it.
	SHA256 string
	// Method says how a copying, cloning or snapshot step did its work
	// ("reflink", "linked", "qcow2-external", "server-side-copy", ...), and
	// BytesWritten / BytesSkipped how much it wrote and skipped (holes).
	Method       string
	BytesWritten int64
	BytesSkipped int64
}

// Purpose is what a client wants an object's access for.
type Purpose string

// The access purposes.
const (
	// PurposeAttach: a hypervisor on the client host opens the object as a
	// VM disk (file:///…, nbd://…, later iscsi://, rbd:).
	PurposeAttach Purpose = "attach"
	// PurposeRead: the client host's agent reads the object's bytes with
	// its stream engine or template cache (store://…, http(s)://…, nbd://…).
	PurposeRead Purpose = "read"
	// PurposeWrite: the client host's agent writes the object (store://…):
	// the destination of a copy, restore or download.
	PurposeWrite Purpose = "write"
)

// Client is who is granted access to an object, and for what.
type Client struct {
	HostID  string
	Purpose Purpose
	// Transport, when set, asks for one kind of URI ("nbd", "http") where
	// the driver can give several for the purpose.
	Transport string
	// GuestView asks to read what a guest sees (a qcow2 chain read
	// through, as raw bytes) rather than the object as stored, where the
	// driver can serve that (an NBD export of the chain); Access.Format
	// then says what the URI's bytes are. A driver that cannot ignores it
	// and serves the object as stored.
	GuestView bool
	// TTL bounds the access: an export made for it ends this long after
	// it is made (Access.Expires says when). Zero: the purpose's default
	// (GrantTTL).
	TTL time.Duration
}

// DefaultGrantTTL bounds read and write access whose client asks for no
// TTL: the exports the controller makes for data motion and template
// serving end by themselves when nobody revokes them (a controller that
// crashed mid-copy), and the template mounts renew theirs at half life.
const DefaultGrantTTL = 6 * time.Hour

// GrantTTL is how long c's access lasts (zero: no expiry): its own TTL,
// else none to attach (a running VM must not lose its disk) and
// DefaultGrantTTL to read or write.
func (c Client) GrantTTL() time.Duration {
	switch {
	case c.TTL > 0:
		return c.TTL
	case c.Purpose == PurposeAttach:
		return 0
	}
	return DefaultGrantTTL
}

// URI names data: store://<store id>/<key> (an object of a store the agent
// resolves beneath the store's root), file:///..., nbd://host:port/export,
// http(s)://..., s3://bucket/prefix.
type URI string

// Access is what GrantAccess hands out.
type Access struct {
	URI      URI
	ReadOnly bool
	// Expires is when the URI stops working (presigned URLs); zero: never.
	Expires time.Time
	// Revocable says RevokeAccess must be called with this Access to end
	// it (an export made for the client); false: nothing to take back.
	Revocable bool
	// HostID is the host that serves the URI when it is an export made on
	// an agent (for RevokeAccess and for callers that record who serves).
	HostID string
	// Zeroed says a write grant's object reads as zeros (made empty for
	// this grant): a copy need not write the source's holes.
	Zeroed bool
	// Format, when set, is the format of the bytes the URI serves where it
	// differs from the object's (FormatRaw for a chain's guest view,
	// Client.GuestView); empty: the object's own format, as stored.
	Format Format
}

// SnapshotObject is a snapshot of a volume on a primary store.
type SnapshotObject struct {
	DataObject
	Volume DataObject
	Parent string // id of the parent snapshot, "" for the first
}

// Progress reports how far a long step has come: bytes done of total
// (total is 0 while unknown). Implementations call it from one goroutine at a
// time, at most a few times a second; it must not block.
type Progress func(done, total int64)

// Provider is the entry point of a storage plug-in; registered once at start.
type Provider interface {
	Name() string
	Roles() []Role
	LifeCycle() LifeCycle
	Driver() Driver
}

// LifeCycle manages the data stores of one provider.
type LifeCycle interface {
	// Initialize validates spec, prepares the store (on an agent in scope) and
	// reads its capacity. It leaves nothing behind when it fails.
	Initialize(ctx context.Context, spec StoreSpec) (StoreInfo, error)
	// Attach makes the store reachable from every Up host in scope; it
	// returns the ids of the hosts that can reach it.
	Attach(ctx context.Context, store StoreInfo, scope Scope) ([]string, error)
	Maintain(ctx context.Context, store StoreInfo) error
	CancelMaintain(ctx context.Context, store StoreInfo) error
	// Delete releases the store; it fails with ErrFailedPrecondition while
	// objects remain on it.
	Delete(ctx context.Context, store StoreInfo) error
}

// Driver moves and shapes data objects on the stores of one provider. Every
// method is idempotent: calling it again after a crash or a retry has the
// same result and does the work once.
type Driver interface {
	// Locate returns the key obj has, or will have once it is made, on its
	// store. It does no I/O; the controller records the key before any
	// work starts, so that a crashed step is found again on restart.
	Locate(obj DataObject) (string, error)
	// Create makes a blank volume of obj.Size bytes in obj.Format.
	Create(ctx context.Context, obj DataObject) (ObjectInfo, error)
	// Delete removes the object; a missing object is not an error.
	Delete(ctx context.Context, obj DataObject) error
	// ListObjects lists the objects a store holds.
	ListObjects(ctx context.Context, store StoreInfo) ([]ObjectInfo, error)
	// Stat describes one object (errdefs.ErrNotFound when it is missing).
	Stat(ctx context.Context, obj DataObject) (ObjectInfo, error)
	// GrantAccess returns a URI through which client can use the object
	// for client.Purpose. A client that cannot be served is
	// errdefs.ErrFailedPrecondition with the reason.
	GrantAccess(ctx context.Context, obj DataObject, client Client) (Access, error)
	// RevokeAccess ends an Access GrantAccess returned (a no-op when it is
	// not Revocable); ending one already ended is not an error.
	RevokeAccess(ctx context.Context, obj DataObject, client Client, access Access) error
	// CanCopy reports whether Copy can copy src (on this provider's or any
	// store) to dst (on this provider's store) natively, without the
	// generic stream motion: reflink inside one filesystem, server-side
	// copy inside one bucket, an array clone. For a snapshot src it
	// promises more: dst becomes a volume that reads as the snapshot
	// (its guest view, what a flattening copy makes) and that nothing the
	// snapshot's life does later changes (an RBD clone, flattened before
	// its snapshot goes).
	CanCopy(src, dst DataObject) bool
	// Copy copies src to dst natively (see CanCopy; otherwise
	// errdefs.ErrNotImplemented); dst.Format is the wanted format.
	Copy(ctx context.Context, src, dst DataObject, progress Progress) (ObjectInfo, error)
}

// PrimaryDriver adds the two snapshot operations of a primary store.
type PrimaryDriver interface {
	Driver
	// TakeSnapshot makes snap a point-in-time copy of snap.Volume
	// (ObjectInfo.Method says how: "qcow2-external", "reflink", "copy").
	TakeSnapshot(ctx context.Context, snap SnapshotObject) (ObjectInfo, error)
	// RevertSnapshot makes snap.Volume read what snap holds.
	RevertSnapshot(ctx context.Context, snap SnapshotObject) error
}

// ScopeReconciler is a LifeCycle whose stores admit hosts one by one (an
// iSCSI target's ACL and CHAP accounts). The controller calls it for
// every attached store when the hosts in its scope change (a host joins,
// or re-registers in another zone or cluster) and once at start: the
// store must then admit hostIDs and no other host, and end the sessions of
// the hosts it stops admitting. hostIDs are every registered host in the
// store's scope, whatever its state: a host only Disconnected from the
// controller may still run guests on the store. A LifeCycle without it
// admits by scope alone (a directory, a bucket) and has nothing to do.
type ScopeReconciler interface {
	ReconcileHosts(ctx context.Context, store StoreInfo, hostIDs []string) error
}

// The optional capabilities, one method each, found by type assertion; a
// driver without one makes the workflow route around it or refuse with a
// reason (errdefs.ErrNotImplemented).

// Resizer grows an object.
type Resizer interface {
	Resize(ctx context.Context, obj DataObject, newSize int64) (ObjectInfo, error)
}

// CloneMode is how a volume is made from a base image on its store.
type CloneMode string

// The clone modes (TemplateInstallStrategy implementations).
const (
	CloneReflink CloneMode = "reflink"
	CloneLinked  CloneMode = "linked"
	CloneFull    CloneMode = "full"
)

// CloneSpec asks for dst to be made from base.
type CloneSpec struct {
	// Base is a template on dst's store, or, with BaseInMount, the template
	// Base.ID as the host that runs the step shows it in its template mount
	// (a lazy volume: an overlay on the mount's file).
	Base        DataObject
	BaseInMount bool
	Dst         DataObject
	Mode        CloneMode
}

// Cloner makes a volume from a base image on the same store (or the host's
// template mount) without the generic copy.
type Cloner interface {
	Clone(ctx context.Context, spec CloneSpec, progress Progress) (ObjectInfo, error)
}

// ImportSource is data outside any store that an image store takes in.
type ImportSource struct {
	// URL is http:// or https://, or file:// (a filesystem image store's
	// agent reads it beneath its --import-dir; the controller accepted it
	// beneath its own). It reaches the agent as this URL, never as a path.
	URL string
	// Checksum is "sha256:HEX", "sha512:HEX", "md5:HEX" or "".
	Checksum string
	// Internal says Stowage made URL itself (an agent's export, a store's
	// presigned URL, during a data motion): it is infrastructure on the
	// management network, not an operator's input, so the address policy
	// for template URLs does not apply to it.
	Internal bool
}

// Importer takes a template or ISO in from a URL: streamed, the checksum
// verified in-stream and the real format checked against dst.Format (a
// qcow2 with a backing file is refused); nothing is left on the store when
// it fails (errdefs.ErrDataLoss for a checksum mismatch).
type Importer interface {
	Import(ctx context.Context, dst DataObject, src ImportSource, progress Progress) (ObjectInfo, error)
}

// Rebaser rewrites a qcow2 object onto another backing object of its store
// (newBase nil: standalone), merging in the data of the layers it leaves
// out: how a snapshot is dropped from a chain.
type Rebaser interface {
	Rebase(ctx context.Context, obj DataObject, newBase *DataObject) (ObjectInfo, error)
}

// BackupAccess is where a host reads and writes the chunks and manifest of
// one backup: a chunk store URI the agent opens (store://<id>/<dir> or
// s3://bucket/prefix?endpoint=…&region=…), the manifest's name in it, and
// the credentials the agent needs for it (never logged nor returned by the
// API).
type BackupAccess struct {
	Chunks   URI
	Manifest string
	Secret   map[string]string
}

// BackupStats is what deleting a backup freed.
type BackupStats struct {
	Chunks       int64 // chunks removed
	FreedBytes   int64
	KeptShared   int64 // chunks kept because another backup uses them
	ManifestGone bool
}

// ChunkTarget is an image store that keeps snapshot backups as
// content-addressed chunks plus one manifest per backup.
type ChunkTarget interface {
	// BackupAccess returns where client writes (or reads) backup obj.
	BackupAccess(ctx context.Context, obj DataObject, client Client) (BackupAccess, error)
	// DeleteBackup removes obj's manifest and the chunks no other backup
	// of the store refers to.
	DeleteBackup(ctx context.Context, obj DataObject) (BackupStats, error)
}

// Extent is Length bytes from Offset.
type Extent struct {
	Offset, Length int64
}

// ChangeTracker is implemented by a primary driver whose store knows which
// parts of a volume changed between two of its snapshots (RBD's diff): an
// incremental backup of snap reads only those.
type ChangeTracker interface {
	// Changed returns, sorted, every range in which snap may differ from
	// since, an earlier snapshot of the same volume still on the store
	// (errdefs.ErrNotFound when either is gone).
	Changed(ctx context.Context, snap, since SnapshotObject) ([]Extent, error)
}

// VolumeFormats is implemented by a driver whose stores hold volumes in
// some formats only (a LUN is a raw disk): the controller plans a volume
// on such a store in the first of them unless one of the others is asked
// for, and refuses any other.
type VolumeFormats interface {
	VolumeFormats() []Format
}

// ObjectFormats is implemented by a driver whose stores hold every object,
// cached templates included, in some formats only (an RBD image is raw):
// a template copied onto such a store is converted to the first of them
// (VolumeFormats alone leaves a cached template in its own format, as a
// LUN holds a qcow2 template's bytes).
type ObjectFormats interface {
	ObjectFormats() []Format
}

// HostRooted is implemented by a Provider whose stores are directories
// hosts see: HostRoot tells the agent of host hostID the directory of a
// store it should serve ("" for none), in its assignment at registration
// and in heartbeats, so that a restarted agent serves it again before any
// step asks. A filesystem store is one directory on every host in scope;
// an iSCSI store's LUN files are a directory on its target host only.
type HostRooted interface {
	HostRoot(store StoreInfo, hostID string) string
}

// ChunkCollector is a ChunkTarget that can remove the chunks of a store
// that no manifest refers to: what a backup that died before writing its
// manifest left behind. It holds the chunk store's exclusive lock while it
// works, so no backup is writing meanwhile.
type ChunkCollector interface {
	CollectChunks(ctx context.Context, store StoreInfo) (BackupStats, error)
}

// Grant is an access a driver made on a host and that is still live: an
// export of one object of a store.
type Grant struct {
	Access Access
	// Key is the object's key on the store.
	Key string
	// TaskID is the task id the grant was made under (drivers.TaskIDFrom
	// of the GrantAccess call's context, "" if none): which job made it.
	TaskID string
	// SharedWith are the task ids (as TaskID) of later grants that share
	// the same access: an HTTP export of one file is one export however
	// many grants ask for it, and ends once each of them has been revoked
	// (or when it expires). Revoking it ends one grant's share; a grant
	// any of whose TaskID and SharedWith some job still accounts for must
	// be kept. A driver cannot tell which share a revoke ended, so these
	// stay listed until the access ends.
	SharedWith []string
	// Created is when the access was made (zero: unknown, an access made
	// before the driver recorded it).
	Created time.Time
}

// GrantLister is a driver whose grants live on hosts (exports): the
// orphan reconciler lists them and revokes those no record and no running
// job accounts for (Driver.RevokeAccess with Grant.Access).
type GrantLister interface {
	ListGrants(ctx context.Context, store StoreInfo) ([]Grant, error)
}
