// Package proxy is the remote side of drivers.Endpoint: the controller calls
// an agent's AgentService through it, and the agent turns RPC tasks back into
// calls on its local endpoint with the conversions in convert.go (Execute).
//
// Task ids. When the context carries a task id (drivers.WithTaskID, set by
// the controller's job runner per plan step), each call's id is derived from
// it with drivers.StepTaskID, keyed by the step kind and a digest of the
// step's arguments: "<step id>.<kind>-<digest>" (".<n>" for the n-th
// identical call). A step re-run after a controller restart thus sends the
// same ids and gets the agent's journalled results, or waits for a task
// still running, instead of doing the work twice; a call the first run did
// not make gets a fresh id, never another call's result. Without a task id
// every call gets a random one. A call that fails because the agent could
// not be reached is retried with the same id, so the agent does the work at
// most once.
//
// Progress. RunTask blocks until the task is done; a method that takes a
// drivers.Progress polls GetTask meanwhile (every 500 ms, WithPollInterval)
// and reports the bytes done, then once more with the final count. The
// callback is never called concurrently nor after the method returned.
package proxy

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"sync"
	"time"

	"connectrpc.com/connect"
	"github.com/google/uuid"
	"google.golang.org/protobuf/proto"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/errdefs/errconnect"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
)

// Endpoint runs host steps on one agent over Connect.
type Endpoint struct {
	hostID   string
	client   stowagev1connect.AgentServiceClient
	attempts int
	backoff  time.Duration
	poll     time.Duration
}

var _ drivers.Endpoint = (*Endpoint)(nil)

// Option configures an Endpoint.
type Option func(*Endpoint)

// WithRetry sets how many times a call is attempted while the agent is
// unreachable, and the first pause between attempts (doubled each time).
func WithRetry(attempts int, backoff time.Duration) Option {
	return func(e *Endpoint) { e.attempts, e.backoff = attempts, backoff }
}

// WithPollInterval sets how often a call with a progress callback asks the
// agent how far its task has come (default 500 ms).
func WithPollInterval(d time.Duration) Option {
	return func(e *Endpoint) {
		if d > 0 {
			e.poll = d
		}
	}
}

// New returns an Endpoint for the agent of hostID serving at baseURL.
func New(hostID, baseURL string, hc connect.HTTPClient, opts ...Option) *Endpoint {
	if hc == nil {
		hc = http.DefaultClient
	}
	e := &Endpoint{
		hostID:   hostID,
		client:   stowagev1connect.NewAgentServiceClient(hc, baseURL),
		attempts: 3,
		backoff:  200 * time.Millisecond,
		poll:     500 * time.Millisecond,
	}
	for _, o := range opts {
		o(e)
	}
	return e
}

// HostID implements drivers.Endpoint.
func (e *Endpoint) HostID() string { return e.hostID }

// taskID is the id of task: derived from the context's task id, else random.
func taskID(ctx context.Context, task *stowagev1.Task) string {
	if _, ok := drivers.TaskIDFrom(ctx); !ok {
		return uuid.NewString()
	}
	kind := "step"
	m := task.ProtoReflect()
	if fd := m.WhichOneof(m.Descriptor().Oneofs().ByName("step")); fd != nil {
		kind = string(fd.Name())
	}
	step := proto.Clone(task).(*stowagev1.Task)
	step.Id = ""
	b, _ := proto.MarshalOptions{Deterministic: true}.Marshal(step)
	sum := sha256.Sum256(b)
	id, _ := drivers.StepTaskID(ctx, kind+"-"+hex.EncodeToString(sum[:6]))
	return id
}

// run sends task and returns its result, retrying unreachable agents with
// the same task id; a task's own failure comes back as a classed error.
// With progress, GetTask is polled while the task runs.
func (e *Endpoint) run(ctx context.Context, task *stowagev1.Task, progress drivers.Progress) (*stowagev1.TaskResult, error) {
	task.Id = taskID(ctx, task)
	wait := e.backoff
	var lastErr error
	for attempt := 0; attempt < e.attempts; attempt++ {
		if attempt > 0 {
			select {
			case <-ctx.Done():
				return nil, fmt.Errorf("host %s: %w", e.hostID, ctx.Err())
			case <-time.After(wait):
			}
			wait *= 2
		}
		res, err := e.runOnce(ctx, task, progress)
		if err != nil {
			lastErr = errconnect.FromConnect(err)
			if errdefs.IsUnavailable(lastErr) && ctx.Err() == nil {
				continue
			}
			if ctx.Err() != nil {
				return nil, fmt.Errorf("host %s: task %s: %w", e.hostID, task.Id, ctx.Err())
			}
			return nil, fmt.Errorf("host %s: %w", e.hostID, lastErr)
		}
		if res.GetErrorClass() != "" || res.GetError() != "" {
			return nil, fmt.Errorf("host %s: %w", e.hostID, errdefs.New(errdefs.FromClassName(res.GetErrorClass()), res.GetError()))
		}
		return res, nil
	}
	return nil, fmt.Errorf("host %s unreachable after %d attempts: %w", e.hostID, e.attempts, lastErr)
}

