package api

import (
	"context"
	"fmt"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/stowage/stowage/controller/jobs"
	"github.com/stowage/stowage/controller/paging"
	"github.com/stowage/stowage/controller/volume"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
)

// ImageService is what the image handlers need from the domain.
type ImageService interface {
	Register(ctx context.Context, req *stowagev1.RegisterTemplateRequest) (*stowagev1.RegisterTemplateResponse, error)
	Create(ctx context.Context, req *stowagev1.CreateTemplateRequest) (*stowagev1.CreateTemplateResponse, error)
	Get(ctx context.Context, idOrName string) (*stowagev1.Template, []*stowagev1.TemplateOnStore, error)
	// List returns up to limit templates after the id after (paging).
	List(ctx context.Context, name, after string, limit int) ([]*stowagev1.Template, error)
	Delete(ctx context.Context, idOrName string, force, dryRun bool) (*stowagev1.DeleteTemplateResponse, error)
}

// VolumeService is what the volume handlers need from the domain.
type VolumeService interface {
	Create(ctx context.Context, req *stowagev1.CreateVolumeRequest) (*stowagev1.CreateVolumeResponse, error)
	Get(ctx context.Context, idOrName string) (*stowagev1.Volume, error)
	// List returns up to limit volumes f selects after the id after (paging).
	List(ctx context.Context, f volume.ListFilter, after string, limit int) ([]*stowagev1.Volume, error)
	Delete(ctx context.Context, idOrName string, dryRun bool) (*stowagev1.DeleteVolumeResponse, error)
	Resize(ctx context.Context, idOrName string, size int64, dryRun bool) (*stowagev1.ResizeVolumeResponse, error)
	// GrantAccess returns the URI and when it stops working (zero: never).
	GrantAccess(ctx context.Context, idOrName, hostID string, ttl time.Duration) (string, time.Time, error)
	RevokeAccess(ctx context.Context, idOrName, hostID string) error
	Migrate(ctx context.Context, idOrName, storeID string, dryRun bool) (*stowagev1.MigrateVolumeResponse, error)
}

// SnapshotService is what the snapshot handlers need from the domain.
type SnapshotService interface {
	Take(ctx context.Context, req *stowagev1.TakeSnapshotRequest) (*stowagev1.TakeSnapshotResponse, error)
	Get(ctx context.Context, id string) (*stowagev1.Snapshot, []*stowagev1.SnapshotOnStore, error)
	// List returns up to limit snapshots after the id after (paging).
	List(ctx context.Context, volumeID string, state stowagev1.SnapshotState, after string, limit int) ([]*stowagev1.Snapshot, error)
	Revert(ctx context.Context, id string, dryRun bool) (*stowagev1.RevertSnapshotResponse, error)
	Delete(ctx context.Context, id string, dryRun bool) (*stowagev1.DeleteSnapshotResponse, error)
	Backup(ctx context.Context, req *stowagev1.BackupSnapshotRequest) (*stowagev1.BackupSnapshotResponse, error)
	// GrantAccess returns the URI and when it stops working (zero: never).
	GrantAccess(ctx context.Context, id, hostID string, ttl time.Duration) (string, time.Time, error)
	RevokeAccess(ctx context.Context, id, hostID string) error
}

// JobService is what the job handlers need from the job runner.
type JobService interface {
	Get(ctx context.Context, id string) (*stowagev1.Job, error)
	// List returns the newest limit jobs f selects, newest first.
	List(ctx context.Context, f jobs.ListFilter, limit int) ([]*stowagev1.Job, error)
	// Page returns up to limit jobs f selects after the id after, oldest first.
	Page(ctx context.Context, f jobs.ListFilter, after string, limit int) ([]*stowagev1.Job, error)
	Cancel(ctx context.Context, id string) (*stowagev1.Job, error)
	Watch(ctx context.Context, id string, send func(*stowagev1.Job) error) error
}

