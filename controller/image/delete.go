package image

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/jobs"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

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

// Delete removes a template from every store; it refuses while a volume
// depends on it (a linked clone's backing file) unless force is set.
func (s *Service) Delete(ctx context.Context, idOrName string, force, dryRun bool) (*stowagev1.DeleteTemplateResponse, error) {
	t, refs, err := s.Get(ctx, idOrName)
	if err != nil {
		return nil, err
	}
	vols, err := s.db.Volumes().ListBy(ctx, meta.IndexTemplateID, t.GetId())
	if err != nil {
		return nil, err
	}
	var deps, lazy []string
	for _, v := range vols {
		if v.GetState() == stowagev1.VolumeState_VOLUME_STATE_EXPUNGED {
			continue
		}
		if v.GetInstallMethod() == LazyMethod {
			lazy = append(lazy, v.GetName())
		} else if v.GetBaseRefId() != "" {
			deps = append(deps, v.GetName())
		}
	}
	if len(lazy) > 0 {
		// No --force: a lazy volume reads the template from its image store
		// copy through the hosts' template mounts; there is no other copy.
		return nil, fmt.Errorf("template %s backs lazy volumes %s through the hosts' template mounts (the image store copy is the only one); delete those volumes first: %w",
			t.GetName(), strings.Join(lazy, ", "), errdefs.ErrFailedPrecondition)
	}
	if len(deps) > 0 && !force {
		return nil, fmt.Errorf("template %s backs volumes %s (linked clones); delete them first or pass --force (the cached copies they need are kept): %w",
			t.GetName(), strings.Join(deps, ", "), errdefs.ErrFailedPrecondition)
	}
	plan := &stowagev1.Plan{Strategy: "delete", Priority: "DEFAULT"}
	for _, r := range refs {
		if slices.Contains([]stowagev1.ObjectState{stowagev1.ObjectState_OBJECT_STATE_CREATING, stowagev1.ObjectState_OBJECT_STATE_COPYING}, r.GetState()) {
			return nil, fmt.Errorf("template %s is being copied to store %s; cancel that job or wait: %w", t.GetName(), r.GetStoreId(), errdefs.ErrAborted)
		}
		if r.GetRefCount() > 0 {
			plan.Reasons = append(plan.Reasons, fmt.Sprintf("copy on store %s kept: %d volumes depend on it", r.GetStoreId(), r.GetRefCount()))
			continue
		}
		plan.Steps = append(plan.Steps, &stowagev1.PlanStep{Name: "delete-" + r.GetId(), Reason: "remove the copy on store " + r.GetStoreId() + " through its driver"})
	}
	if dryRun {
		return &stowagev1.DeleteTemplateResponse{Plan: plan}, nil
	}
	job, _, err := s.jobs.Submit(ctx, jobs.NewJob(KindDelete, t.GetId(), "", plan, &stowagev1.JobParams{Kind: &stowagev1.JobParams_TemplateDelete{TemplateDelete: &stowagev1.TemplateDeleteParams{Force: force}}}), nil)
	if err != nil {
		return nil, err
	}
	return &stowagev1.DeleteTemplateResponse{Job: job, Plan: plan}, nil
}
