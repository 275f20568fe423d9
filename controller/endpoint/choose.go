package endpoint

import (
	"context"
	"fmt"
	"strings"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// Choice is the host picked for a step, and why.
type Choice struct {
	Endpoint drivers.Endpoint
	HostID   string
	Reason   string
}

// Select picks an Up host that is in every one of scopes (it can reach every
// store the step touches). It prefers prefer (the host that already holds
// the data, or the one an earlier step used), then the least busy.
func (s *Selector) Select(ctx context.Context, prefer string, scopes ...drivers.Scope) (Choice, error) {
	up, err := s.hosts.UpHosts(ctx) // least busy first
	if err != nil {
		return Choice{}, err
	}
	var fit []*stowagev1.Host
	for _, h := range up {
		ok := true
		for _, sc := range scopes {
			ok = ok && inScope(h, sc)
		}
		if ok {
			fit = append(fit, h)
		}
	}
	if len(fit) == 0 {
		names := make([]string, len(scopes))
		for i, sc := range scopes {
			names[i] = sc.String()
		}
		if len(scopes) == 1 {
			return Choice{}, s.noneInScope(ctx, scopes[0])
		}
		return Choice{}, fmt.Errorf("no Up agent reaches all of %s: %w", strings.Join(names, " and "), errdefs.ErrUnavailable)
	}
	pick, why := fit[0], fmt.Sprintf("least busy of %d Up hosts in scope (%d tasks in flight)", len(fit), fit[0].GetInFlightTasks())
	for _, h := range fit {
		if h.GetId() == prefer {
			pick, why = h, "already holds the data"
			break
		}
	}
	return Choice{Endpoint: s.endpoint(pick), HostID: pick.GetId(), Reason: fmt.Sprintf("host %s: %s", pick.GetId(), why)}, nil
}

// Ops returns the chosen host's image operations, or ErrNotImplemented for
// an endpoint without them.
func (c Choice) Ops() drivers.ImageOps {
	if ops, ok := c.Endpoint.(drivers.ImageOps); ok {
		return ops
	}
	return noImageOps{host: c.HostID}
}

// noImageOps answers every image operation with ErrNotImplemented.
type noImageOps struct{ host string }

func (n noImageOps) err(op string) error {
	return fmt.Errorf("host %s cannot %s: %w", n.host, op, errdefs.ErrNotImplemented)
}

func (n noImageOps) FetchImage(context.Context, drivers.FetchRequest, drivers.Progress) (drivers.ImageInfo, error) {
	return drivers.ImageInfo{}, n.err("fetch images")
}
func (n noImageOps) CopyImage(context.Context, drivers.CopyRequest, drivers.Progress) (drivers.ImageInfo, error) {
	return drivers.ImageInfo{}, n.err("copy images")
}
func (n noImageOps) CloneImage(context.Context, drivers.CloneRequest, drivers.Progress) (drivers.ImageInfo, error) {
	return drivers.ImageInfo{}, n.err("clone images")
}
func (n noImageOps) InspectImage(context.Context, string) (drivers.ImageInfo, error) {
	return drivers.ImageInfo{}, n.err("inspect images")
}
func (n noImageOps) ResizeImage(context.Context, string, int64) (drivers.ImageInfo, error) {
	return drivers.ImageInfo{}, n.err("resize images")
}
func (n noImageOps) SnapshotImage(context.Context, drivers.SnapshotRequest) (drivers.SnapshotInfo, error) {
	return drivers.SnapshotInfo{}, n.err("snapshot images")
}
func (n noImageOps) RevertImage(context.Context, drivers.SnapshotRequest) (drivers.ImageInfo, error) {
	return drivers.ImageInfo{}, n.err("revert images")
}
func (n noImageOps) RebaseImage(context.Context, string, string) (drivers.ImageInfo, error) {
	return drivers.ImageInfo{}, n.err("rebase images")
}
func (n noImageOps) BackupImage(context.Context, drivers.BackupRequest, drivers.Progress) (drivers.BackupInfo, error) {
	return drivers.BackupInfo{}, n.err("back up images")
}
func (n noImageOps) RestoreImage(context.Context, drivers.RestoreRequest, drivers.Progress) (drivers.ImageInfo, error) {
	return drivers.ImageInfo{}, n.err("restore images")
}
func (n noImageOps) DeleteBackup(context.Context, drivers.DeleteBackupRequest) (drivers.BackupInfo, error) {
	return drivers.BackupInfo{}, n.err("delete backups")
}
func (n noImageOps) Export(context.Context, string) (drivers.URI, error) {
	return "", n.err("export files")
}
func (n noImageOps) Unexport(context.Context, drivers.URI) error { return n.err("export files") }