// runOnce makes one RunTask call, polling GetTask for progress meanwhile.
func (e *Endpoint) runOnce(ctx context.Context, task *stowagev1.Task, progress drivers.Progress) (*stowagev1.TaskResult, error) {
	if progress == nil {
		resp, err := e.client.RunTask(ctx, connect.NewRequest(&stowagev1.RunTaskRequest{Task: task}))
		if err != nil {
			return nil, err
		}
		return resp.Msg.GetResult(), nil
	}
	pctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	var last [2]int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		last = e.pollProgress(pctx, task.GetId(), progress)
	}()
	resp, err := e.client.RunTask(ctx, connect.NewRequest(&stowagev1.RunTaskRequest{Task: task}))
	stop()
	wg.Wait()
	if err != nil {
		return nil, err
	}
	res := resp.Msg.GetResult()
	if res.GetErrorClass() == "" && res.GetBytesTotal() > 0 && [2]int64{res.GetBytesDone(), res.GetBytesTotal()} != last {
		progress(res.GetBytesDone(), res.GetBytesTotal())
	}
	return res, nil
}

// pollProgress asks for the progress of task id until ctx ends and reports
// changes; it returns the last values reported.
func (e *Endpoint) pollProgress(ctx context.Context, id string, progress drivers.Progress) [2]int64 {
	last := [2]int64{-1, -1}
	t := time.NewTicker(e.poll)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return last
		case <-t.C:
		}
		resp, err := e.client.GetTask(ctx, connect.NewRequest(&stowagev1.GetTaskRequest{TaskId: id}))
		if err != nil {
			continue // not started yet, or a transient failure: RunTask decides
		}
		r := resp.Msg.GetResult()
		if r.GetDone() {
			return last
		}
		if cur := [2]int64{r.GetBytesDone(), r.GetBytesTotal()}; cur != last && ctx.Err() == nil {
			progress(cur[0], cur[1])
			last = cur
		}
	}
}

// PrepareStore implements drivers.Endpoint.
func (e *Endpoint) PrepareStore(ctx context.Context, path, storeID string, subdirs []string) (drivers.StoreProbe, error) {
	res, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_PrepareStore{PrepareStore: &stowagev1.PrepareStoreStep{
		Path: path, StoreId: storeID, Subdirs: subdirs, Claim: true,
	}}}, nil)
	if err != nil {
		return drivers.StoreProbe{}, err
	}
	return ProbeFromProto(res.GetProbe()), nil
}

// ProbeStore implements drivers.Endpoint.
func (e *Endpoint) ProbeStore(ctx context.Context, path, storeID string) (drivers.StoreProbe, error) {
	res, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_ProbeStore{ProbeStore: &stowagev1.ProbeStoreStep{
		Path: path, StoreId: storeID,
	}}}, nil)
	if err != nil {
		return drivers.StoreProbe{}, err
	}
	return ProbeFromProto(res.GetProbe()), nil
}

// ReleaseStore implements drivers.Endpoint.
func (e *Endpoint) ReleaseStore(ctx context.Context, path, storeID string, subdirs []string) error {
	_, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_ReleaseStore{ReleaseStore: &stowagev1.ReleaseStoreStep{
		Path: path, StoreId: storeID, Subdirs: subdirs,
	}}}, nil)
	return err
}

// CreateImage implements drivers.Endpoint.
func (e *Endpoint) CreateImage(ctx context.Context, path string, format drivers.Format, size int64) (drivers.FileInfo, error) {
	res, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_CreateImage{CreateImage: &stowagev1.CreateImageStep{
		Path: path, Format: FormatToProto(format), SizeBytes: size,
	}}}, nil)
	if err != nil {
		return drivers.FileInfo{}, err
	}
	return FileFromProto(res.GetFile()), nil
}

