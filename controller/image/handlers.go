package image

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/jobs"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/controller/motion"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// registerHandler downloads a template into each of its image stores.
type registerHandler struct{ s *Service }

func (h registerHandler) Run(ctx context.Context, job *stowagev1.Job, rep *jobs.Reporter) error {
	s := h.s
	t, err := s.db.Templates().Get(ctx, job.GetTargetId())
	if err != nil {
		return err
	}
	format, err := FormatFromProto(t.GetFormat())
	if err != nil {
		return err
	}
	refs, err := s.db.TemplatesOnStore().ListBy(ctx, meta.IndexTemplateID, t.GetId())
	if err != nil {
		return err
	}
	for _, ref := range refs {
		if ref.GetState() == stowagev1.ObjectState_OBJECT_STATE_READY {
			continue // done before a restart
		}
		st, err := s.db.Stores().Get(ctx, ref.GetStoreId())
		if err != nil {
			return err
		}
		if st.GetRole() != stowagev1.StoreRole_STORE_ROLE_IMAGE {
			continue
		}
		if ref.GetState() == stowagev1.ObjectState_OBJECT_STATE_ALLOCATED {
			if ref, err = s.db.TemplatesOnStore().Transition(ctx, ref.GetId(), meta.ObjectCreateRequested, nil); err != nil {
				return err
			}
		}
		step := "download-" + st.GetName()
		var info drivers.ObjectInfo
		err = jobs.RunStep(ctx, job, rep, step, func(ctx context.Context) error {
			imp, err := datastore.Capability[drivers.Importer](s.stores, st, "take a template in from a URL")
			if err != nil {
				return err
			}
			obj := datastore.Object(st, drivers.ObjectTemplate, t.GetId(), format, 0, ref.GetInstallPath())
			info, err = imp.Import(drivers.WithHost(ctx, jobs.PlanHost(job, step)), obj, drivers.ImportSource{URL: t.GetUrl(), Checksum: t.GetChecksum()},
				func(done, total int64) {
					rep.Bytes(done, total)
					_, _ = s.db.TemplatesOnStore().Update(context.WithoutCancel(ctx), ref.GetId(), 0, func(r *stowagev1.TemplateOnStore) error {
						r.BytesDone = done
						return nil
					})
				})
			return err
		})
		if err != nil {
			return err
		}
		if _, err := s.db.TemplatesOnStore().Transition(ctx, ref.GetId(), meta.ObjectOperationSucceeded, func(r *stowagev1.TemplateOnStore) error {
			r.Size, r.PhysicalSize, r.BytesDone, r.Error = info.Size, info.PhysicalSize, info.Size, ""
			r.LastUsed = timestamppb.Now()
			return nil
		}); err != nil {
			return err
		}
		if _, err := s.db.Templates().Update(ctx, t.GetId(), 0, func(tt *stowagev1.Template) error {
			tt.VirtualSize = info.Size
			if info.SHA256 != "" {
				tt.Sha256 = info.SHA256
			}
			return nil
		}); err != nil {
			return err
		}
		rep.Result("template %s on store %s: %d bytes virtual, %d on disk", t.GetName(), st.GetName(), info.Size, info.PhysicalSize)
	}
	return nil
}

// Fail marks every copy that did not finish Failed with the cause.
func (h registerHandler) Fail(ctx context.Context, job *stowagev1.Job, cause error) error {
	return failRefs(ctx, h.s.db, job.GetTargetId(), cause)
}

