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
)

// DataObject is an object on a store: the entity and the store it lives on
// (the same template is a different DataObject on an image and a primary store).
type DataObject struct {
	ID     string
	Type   ObjectType
	Store  StoreInfo
	Format Format
	// Size is the virtual size in bytes.
	Size int64
	// Path is the object's install path relative to the store, once created.
	Path string
}

// ObjectInfo is what a driver reports about an object it holds.
type ObjectInfo struct {
	ID           string
	Type         ObjectType
	Path         string // relative to the store
	Format       Format
	Size         int64 // virtual size
	PhysicalSize int64 // bytes allocated
	ModifiedAt   time.Time
}

// Client is who is granted access to an object: a host.
type Client struct {
	HostID string
}

// URI names data: file:///..., nbd://host:port/export, http(s)://..., s3://b/k, iscsi://p/t/l.
type URI string

// SnapshotObject is a snapshot of a volume on a primary store.
type SnapshotObject struct {
	DataObject
	Volume DataObject
	Parent string // id of the parent snapshot, "" for the first
}

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

// Driver moves and shapes data objects on the stores of one provider.
type Driver interface {
	GrantAccess(ctx context.Context, obj DataObject, client Client) (URI, error)
	RevokeAccess(ctx context.Context, obj DataObject, client Client) error
	ListObjects(ctx context.Context, store StoreInfo) ([]ObjectInfo, error)
	Create(ctx context.Context, obj DataObject) (ObjectInfo, error)
	Delete(ctx context.Context, obj DataObject) error
	CanCopy(src, dst DataObject) bool
	Copy(ctx context.Context, src, dst DataObject) (ObjectInfo, error)
}

// PrimaryDriver adds the two snapshot operations of a primary store.
type PrimaryDriver interface {
	Driver
	TakeSnapshot(ctx context.Context, snap SnapshotObject) (ObjectInfo, error)
	RevertSnapshot(ctx context.Context, snap SnapshotObject) error
}

// Resizer is an optional Driver capability.
type Resizer interface {
	Resize(ctx context.Context, obj DataObject, newSize int64) (ObjectInfo, error)
}