// DeletePath implements drivers.Endpoint.
func (e *Endpoint) DeletePath(ctx context.Context, path string) error {
	_, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_DeletePath{DeletePath: &stowagev1.DeletePathStep{Path: path}}}, nil)
	return err
}

// ListDir implements drivers.Endpoint.
func (e *Endpoint) ListDir(ctx context.Context, path string) ([]drivers.FileInfo, error) {
	res, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_ListDir{ListDir: &stowagev1.ListDirStep{Path: path}}}, nil)
	if err != nil {
		return nil, err
	}
	out := make([]drivers.FileInfo, 0, len(res.GetFiles().GetFiles()))
	for _, f := range res.GetFiles().GetFiles() {
		out = append(out, FileFromProto(f))
	}
	return out, nil
}

// StatPath implements drivers.Endpoint.
func (e *Endpoint) StatPath(ctx context.Context, path string) (drivers.FileInfo, error) {
	res, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_StatPath{StatPath: &stowagev1.StatPathStep{Path: path}}}, nil)
	if err != nil {
		return drivers.FileInfo{}, err
	}
	return FileFromProto(res.GetFile()), nil
}

// image runs a step whose result is an image.
func (e *Endpoint) image(ctx context.Context, task *stowagev1.Task, progress drivers.Progress) (drivers.ImageInfo, error) {
	res, err := e.run(ctx, task, progress)
	if err != nil {
		return drivers.ImageInfo{}, err
	}
	return ImageInfoFromProto(res.GetImage()), nil
}

// backup runs a step whose result is a backup.
func (e *Endpoint) backup(ctx context.Context, task *stowagev1.Task, progress drivers.Progress) (drivers.BackupInfo, error) {
	res, err := e.run(ctx, task, progress)
	if err != nil {
		return drivers.BackupInfo{}, err
	}
	return BackupInfoFromProto(res.GetBackup()), nil
}

// FetchImage implements drivers.ImageOps.
func (e *Endpoint) FetchImage(ctx context.Context, req drivers.FetchRequest, progress drivers.Progress) (drivers.ImageInfo, error) {
	return e.image(ctx, &stowagev1.Task{Step: &stowagev1.Task_FetchImage{FetchImage: &stowagev1.FetchImageStep{
		Source: req.Source, Dest: req.Dest, Format: FormatToProto(req.Format), Checksum: req.Checksum,
	}}}, progress)
}

// CopyImage implements drivers.ImageOps.
func (e *Endpoint) CopyImage(ctx context.Context, req drivers.CopyRequest, progress drivers.Progress) (drivers.ImageInfo, error) {
	return e.image(ctx, &stowagev1.Task{Step: &stowagev1.Task_CopyImage{CopyImage: &stowagev1.CopyImageStep{
		Source: req.Source, SourceFormat: FormatToProto(req.SourceFormat), Dest: req.Dest, Format: FormatToProto(req.Format), Flatten: req.Flatten,
	}}}, progress)
}

// CloneImage implements drivers.ImageOps.
func (e *Endpoint) CloneImage(ctx context.Context, req drivers.CloneRequest, progress drivers.Progress) (drivers.ImageInfo, error) {
	return e.image(ctx, &stowagev1.Task{Step: &stowagev1.Task_CloneImage{CloneImage: &stowagev1.CloneImageStep{
		Base: req.Base, BaseFormat: FormatToProto(req.BaseFormat), Dest: req.Dest, Mode: CloneModeToProto(req.Mode),
		Format: FormatToProto(req.Format), SizeBytes: req.Size,
	}}}, progress)
}

// InspectImage implements drivers.ImageOps.
func (e *Endpoint) InspectImage(ctx context.Context, path string, format drivers.Format) (drivers.ImageInfo, error) {
	return e.image(ctx, &stowagev1.Task{Step: &stowagev1.Task_InspectImage{InspectImage: &stowagev1.InspectImageStep{
		Path: path, Format: FormatToProto(format),
	}}}, nil)
}

// ResizeImage implements drivers.ImageOps.
func (e *Endpoint) ResizeImage(ctx context.Context, path string, format drivers.Format, size int64) (drivers.ImageInfo, error) {
	return e.image(ctx, &stowagev1.Task{Step: &stowagev1.Task_ResizeImage{ResizeImage: &stowagev1.ResizeImageStep{
		Path: path, Format: FormatToProto(format), SizeBytes: size,
	}}}, nil)
}