func failRefs(ctx context.Context, db *meta.DB, templateID string, cause error) error {
	refs, err := db.TemplatesOnStore().ListBy(ctx, meta.IndexTemplateID, templateID)
	if err != nil {
		return err
	}
	var errs []error
	for _, r := range refs {
		switch r.GetState() {
		case stowagev1.ObjectState_OBJECT_STATE_ALLOCATED, stowagev1.ObjectState_OBJECT_STATE_CREATING:
			_, err := db.TemplatesOnStore().Transition(ctx, r.GetId(), meta.ObjectOperationFailed, func(r *stowagev1.TemplateOnStore) error {
				r.Error = cause.Error()
				return nil
			})
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// deleteHandler removes a template's unreferenced copies, and the template
// once no copy remains.
type deleteHandler struct{ s *Service }

func (h deleteHandler) Run(ctx context.Context, job *stowagev1.Job, rep *jobs.Reporter) error {
	s := h.s
	refs, err := s.db.TemplatesOnStore().ListBy(ctx, meta.IndexTemplateID, job.GetTargetId())
	if err != nil {
		return err
	}
	kept := 0
	for _, r := range refs {
		if r.GetRefCount() > 0 {
			kept++
			continue
		}
		if err := s.DeleteCopy(ctx, job, rep, r); err != nil {
			return err
		}
	}
	if kept == 0 {
		if err := s.db.Templates().Delete(ctx, job.GetTargetId(), 0); err != nil && !errdefs.IsNotFound(err) {
			return err
		}
		rep.Result("template %s deleted", job.GetTargetId())
	} else {
		rep.Result("template %s: %d copies kept for the volumes that depend on them", job.GetTargetId(), kept)
	}
	return nil
}

func (h deleteHandler) Fail(context.Context, *stowagev1.Job, error) error {
	// A copy whose delete failed stays Destroying; deleting the template
	// again retries it.
	return nil
}

// DeleteCopy removes one copy of a template (image store or primary cache):
// Destroying, the file removed on a host that reaches the store, then the
// record. It is idempotent.
func (s *Service) DeleteCopy(ctx context.Context, job *stowagev1.Job, rep *jobs.Reporter, r *stowagev1.TemplateOnStore) error {
	if r.GetState() != stowagev1.ObjectState_OBJECT_STATE_DESTROYING && r.GetState() != stowagev1.ObjectState_OBJECT_STATE_DESTROYED {
		var err error
		if r, err = s.db.TemplatesOnStore().Transition(ctx, r.GetId(), meta.ObjectDestroyRequested, nil); err != nil {
			return err
		}
	}
	st, err := s.db.Stores().Get(ctx, r.GetStoreId())
	if err == nil && r.GetState() == stowagev1.ObjectState_OBJECT_STATE_DESTROYING {
		err = jobs.RunStep(ctx, job, rep, "delete-"+r.GetId(), func(ctx context.Context) error {
			d, err := s.stores.Driver(st)
			if err != nil {
				return err
			}
			t, err := s.db.Templates().Get(ctx, r.GetTemplateId())
			if err != nil && !errdefs.IsNotFound(err) {
				return err
			}
			f, _ := FormatFromProto(t.GetFormat())
			return d.Delete(ctx, datastore.Object(st, drivers.ObjectTemplate, r.GetTemplateId(), f, r.GetSize(), r.GetInstallPath()))
		})
		if err != nil {
			return err
		}
		if _, err := s.db.TemplatesOnStore().Transition(ctx, r.GetId(), meta.ObjectOperationSucceeded, nil); err != nil {
			return err
		}
	} else if err != nil && !errdefs.IsNotFound(err) {
		return err
	}
	if err := s.db.TemplatesOnStore().Delete(ctx, r.GetId(), 0); err != nil && !errdefs.IsNotFound(err) {
		return fmt.Errorf("template copy %s: %w", r.GetId(), err)
	}
	return nil
}

// createHandler makes a template from a volume or snapshot on primary.
type createHandler struct{ s *Service }

func (h createHandler) Run(ctx context.Context, job *stowagev1.Job, rep *jobs.Reporter) error {
	s := h.s
	t, err := s.db.Templates().Get(ctx, job.GetTargetId())
	if err != nil {
		return err
	}
	refs, err := s.db.TemplatesOnStore().ListBy(ctx, meta.IndexTemplateID, t.GetId())
	if err != nil || len(refs) != 1 {
		return fmt.Errorf("template %s: expected one store copy (%v): %w", t.GetId(), err, errdefs.ErrInternal)
	}
	ref := refs[0]
	if ref.GetState() == stowagev1.ObjectState_OBJECT_STATE_READY {
		return nil
	}
	dst, err := s.db.Stores().Get(ctx, ref.GetStoreId())
	if err != nil {
		return err
	}
	params := job.GetJobParams().GetTemplateCreate()
	src, err := s.db.Stores().Get(ctx, params.GetSourceStoreId())
	if err != nil {
		return err
	}
	if ref.GetState() == stowagev1.ObjectState_OBJECT_STATE_ALLOCATED {
		if ref, err = s.db.TemplatesOnStore().Transition(ctx, ref.GetId(), meta.ObjectCreateRequested, nil); err != nil {
			return err
		}
	}
	format, err := FormatFromProto(t.GetFormat())
	if err != nil {
		return err
	}
	var info drivers.ObjectInfo
	if err := jobs.RunStep(ctx, job, rep, "copy", func(ctx context.Context) error {
		srcFormat, err := s.sourceFormat(ctx, t)
		if err != nil {
			return err
		}
		srcObj := datastore.Object(src, drivers.ObjectType(params.GetSourceType()), params.GetSourceId(), srcFormat, t.GetVirtualSize(), params.GetSourceKey())
		dstObj := datastore.Object(dst, drivers.ObjectTemplate, t.GetId(), format, t.GetVirtualSize(), ref.GetInstallPath())
		info, err = s.mover.Copy(ctx, motion.Move{Src: srcObj, Dst: dstObj, Flatten: true, Prefer: jobs.PlanHost(job, "copy")}, rep.Bytes)
		return err
	}); err != nil {
		return err
	}
	if _, err := s.db.TemplatesOnStore().Transition(ctx, ref.GetId(), meta.ObjectOperationSucceeded, func(r *stowagev1.TemplateOnStore) error {
		r.Size, r.PhysicalSize, r.BytesDone = info.Size, info.PhysicalSize, info.Size
		return nil
	}); err != nil {
		return err
	}
	_, err = s.db.Templates().Update(ctx, t.GetId(), 0, func(tt *stowagev1.Template) error {
		tt.VirtualSize, tt.Sha256 = info.Size, info.SHA256
		return nil
	})
	rep.Result("template %s made from %s %s: %d bytes virtual, %d on disk", t.GetName(), params.GetSourceType(), params.GetSourceId(), info.Size, info.PhysicalSize)
	return err
}

func (h createHandler) Fail(ctx context.Context, job *stowagev1.Job, cause error) error {
	return failRefs(ctx, h.s.db, job.GetTargetId(), cause)
}

// sourceFormat is the format of the volume template t is made from, as its
// record says (a snapshot has its volume's format): the agent opens the
// source as that and never probes it.
func (s *Service) sourceFormat(ctx context.Context, t *stowagev1.Template) (drivers.Format, error) {
	volID := t.GetSourceVolumeId()
	if volID == "" {
		sn, err := s.db.Snapshots().Get(ctx, t.GetSourceSnapshotId())
		if err != nil {
			return "", fmt.Errorf("source snapshot of template %s: %w", t.GetId(), err)
		}
		volID = sn.GetVolumeId()
	}
	v, err := s.db.Volumes().Get(ctx, volID)
	if err != nil {
		return "", fmt.Errorf("source volume of template %s: %w", t.GetId(), err)
	}
	f, err := FormatFromProto(v.GetFormat())
	if err != nil {
		return "", fmt.Errorf("source volume %s of template %s: %w", volID, t.GetId(), err)
	}
	return f, nil
}
