package volume

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/image"
	"github.com/stowage/stowage/controller/jobs"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/controller/motion"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/redact"
)

type createHandler struct{ s *Service }

var _ jobs.Starter = createHandler{}

// Start moves the job's volume from Allocated to Creating in the
// transaction that starts the job (Run does it for a job resumed with the
// volume still Allocated).
func (h createHandler) Start(tx *meta.Tx, job *stowagev1.Job) error {
	v, err := meta.Volumes.GetTx(tx, job.GetTargetId())
	if err != nil {
		return err
	}
	if v.GetState() != stowagev1.VolumeState_VOLUME_STATE_ALLOCATED {
		return nil
	}
	_, err = meta.Volumes.TransitionTx(tx, v.GetId(), 0, meta.VolumeCreateRequested, nil)
	return err
}

func (h createHandler) Run(ctx context.Context, job *stowagev1.Job, rep *jobs.Reporter) error {
	s := h.s
	v, err := s.db.Volumes().Get(ctx, job.GetTargetId())
	if err != nil {
		return err
	}
	if v.GetState() == stowagev1.VolumeState_VOLUME_STATE_READY {
		return nil
	}
	// Admitted when submitted; held again when resumed (the runner's
	// end-of-job hook releases it).
	s.stores.Hold(v.GetStoreId(), job.GetId(), job.GetJobParams().GetVolumeCreate().GetReservedBytes())
	if v.GetState() == stowagev1.VolumeState_VOLUME_STATE_ALLOCATED {
		if v, err = s.db.Volumes().Transition(ctx, v.GetId(), meta.VolumeCreateRequested, nil); err != nil {
			return err
		}
	}
	st, err := s.db.Stores().Get(ctx, v.GetStoreId())
	if err != nil {
		return err
	}
	params := job.GetJobParams().GetVolumeCreate()
	format := hostops.FormatFromProto(params.GetFormat())
	dst := datastore.Object(st, drivers.ObjectVolume, v.GetId(), format, v.GetSize(), v.GetInstallPath())
	var info drivers.ObjectInfo
	var spool *stowagev1.TemplateOnStore
	switch {
	case v.GetTemplateId() != "" && v.GetInstallMethod() == image.LazyMethod:
		err = jobs.RunStep(ctx, job, rep, "install", func(ctx context.Context) error {
			zone := ""
			if is, err := s.db.Stores().Get(ctx, params.GetImageStoreId()); err == nil {
				zone = datastore.Scope(is).Zone
			}
			ch, err := s.sel.SelectWhere(ctx, jobs.PlanHost(job, "install"), s.mountNeed(v.GetTemplateId(), zone), datastore.Scope(st))
			if err != nil {
				return err
			}
			if err := s.showOnHost(ctx, ch.Host, v.GetTemplateId()); err != nil {
				return err
			}
			baseFormat, err := s.templateFormat(ctx, v.GetTemplateId())
			if err != nil {
				return err
			}
			cl, err := datastore.Capability[drivers.Cloner](s.stores, st, "make a lazy volume (an overlay on the host's template mount)")
			if err != nil {
				return err
			}
			dst.Format = drivers.FormatQCOW2
			base := drivers.DataObject{ID: v.GetTemplateId(), Type: drivers.ObjectTemplate, Format: baseFormat}
			info, err = cl.Clone(drivers.WithHost(ctx, ch.HostID), drivers.CloneSpec{Base: base, BaseInMount: true, Dst: dst, Mode: drivers.CloneLinked}, rep.Bytes)
			return err
		})
	case v.GetTemplateId() != "":
		if spool, err = s.ensureCached(ctx, job, rep, v, st); err != nil {
			return err
		}
		err = jobs.RunStep(ctx, job, rep, "install", func(ctx context.Context) error {
			base, err := s.TemplateObject(ctx, st, spool)
			if err != nil {
				return err
			}
			cl, err := datastore.Capability[drivers.Cloner](s.stores, st, "install a volume from a cached template")
			if err != nil {
				return err
			}
			info, err = cl.Clone(drivers.WithHost(ctx, jobs.PlanHost(job, "install")), drivers.CloneSpec{Base: base, Dst: dst, Mode: drivers.CloneMode(params.GetCloneMode())}, rep.Bytes)
			return err
		})
	case v.GetSnapshotId() != "":
		err = s.createFromSnapshot(ctx, job, rep, v, st, dst, &info)
	default:
		err = jobs.RunStep(ctx, job, rep, "create", func(ctx context.Context) error {
			d, err := s.stores.Driver(st)
			if err != nil {
				return err
			}
			info, err = d.Create(drivers.WithHost(ctx, jobs.PlanHost(job, "create")), dst)
			return err
		})
	}
	if err != nil {
		return err
	}
	linked := drivers.CloneMode(params.GetCloneMode()) == drivers.CloneLinked
	// The volume turns Ready in the transaction that records the job's
	// success.
	rep.OnSuccess(func(tx *meta.Tx) error {
		if linked && spool != nil {
			if _, err := meta.TemplatesOnStore.UpdateTx(tx, spool.GetId(), 0, func(r *stowagev1.TemplateOnStore) error {
				r.RefCount++
				r.LastUsed = timestamppb.Now()
				return nil
			}); err != nil {
				return err
			}
		}
		_, err := meta.Volumes.TransitionTx(tx, v.GetId(), 0, meta.VolumeOperationSucceeded, func(v *stowagev1.Volume) error {
			if info.Size > 0 {
				v.Size = info.Size
			}
			v.Format = hostops.FormatToProto(format)
			v.BusyJobId, v.Error = "", ""
			if linked && spool != nil {
				v.BaseRefId = spool.GetId()
			}
			return nil
		})
		return err
	})
	rep.Result("volume %s ready on store %s (%s, %d bytes, %s)", v.GetName(), st.GetName(), format, info.Size, orDefault(info.Method, v.GetInstallMethod()))
	return nil
}