// reply wraps a domain result in a Connect response, its errors, reasons
// and template URLs redacted (redactReply).
func reply[T any, PT interface {
	*T
	proto.Message
}](msg PT, err error) (*connect.Response[T], error) {
	if err != nil {
		return nil, err
	}
	return connect.NewResponse((*T)(redactReply(msg))), nil
}

type imageHandler struct{ svc ImageService }

var _ stowagev1connect.ImageServiceHandler = (*imageHandler)(nil)

func (h *imageHandler) RegisterTemplate(ctx context.Context, req *connect.Request[stowagev1.RegisterTemplateRequest]) (*connect.Response[stowagev1.RegisterTemplateResponse], error) {
	return reply(h.svc.Register(ctx, req.Msg))
}

func (h *imageHandler) CreateTemplate(ctx context.Context, req *connect.Request[stowagev1.CreateTemplateRequest]) (*connect.Response[stowagev1.CreateTemplateResponse], error) {
	return reply(h.svc.Create(ctx, req.Msg))
}

func (h *imageHandler) GetTemplate(ctx context.Context, req *connect.Request[stowagev1.GetTemplateRequest]) (*connect.Response[stowagev1.GetTemplateResponse], error) {
	t, refs, err := h.svc.Get(ctx, req.Msg.GetId())
	return reply(&stowagev1.GetTemplateResponse{Template: t, Stores: refs}, err)
}

func (h *imageHandler) ListTemplates(ctx context.Context, req *connect.Request[stowagev1.ListTemplatesRequest]) (*connect.Response[stowagev1.ListTemplatesResponse], error) {
	p, err := paging.Parse(req.Msg)
	if err != nil {
		return nil, err
	}
	ts, err := h.svc.List(ctx, req.Msg.GetName(), p.After, p.Limit())
	ts, next := paging.Cut(p, ts, (*stowagev1.Template).GetId)
	return reply(&stowagev1.ListTemplatesResponse{Templates: ts, NextPageToken: next}, err)
}

func (h *imageHandler) DeleteTemplate(ctx context.Context, req *connect.Request[stowagev1.DeleteTemplateRequest]) (*connect.Response[stowagev1.DeleteTemplateResponse], error) {
	return reply(h.svc.Delete(ctx, req.Msg.GetId(), req.Msg.GetForce(), req.Msg.GetDryRun()))
}

type volumeHandler struct{ svc VolumeService }

var _ stowagev1connect.VolumeServiceHandler = (*volumeHandler)(nil)

func (h *volumeHandler) CreateVolume(ctx context.Context, req *connect.Request[stowagev1.CreateVolumeRequest]) (*connect.Response[stowagev1.CreateVolumeResponse], error) {
	return reply(h.svc.Create(ctx, req.Msg))
}

func (h *volumeHandler) GetVolume(ctx context.Context, req *connect.Request[stowagev1.GetVolumeRequest]) (*connect.Response[stowagev1.GetVolumeResponse], error) {
	v, err := h.svc.Get(ctx, req.Msg.GetId())
	return reply(&stowagev1.GetVolumeResponse{Volume: v}, err)
}

func (h *volumeHandler) ListVolumes(ctx context.Context, req *connect.Request[stowagev1.ListVolumesRequest]) (*connect.Response[stowagev1.ListVolumesResponse], error) {
	p, err := paging.Parse(req.Msg)
	if err != nil {
		return nil, err
	}
	m := req.Msg
	vs, err := h.svc.List(ctx, volume.ListFilter{StoreID: m.GetStoreId(), TemplateID: m.GetTemplateId(), Name: m.GetName(), State: m.GetState()}, p.After, p.Limit())
	vs, next := paging.Cut(p, vs, (*stowagev1.Volume).GetId)
	return reply(&stowagev1.ListVolumesResponse{Volumes: vs, NextPageToken: next}, err)
}

