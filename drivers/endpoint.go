package drivers

import (
	"context"
	"time"
)

// Endpoint is a handle on one agent that runs host-side steps for a driver.
// Every call is idempotent: retrying a step that already ran has the same
// result and does the work once. A context carrying a task id (WithTaskID)
// makes a remote call's id deterministic, so that a step re-run after a
// controller restart gets the agent's journalled result.
type Endpoint interface {
	// ImageOps are the steps on disk images (imageops.go).
	ImageOps

	// HostID is the id of the host the steps run on.
	HostID() string
	// PrepareStore creates the store layout under path (subdirectories and a
	// marker naming storeID) and probes it. It refuses (ErrFailedPrecondition)
	// a directory whose marker names another store.
	PrepareStore(ctx context.Context, path, storeID string, subdirs []string) (StoreProbe, error)
	// ProbeStore reads capacity and features of a store directory that must
	// already carry storeID's marker.
	ProbeStore(ctx context.Context, path, storeID string) (StoreProbe, error)
	// ReleaseStore removes the marker and the (empty) layout; never data.
	ReleaseStore(ctx context.Context, path, storeID string, subdirs []string) error
	// CreateImage creates an empty disk image at path (absolute on the host).
	CreateImage(ctx context.Context, path string, format Format, size int64) (FileInfo, error)
	// DeletePath removes a file; a missing file is not an error.
	DeletePath(ctx context.Context, path string) error
	// ListDir lists the entries of a directory (ErrNotFound if it is missing).
	ListDir(ctx context.Context, path string) ([]FileInfo, error)
	// StatPath describes one file (ErrNotFound if it is missing).
	StatPath(ctx context.Context, path string) (FileInfo, error)
}

// StoreProbe is what a host sees of a store directory.
type StoreProbe struct {
	CapacityBytes  int64
	AvailableBytes int64
	Reflink        bool
	FSType         string
}

// FileInfo describes a file on a host.
type FileInfo struct {
	Path           string
	Size           int64
	AllocatedBytes int64
	IsDir          bool
	ModifiedAt     time.Time
	// Format is FormatQCOW2 for a file with a qcow2 header, "" otherwise.
	Format Format
	// VirtualSize is what a guest sees: the qcow2 header's size, else Size.
	VirtualSize int64
}

// Endpoints gives drivers the agents that can do host work for a store.
// The controller implements it (EndPointSelector); tests may use a local one.
type Endpoints interface {
	// ForScope returns an Up endpoint in scope, preferring the least busy.
	ForScope(ctx context.Context, scope Scope) (Endpoint, error)
	// AllInScope returns every Up endpoint in scope.
	AllInScope(ctx context.Context, scope Scope) ([]Endpoint, error)
	// ForHost returns the endpoint of one host (ErrUnavailable if it is not Up).
	ForHost(ctx context.Context, hostID string) (Endpoint, error)
}
