package volume

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/stowage/stowage/controller/jobs"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/controller/motion"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/redact"
)

// ensureCached makes sure the volume's template is Ready on its primary
// store, copying it there once: the job that moves the spool ref to
// Creating copies; every other job waits for that one copy.
func (s *Service) ensureCached(ctx context.Context, job *stowagev1.Job, rep *jobs.Reporter, v *stowagev1.Volume, st *stowagev1.DataStore) (*stowagev1.TemplateOnStore, error) {
	tmpl, err := s.db.Templates().Get(ctx, v.GetTemplateId())
	if err != nil {
		return nil, err
	}
	for attempt := 0; attempt < 3; attempt++ {
		ref, err := s.SpoolRef(ctx, tmpl.GetId(), st.GetId())
		if errdefs.IsNotFound(err) {
			key, lerr := s.locateTemplate(st, tmpl)
			if lerr != nil {
				return nil, lerr
			}
			ref, err = s.db.TemplatesOnStore().Create(ctx, &stowagev1.TemplateOnStore{Id: meta.NewID(), TemplateId: tmpl.GetId(), StoreId: st.GetId(), InstallPath: key})
			if errdefs.IsAlreadyExists(err) {
				continue
			}
		}
		if err != nil {
			return nil, err
		}
		switch ref.GetState() {
		case stowagev1.ObjectState_OBJECT_STATE_READY:
			return ref, nil
		case stowagev1.ObjectState_OBJECT_STATE_FAILED, stowagev1.ObjectState_OBJECT_STATE_DESTROYING:
			// A failed earlier copy: clear it and try once more.
			if err := s.images.DeleteCopy(ctx, job, rep, ref); err != nil {
				return nil, err
			}
			continue
		case stowagev1.ObjectState_OBJECT_STATE_ALLOCATED:
			// The claim and its owner in one transaction: a controller
			// killed right after it resumes this job as the owner, never
			// leaves a copy Creating that no job owns.
			ref, err = s.db.TemplatesOnStore().TransitionIf(ctx, ref.GetId(), ref.GetRevision(), meta.ObjectCreateRequested, func(r *stowagev1.TemplateOnStore) error {
				r.OwnerJobId = job.GetId()
				return nil
			})
			if errdefs.IsConflict(err) || errdefs.IsFailedPrecondition(err) {
				continue // another job claimed the copy
			}
			if err != nil {
				return nil, err
			}
			return ref, s.copyTemplate(ctx, job, rep, tmpl, ref, st)
		case stowagev1.ObjectState_OBJECT_STATE_CREATING:
			if ref.GetOwnerJobId() == job.GetId() {
				// This job owned the copy before a controller restart.
				return ref, s.copyTemplate(ctx, job, rep, tmpl, ref, st)
			}
			rep.Phase("waiting for the template copy to store " + st.GetName())
			if ref, err = s.waitRef(ctx, ref.GetId()); err != nil {
				return nil, err
			}
			if ref.GetState() == stowagev1.ObjectState_OBJECT_STATE_READY {
				return ref, nil
			}
			if attempt < 2 {
				continue // Failed: cleared and copied again (the Failed case above)
			}
			return nil, fmt.Errorf("the copy of template %s to store %s failed: %s: %w", tmpl.GetName(), st.GetName(), ref.GetError(), errdefs.ErrFailedPrecondition)
		default:
			return nil, fmt.Errorf("cached template %s on store %s is %s: %w", tmpl.GetName(), st.GetName(), meta.ObjectStateName(ref.GetState()), errdefs.ErrFailedPrecondition)
		}
	}
	return nil, fmt.Errorf("template %s on store %s: too many concurrent changes: %w", tmpl.GetName(), st.GetName(), errdefs.ErrAborted)
}

// copyTemplate copies the template from an image store into the spool ref.
func (s *Service) copyTemplate(ctx context.Context, job *stowagev1.Job, rep *jobs.Reporter, tmpl *stowagev1.Template, ref *stowagev1.TemplateOnStore, st *stowagev1.DataStore) error {
	imgRef, imgStore, err := s.images.ReadyOn(ctx, tmpl.GetId(), stowagev1.StoreRole_STORE_ROLE_IMAGE)
	if err == nil {
		err = s.evictCache(ctx, job, rep, st, tmpl.GetVirtualSize())
	}
	var info drivers.ObjectInfo
	if err == nil {
		err = jobs.RunStep(ctx, job, rep, "cache-template", func(ctx context.Context) error {
			src, err := s.TemplateObject(ctx, imgStore, imgRef)
			if err != nil {
				return err
			}
			dst, err := s.TemplateObject(ctx, st, ref)
			if err != nil {
				return err
			}
			info, err = s.mover.Copy(ctx, motion.Move{Src: src, Dst: dst, Standalone: true, Prefer: jobs.PlanHost(job, "cache-template")}, rep.Bytes)
			return err
		})
	}
	if err != nil {
		// Failed and owned by no job (a cancelled or failed copy): the
		// next job that needs it clears it and copies again, and the
		// template can be deleted meanwhile.
		_, terr := s.db.TemplatesOnStore().Transition(context.WithoutCancel(ctx), ref.GetId(), meta.ObjectOperationFailed, func(r *stowagev1.TemplateOnStore) error {
			r.Error, r.OwnerJobId = redact.Text(err.Error()), ""
			return nil
		})
		return errors.Join(err, terr)
	}
	_, err = s.db.TemplatesOnStore().Transition(ctx, ref.GetId(), meta.ObjectOperationSucceeded, func(r *stowagev1.TemplateOnStore) error {
		r.Size, r.PhysicalSize, r.BytesDone, r.Error, r.OwnerJobId = info.Size, info.PhysicalSize, info.Size, "", ""
		r.LastUsed = timestamppb.Now()
		return nil
	})
	return err
}