func (h *volumeHandler) DeleteVolume(ctx context.Context, req *connect.Request[stowagev1.DeleteVolumeRequest]) (*connect.Response[stowagev1.DeleteVolumeResponse], error) {
	return reply(h.svc.Delete(ctx, req.Msg.GetId(), req.Msg.GetDryRun()))
}

func (h *volumeHandler) ResizeVolume(ctx context.Context, req *connect.Request[stowagev1.ResizeVolumeRequest]) (*connect.Response[stowagev1.ResizeVolumeResponse], error) {
	return reply(h.svc.Resize(ctx, req.Msg.GetId(), req.Msg.GetSize(), req.Msg.GetDryRun()))
}

func (h *volumeHandler) GrantAccess(ctx context.Context, req *connect.Request[stowagev1.GrantAccessRequest]) (*connect.Response[stowagev1.GrantAccessResponse], error) {
	uri, expires, err := h.svc.GrantAccess(ctx, req.Msg.GetId(), req.Msg.GetHostId(), time.Duration(req.Msg.GetTtlSeconds())*time.Second)
	resp := &stowagev1.GrantAccessResponse{Uri: uri}
	if !expires.IsZero() {
		resp.ExpiresAt = timestamppb.New(expires)
	}
	return reply(resp, err)
}

func (h *volumeHandler) RevokeAccess(ctx context.Context, req *connect.Request[stowagev1.RevokeAccessRequest]) (*connect.Response[stowagev1.RevokeAccessResponse], error) {
	return reply(&stowagev1.RevokeAccessResponse{}, h.svc.RevokeAccess(ctx, req.Msg.GetId(), req.Msg.GetHostId()))
}

func (h *volumeHandler) MigrateVolume(ctx context.Context, req *connect.Request[stowagev1.MigrateVolumeRequest]) (*connect.Response[stowagev1.MigrateVolumeResponse], error) {
	return reply(h.svc.Migrate(ctx, req.Msg.GetId(), req.Msg.GetStoreId(), req.Msg.GetDryRun()))
}

type snapshotHandler struct{ svc SnapshotService }

var _ stowagev1connect.SnapshotServiceHandler = (*snapshotHandler)(nil)

func (h *snapshotHandler) TakeSnapshot(ctx context.Context, req *connect.Request[stowagev1.TakeSnapshotRequest]) (*connect.Response[stowagev1.TakeSnapshotResponse], error) {
	return reply(h.svc.Take(ctx, req.Msg))
}

func (h *snapshotHandler) GetSnapshot(ctx context.Context, req *connect.Request[stowagev1.GetSnapshotRequest]) (*connect.Response[stowagev1.GetSnapshotResponse], error) {
	sn, refs, err := h.svc.Get(ctx, req.Msg.GetId())
	return reply(&stowagev1.GetSnapshotResponse{Snapshot: sn, Stores: refs}, err)
}

func (h *snapshotHandler) ListSnapshots(ctx context.Context, req *connect.Request[stowagev1.ListSnapshotsRequest]) (*connect.Response[stowagev1.ListSnapshotsResponse], error) {
	p, err := paging.Parse(req.Msg)
	if err != nil {
		return nil, err
	}
	ss, err := h.svc.List(ctx, req.Msg.GetVolumeId(), req.Msg.GetState(), p.After, p.Limit())
	ss, next := paging.Cut(p, ss, (*stowagev1.Snapshot).GetId)
	return reply(&stowagev1.ListSnapshotsResponse{Snapshots: ss, NextPageToken: next}, err)
}

func (h *snapshotHandler) RevertSnapshot(ctx context.Context, req *connect.Request[stowagev1.RevertSnapshotRequest]) (*connect.Response[stowagev1.RevertSnapshotResponse], error) {
	return reply(h.svc.Revert(ctx, req.Msg.GetId(), req.Msg.GetDryRun()))
}

