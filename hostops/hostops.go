// Package hostops is how the deciding side gets work done on a hypervisor
// host: small role interfaces (Stores, Objects, Images, Backups, Exports)
// addressed as (store id, key) — never as a host path — that the agent
// implements and that drivers and the controller's data motion consume, and
// Remote, the client that carries them to an agent over Connect.
//
// An agent resolves every Ref beneath the root of a store it serves (one it
// prepared or probed for the controller, or was assigned at registration)
// and refuses anything else with errdefs.ErrPermissionDenied: no absolute
// path, no "..", no symbolic link leaving the store. The one exception is
// the store id TemplateMount, which names the host's read-only template
// mount (key: a template id).
//
// Every call is idempotent: retrying a step that already ran has the same
// result and does the work once. A context carrying a task id
// (drivers.WithTaskID) makes a remote call's id deterministic, so that a
// step re-run after a controller restart gets the agent's journalled result.
package hostops

import (
	"context"
	"time"

	"github.com/stowage/stowage/drivers"
)

// StoreRoot is a store directory as the store's driver defines it.
type StoreRoot struct {
	ID   string
	Path string
	// Subdirs is the layout PrepareStore creates and ReleaseStore removes.
	Subdirs []string
}

// StoreProbe is what a host sees of a store directory.
type StoreProbe struct {
	CapacityBytes  int64
	AvailableBytes int64
	Reflink        bool
	FSType         string
}

// FileInfo describes an object's file on a host.
type FileInfo struct {
	Key            string
	Size           int64
	AllocatedBytes int64
	IsDir          bool
	ModifiedAt     time.Time
	// Format is FormatQCOW2 for a file with a qcow2 header, "" otherwise.
	Format drivers.Format
	// VirtualSize is what a guest sees: the qcow2 header's size, else Size.
	VirtualSize int64
}

// Stores lays out, probes and releases store directories. After a
// successful PrepareStore or ProbeStore the agent serves the store: Refs
// naming it resolve beneath root.Path.
type Stores interface {
	// PrepareStore creates the layout under root.Path and a marker naming
	// root.ID, and probes it. It refuses (ErrFailedPrecondition) a
	// directory whose marker names another store, and
	// (ErrPermissionDenied) a directory outside the agent's allowed store
	// roots.
	PrepareStore(ctx context.Context, root StoreRoot) (StoreProbe, error)
	// ProbeStore reads capacity and features of a store directory that
	// must already carry root.ID's marker.
	ProbeStore(ctx context.Context, root StoreRoot) (StoreProbe, error)
	// ReleaseStore removes the marker and the (empty) layout; never data.
	ReleaseStore(ctx context.Context, root StoreRoot) error
}

// Objects creates, lists, describes and deletes the files of a store.
type Objects interface {
	// CreateImage creates an empty disk image.
	CreateImage(ctx context.Context, ref Ref, format drivers.Format, size int64) (FileInfo, error)
	// DeleteObject removes an object's file; a missing one is not an error.
	DeleteObject(ctx context.Context, ref Ref) error
	// ListObjects lists the files of the directory dir (ErrNotFound if it
	// is missing); temporary files are never listed.
	ListObjects(ctx context.Context, dir Ref) ([]FileInfo, error)
	// StatObject describes one file (ErrNotFound if it is missing).
	StatObject(ctx context.Context, ref Ref) (FileInfo, error)
}

// Images are the steps on disk images. Every step writes to a temporary
// name and renames into place only when it succeeded, so a failed or
// killed step leaves no partial object visible; a step whose destination
// already holds the expected content returns its info without doing the
// work again. Existing images are opened as the format the request declares,
// never probed (see agent/hostfs).
type Images interface {
	FetchImage(ctx context.Context, req FetchRequest, progress drivers.Progress) (ImageInfo, error)
	CopyImage(ctx context.Context, req CopyRequest, progress drivers.Progress) (ImageInfo, error)
	CloneImage(ctx context.Context, req CloneRequest, progress drivers.Progress) (ImageInfo, error)
	InspectImage(ctx context.Context, ref Ref, format drivers.Format) (ImageInfo, error)
	ResizeImage(ctx context.Context, ref Ref, format drivers.Format, size int64) (ImageInfo, error)
	SnapshotImage(ctx context.Context, req SnapshotRequest) (SnapshotInfo, error)
	RevertImage(ctx context.Context, req SnapshotRequest) (ImageInfo, error)
	// RebaseImage rewrites the qcow2 at ref onto newBacking (a zero Ref:
	// standalone), merging in the data of the layers it leaves out.
	RebaseImage(ctx context.Context, ref Ref, newBacking Ref, backingFormat drivers.Format) (ImageInfo, error)
}

// Backups store images as content-addressed chunks and rebuild them.
type Backups interface {
	BackupImage(ctx context.Context, req BackupRequest, progress drivers.Progress) (BackupInfo, error)
	RestoreImage(ctx context.Context, req RestoreRequest, progress drivers.Progress) (ImageInfo, error)
	DeleteBackup(ctx context.Context, req DeleteBackupRequest) (BackupInfo, error)
	// CollectChunks removes the chunks no manifest of the chunk store
	// refers to, under the store's exclusive lock; a manifest it cannot
	// read stops it (errdefs.ErrFailedPrecondition) before anything is
	// removed.
	CollectChunks(ctx context.Context, req CollectChunksRequest) (CollectInfo, error)
}

// Exports serve objects to other hosts.
type Exports interface {
	// Export serves the object read-only over HTTP (Range) from the agent
	// under an unguessable token, until Unexport or for ttl from when the
	// agent makes it (zero: no expiry); it returns the URL.
	Export(ctx context.Context, ref Ref, ttl time.Duration) (drivers.URI, error)
	// Unexport ends an export; an unknown one is not an error.
	Unexport(ctx context.Context, uri drivers.URI) error
	// ExportNBD serves the image over NBD under an unguessable export name.
	ExportNBD(ctx context.Context, req NBDExportRequest) (drivers.URI, error)
	// UnexportNBD removes the export and closes its connections.
	UnexportNBD(ctx context.Context, uri drivers.URI) error
	// ListExports returns the live exports (HTTP and NBD) of the objects
	// of store ("": of every store), each with the task it was made under
	// (OwnerFrom of the Export's context), so that the controller can end
	// those no job accounts for with Unexport or UnexportNBD.
	ListExports(ctx context.Context, store string) ([]ExportInfo, error)
}

// Host is one agent: every role.
type Host interface {
	// HostID is the id of the host the steps run on.
	HostID() string
	Stores
	Objects
	Images
	Backups
	Exports
	LUNs
}

// Selector gives drivers and the data motion the hosts that can work on a
// store. The controller implements it (its EndPointSelector).
type Selector interface {
	// ForScope returns an Up host in scope: the step's host
	// (drivers.WithHost) when it is Up and in scope, else the least busy.
	ForScope(ctx context.Context, scope drivers.Scope) (Host, error)
	// AllInScope returns every Up host in scope, the least busy first.
	AllInScope(ctx context.Context, scope drivers.Scope) ([]Host, error)
	// ForHost returns one host (ErrUnavailable if it is not Up).
	ForHost(ctx context.Context, hostID string) (Host, error)
	// InScope reports whether host hostID is registered in scope (whatever
	// its state; ErrNotFound for an unknown host).
	InScope(ctx context.Context, hostID string, scope drivers.Scope) (bool, error)
}