func orDefault(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

func (s *Service) createFromSnapshot(ctx context.Context, job *stowagev1.Job, rep *jobs.Reporter, v *stowagev1.Volume, st *stowagev1.DataStore, dst drivers.DataObject, info *drivers.ObjectInfo) error {
	ref, err := s.db.SnapshotsOnStore().Get(ctx, job.GetJobParams().GetVolumeCreate().GetSourceRefId())
	if err != nil {
		return err
	}
	src, err := s.db.Stores().Get(ctx, ref.GetStoreId())
	if err != nil {
		return err
	}
	obj, err := s.SnapshotObject(ctx, src, ref)
	if err != nil {
		return err
	}
	if ref.GetRole() == stowagev1.StoreRole_STORE_ROLE_PRIMARY {
		return jobs.RunStep(ctx, job, rep, "copy", func(ctx context.Context) error {
			*info, err = s.mover.Copy(ctx, motion.Move{Src: obj, Dst: dst, Flatten: true, Prefer: jobs.PlanHost(job, "copy")}, rep.Bytes)
			return err
		})
	}
	return jobs.RunStep(ctx, job, rep, "restore", func(ctx context.Context) error {
		*info, err = s.restore(ctx, jobs.PlanHost(job, "restore"), src, obj, st, dst, rep.Bytes)
		return err
	})
}

// restore rebuilds dst (on primary store st) from backup obj (on image
// store src) on a host that reaches st and that src's driver gives the
// backup's chunks to.
func (s *Service) restore(ctx context.Context, prefer string, src *stowagev1.DataStore, obj drivers.DataObject, st *stowagev1.DataStore, dst drivers.DataObject, progress drivers.Progress) (drivers.ObjectInfo, error) {
	ct, err := datastore.Capability[drivers.ChunkTarget](s.stores, src, "keep backups")
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	d, err := s.stores.Driver(st)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	ctx = s.stores.WithNeeds(ctx, src, st)
	ch, err := s.sel.Select(ctx, prefer, datastore.Scope(src), datastore.Scope(st))
	if err != nil {
		if ch, err = s.sel.Select(ctx, prefer, datastore.Scope(st)); err != nil {
			return drivers.ObjectInfo{}, err
		}
	}
	ctx = drivers.WithHost(ctx, ch.HostID)
	ba, err := ct.BackupAccess(ctx, obj, drivers.Client{HostID: ch.HostID, Purpose: drivers.PurposeRead})
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	writer := drivers.Client{HostID: ch.HostID, Purpose: drivers.PurposeWrite}
	acc, err := d.GrantAccess(ctx, dst, writer)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	if acc.Revocable {
		defer func() { _ = d.RevokeAccess(context.WithoutCancel(ctx), dst, writer, acc) }()
	}
	req := hostops.RestoreRequest{Chunks: hostops.ChunkStore{URI: ba.Chunks, Secret: ba.Secret}, Manifest: ba.Manifest, Format: dst.Format}
	if req.Dest, req.DestURI, req.DestIsZero, err = hostops.WriteGrant(acc); err != nil {
		return drivers.ObjectInfo{}, err
	}
	ii, err := ch.Endpoint.RestoreImage(ctx, req, progress)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	return ii.Object(dst), nil
}

// Fail marks a volume that could not be created Failed, with the reason,
// and releases the copy of its template to the store if this job was
// making it (a job resumed in Cancelling never ran copyTemplate's own
// release): Failed and owned by no job, so the next job clears and copies
// it again and the template can be deleted meanwhile.
func (h createHandler) Fail(ctx context.Context, job *stowagev1.Job, cause error) error {
	v, err := h.s.db.Volumes().Get(ctx, job.GetTargetId())
	if err != nil {
		return err
	}
	switch v.GetState() {
	case stowagev1.VolumeState_VOLUME_STATE_ALLOCATED, stowagev1.VolumeState_VOLUME_STATE_CREATING:
		_, err = h.s.db.Volumes().Transition(ctx, v.GetId(), meta.VolumeOperationFailed, func(v *stowagev1.Volume) error {
			v.Error, v.BusyJobId = cause.Error(), ""
			return nil
		})
	}
	if v.GetTemplateId() == "" || v.GetInstallMethod() == image.LazyMethod {
		return err
	}
	return errors.Join(err, h.s.releaseSpool(ctx, job, v, cause))
}

// releaseSpool fails the copy of v's template to v's store when job owns
// it and it is still Creating.
func (s *Service) releaseSpool(ctx context.Context, job *stowagev1.Job, v *stowagev1.Volume, cause error) error {
	ref, err := s.SpoolRef(ctx, v.GetTemplateId(), v.GetStoreId())
	if errdefs.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("volume %s: the copy of its template: %w", v.GetId(), err)
	}
	if ref.GetState() != stowagev1.ObjectState_OBJECT_STATE_CREATING || ref.GetOwnerJobId() != job.GetId() {
		return nil
	}
	_, err = s.db.TemplatesOnStore().TransitionIf(ctx, ref.GetId(), ref.GetRevision(), meta.ObjectOperationFailed, func(r *stowagev1.TemplateOnStore) error {
		r.Error, r.OwnerJobId = redact.Text(cause.Error()), ""
		return nil
	})
	if err != nil {
		return fmt.Errorf("release the copy %s of template %s on store %s: %w", ref.GetId(), v.GetTemplateId(), v.GetStoreId(), err)
	}
	return nil
}

// showOnHost makes host h's template mount show template templateID before
// a lazy volume's overlay is made on it: nothing to do when h's heartbeat
// reports it shown already; else the mount planner's entry for h (computed
// now if the template is newer than its last pass) is pushed to h's agent
// as a show_template step, which returns once the mount lists it. This is
// what lets a lazy volume be created a moment after its template's
// registration, without waiting up to two heartbeats.
func (s *Service) showOnHost(ctx context.Context, h *stowagev1.Host, templateID string) error {
	if s.mounts == nil || MountShows(templateID).OK(h) {
		return nil
	}
	sp, err := s.mounts.Show(ctx, h.GetId(), templateID)
	if err != nil {
		return err
	}
	hh, err := s.sel.ForHost(ctx, h.GetId())
	if err != nil {
		return err
	}
	ts, ok := hh.(hostops.TemplateShower)
	if !ok {
		return fmt.Errorf("host %s: cannot be told to show a template: %w", h.GetId(), errdefs.ErrNotImplemented)
	}
	return ts.ShowTemplate(ctx, sp)
}