func (h *snapshotHandler) DeleteSnapshot(ctx context.Context, req *connect.Request[stowagev1.DeleteSnapshotRequest]) (*connect.Response[stowagev1.DeleteSnapshotResponse], error) {
	return reply(h.svc.Delete(ctx, req.Msg.GetId(), req.Msg.GetDryRun()))
}

func (h *snapshotHandler) BackupSnapshot(ctx context.Context, req *connect.Request[stowagev1.BackupSnapshotRequest]) (*connect.Response[stowagev1.BackupSnapshotResponse], error) {
	return reply(h.svc.Backup(ctx, req.Msg))
}

func (h *snapshotHandler) GrantSnapshotAccess(ctx context.Context, req *connect.Request[stowagev1.GrantSnapshotAccessRequest]) (*connect.Response[stowagev1.GrantSnapshotAccessResponse], error) {
	uri, expires, err := h.svc.GrantAccess(ctx, req.Msg.GetId(), req.Msg.GetHostId(), time.Duration(req.Msg.GetTtlSeconds())*time.Second)
	resp := &stowagev1.GrantSnapshotAccessResponse{Uri: uri}
	if !expires.IsZero() {
		resp.ExpiresAt = timestamppb.New(expires)
	}
	return reply(resp, err)
}

func (h *snapshotHandler) RevokeSnapshotAccess(ctx context.Context, req *connect.Request[stowagev1.RevokeSnapshotAccessRequest]) (*connect.Response[stowagev1.RevokeSnapshotAccessResponse], error) {
	return reply(&stowagev1.RevokeSnapshotAccessResponse{}, h.svc.RevokeAccess(ctx, req.Msg.GetId(), req.Msg.GetHostId()))
}

type jobHandler struct{ svc JobService }

var _ stowagev1connect.JobServiceHandler = (*jobHandler)(nil)

func (h *jobHandler) GetJob(ctx context.Context, req *connect.Request[stowagev1.GetJobRequest]) (*connect.Response[stowagev1.GetJobResponse], error) {
	j, err := h.svc.Get(ctx, req.Msg.GetId())
	return reply(&stowagev1.GetJobResponse{Job: j}, err)
}

func (h *jobHandler) ListJobs(ctx context.Context, req *connect.Request[stowagev1.ListJobsRequest]) (*connect.Response[stowagev1.ListJobsResponse], error) {
	m := req.Msg
	f := jobs.ListFilter{State: m.GetState(), Target: m.GetTargetId()}
	if m.GetLimit() < 0 {
		return nil, fmt.Errorf("limit %d: want 0 or more: %w", m.GetLimit(), errdefs.ErrInvalid)
	}
	if m.GetLimit() > 0 && m.GetPageSize() == 0 && m.GetPageToken() == "" {
		// The form from before paging: the newest limit jobs.
		js, err := h.svc.List(ctx, f, int(m.GetLimit()))
		return reply(&stowagev1.ListJobsResponse{Jobs: js}, err)
	}
	p, err := paging.Parse(m)
	if err != nil {
		return nil, err
	}
	js, err := h.svc.Page(ctx, f, p.After, p.Limit())
	js, next := paging.Cut(p, js, (*stowagev1.Job).GetId)
	return reply(&stowagev1.ListJobsResponse{Jobs: js, NextPageToken: next}, err)
}

func (h *jobHandler) CancelJob(ctx context.Context, req *connect.Request[stowagev1.CancelJobRequest]) (*connect.Response[stowagev1.CancelJobResponse], error) {
	j, err := h.svc.Cancel(ctx, req.Msg.GetId())
	return reply(&stowagev1.CancelJobResponse{Job: j}, err)
}

func (h *jobHandler) WatchJob(ctx context.Context, req *connect.Request[stowagev1.WatchJobRequest], stream *connect.ServerStream[stowagev1.WatchJobResponse]) error {
	return h.svc.Watch(ctx, req.Msg.GetId(), func(j *stowagev1.Job) error {
		return stream.Send(redactReply(&stowagev1.WatchJobResponse{Job: j}))
	})
}