// SnapshotImage implements drivers.ImageOps.
func (e *Endpoint) SnapshotImage(ctx context.Context, req drivers.SnapshotRequest) (drivers.SnapshotInfo, error) {
	res, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_SnapshotImage{SnapshotImage: &stowagev1.SnapshotImageStep{
		Volume: req.Volume, Snapshot: req.Snapshot, Format: FormatToProto(req.Format),
	}}}, nil)
	if err != nil {
		return drivers.SnapshotInfo{}, err
	}
	return SnapshotInfoFromProto(res.GetSnapshot()), nil
}

// RevertImage implements drivers.ImageOps.
func (e *Endpoint) RevertImage(ctx context.Context, req drivers.SnapshotRequest) (drivers.ImageInfo, error) {
	return e.image(ctx, &stowagev1.Task{Step: &stowagev1.Task_RevertImage{RevertImage: &stowagev1.RevertImageStep{
		Volume: req.Volume, Snapshot: req.Snapshot, Format: FormatToProto(req.Format),
	}}}, nil)
}

// RebaseImage implements drivers.ImageOps.
func (e *Endpoint) RebaseImage(ctx context.Context, path, newBacking string, backingFormat drivers.Format) (drivers.ImageInfo, error) {
	return e.image(ctx, &stowagev1.Task{Step: &stowagev1.Task_RebaseImage{RebaseImage: &stowagev1.RebaseImageStep{
		Path: path, NewBacking: newBacking, BackingFormat: FormatToProto(backingFormat),
	}}}, nil)
}

// BackupImage implements drivers.ImageOps.
func (e *Endpoint) BackupImage(ctx context.Context, req drivers.BackupRequest, progress drivers.Progress) (drivers.BackupInfo, error) {
	return e.backup(ctx, &stowagev1.Task{Step: &stowagev1.Task_BackupImage{BackupImage: &stowagev1.BackupImageStep{
		Source: req.Source, SourceFormat: FormatToProto(req.SourceFormat), ChunkDir: req.ChunkDir, Manifest: req.Manifest,
		ParentManifest: req.ParentManifest, ChunkSize: req.ChunkSize,
	}}}, progress)
}

// RestoreImage implements drivers.ImageOps.
func (e *Endpoint) RestoreImage(ctx context.Context, req drivers.RestoreRequest, progress drivers.Progress) (drivers.ImageInfo, error) {
	return e.image(ctx, &stowagev1.Task{Step: &stowagev1.Task_RestoreImage{RestoreImage: &stowagev1.RestoreImageStep{
		Manifest: req.Manifest, ChunkDir: req.ChunkDir, Dest: req.Dest, Format: FormatToProto(req.Format),
	}}}, progress)
}

// DeleteBackup implements drivers.ImageOps.
func (e *Endpoint) DeleteBackup(ctx context.Context, req drivers.DeleteBackupRequest) (drivers.BackupInfo, error) {
	return e.backup(ctx, &stowagev1.Task{Step: &stowagev1.Task_DeleteBackup{DeleteBackup: &stowagev1.DeleteBackupStep{
		Manifest: req.Manifest, ChunkDir: req.ChunkDir,
	}}}, nil)
}

// Export implements drivers.ImageOps.
func (e *Endpoint) Export(ctx context.Context, path string) (drivers.URI, error) {
	res, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_Export{Export: &stowagev1.ExportStep{Path: path}}}, nil)
	if err != nil {
		return "", err
	}
	return drivers.URI(res.GetUri()), nil
}

// Unexport implements drivers.ImageOps.
func (e *Endpoint) Unexport(ctx context.Context, uri drivers.URI) error {
	_, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_Unexport{Unexport: &stowagev1.UnexportStep{Uri: string(uri)}}}, nil)
	return err
}

// ExportNBD implements drivers.ImageOps.
func (e *Endpoint) ExportNBD(ctx context.Context, req drivers.NBDExportRequest) (drivers.URI, error) {
	res, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_ExportNbd{ExportNbd: &stowagev1.ExportNbdStep{
		Path: req.Path, Format: FormatToProto(req.Format), ReadOnly: req.ReadOnly,
	}}}, nil)
	if err != nil {
		return "", err
	}
	return drivers.URI(res.GetUri()), nil
}

// UnexportNBD implements drivers.ImageOps.
func (e *Endpoint) UnexportNBD(ctx context.Context, uri drivers.URI) error {
	_, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_UnexportNbd{UnexportNbd: &stowagev1.UnexportNbdStep{Uri: string(uri)}}}, nil)
	return err
}