// SpoolRef returns the cached copy of template on primary store st, if any.
func (s *Service) SpoolRef(ctx context.Context, templateID, storeID string) (*stowagev1.TemplateOnStore, error) {
	return s.db.TemplatesOnStore().GetBy(ctx, meta.IndexTemplateStore, meta.TemplateStoreKey(templateID, storeID))
}

// waitRef waits until the spool ref is Ready, Failed, or gone, woken by
// the metadata store's watches of the ref and of the job copying it (whose
// end without finishing the copy fails it).
func (s *Service) waitRef(ctx context.Context, id string) (*stowagev1.TemplateOnStore, error) {
	wctx, stop := context.WithCancel(ctx)
	defer stop()
	changed := s.db.TemplatesOnStore().Watch(wctx, id)
	var ownerChanged <-chan struct{}
	owner := ""
	for {
		r, err := s.db.TemplatesOnStore().Get(ctx, id)
		if err != nil {
			return nil, err
		}
		switch r.GetState() {
		case stowagev1.ObjectState_OBJECT_STATE_READY, stowagev1.ObjectState_OBJECT_STATE_FAILED:
			return r, nil
		case stowagev1.ObjectState_OBJECT_STATE_CREATING:
			if o := r.GetOwnerJobId(); o != owner && o != "" {
				owner, ownerChanged = o, s.db.Jobs().Watch(wctx, o)
			}
			if orphan, err := s.orphaned(ctx, r); err != nil {
				return nil, err
			} else if orphan {
				// The job that was copying ended without finishing it:
				// fail the copy, so that it is cleared and made again.
				return s.db.TemplatesOnStore().Transition(ctx, r.GetId(), meta.ObjectOperationFailed, func(r *stowagev1.TemplateOnStore) error {
					r.Error = "the job copying it ended before it was done"
					return nil
				})
			}
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-changed:
		case <-ownerChanged:
		}
	}
}

// orphaned reports whether copy r is Creating with no live job copying it:
// no owner recorded, or an owner job that ended or is gone.
func (s *Service) orphaned(ctx context.Context, r *stowagev1.TemplateOnStore) (bool, error) {
	if r.GetOwnerJobId() == "" {
		return false, nil // a copy claimed by an older controller: its job records no owner
	}
	j, err := s.db.Jobs().Get(ctx, r.GetOwnerJobId())
	if errdefs.IsNotFound(err) {
		return true, nil
	}
	if err != nil {
		return false, err
	}
	switch j.GetState() {
	case stowagev1.JobState_JOB_STATE_SUCCEEDED, stowagev1.JobState_JOB_STATE_FAILED, stowagev1.JobState_JOB_STATE_CANCELLED:
		return true, nil
	}
	return false, nil
}

// evictCache removes unreferenced cached templates on st, least recently
// used first, until CacheLowWater of its capacity is free (or none is left).
func (s *Service) evictCache(ctx context.Context, job *stowagev1.Job, rep *jobs.Reporter, st *stowagev1.DataStore, need int64) error {
	if st.GetCapacityBytes() <= 0 {
		return nil
	}
	floor := int64(float64(st.GetCapacityBytes()) * s.CacheLowWater)
	free := st.GetAvailableBytes() - need
	if free >= floor {
		return nil
	}
	refs, err := s.db.TemplatesOnStore().ListBy(ctx, meta.IndexStoreID, st.GetId())
	if err != nil {
		return err
	}
	var lru []*stowagev1.TemplateOnStore
	for _, r := range refs {
		if r.GetRefCount() == 0 && r.GetState() == stowagev1.ObjectState_OBJECT_STATE_READY {
			lru = append(lru, r)
		}
	}
	slices.SortFunc(lru, func(a, b *stowagev1.TemplateOnStore) int {
		return a.GetLastUsed().AsTime().Compare(b.GetLastUsed().AsTime())
	})
	for _, r := range lru {
		if free >= floor {
			break
		}
		if err := s.images.DeleteCopy(ctx, job, rep, r); err != nil {
			return err
		}
		free += r.GetPhysicalSize()
		s.log.Info("evicted cached template", "store", st.GetName(), "template", r.GetTemplateId(), "bytes", r.GetPhysicalSize())
	}
	return nil
}
