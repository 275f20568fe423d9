package image

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/jobs"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/redact"
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

// Register validates req, plans the download and, unless it is a dry run,
// records the template and its per-store rows and starts the job.
func (s *Service) Register(ctx context.Context, req *stowagev1.RegisterTemplateRequest) (*stowagev1.RegisterTemplateResponse, error) {
	// A retry with an earlier request's key returns its job, before the
	// name check that template it recorded would now fail.
	if job, ok, err := s.earlier(ctx, req.GetIdempotencyKey(), req.GetDryRun()); err != nil || ok {
		if err != nil {
			return nil, err
		}
		t, err := s.db.Templates().Get(ctx, job.GetTargetId())
		if err != nil && !errdefs.IsNotFound(err) {
			return nil, err
		}
		return &stowagev1.RegisterTemplateResponse{Template: t, Job: job, Plan: job.GetPlan()}, nil
	}
	if err := CheckName("template", req.GetName()); err != nil {
		return nil, err
	}
	if _, err := FormatFromProto(req.GetFormat()); err != nil {
		return nil, err
	}
	if err := checkURL(req.GetUrl(), s.importDir); err != nil {
		return nil, err
	}
	sum, err := checkChecksum(req.GetChecksum())
	if err != nil {
		return nil, err
	}
	if sum == "" && strings.HasPrefix(strings.ToLower(req.GetUrl()), "http://") {
		return nil, fmt.Errorf("url %s is plain http: anyone on the path could change the template; give its --checksum or use https: %w", redact.URL(req.GetUrl()), errdefs.ErrInvalid)
	}
	if others, err := s.db.Templates().ListBy(ctx, meta.IndexName, req.GetName()); err == nil && len(others) > 0 {
		return nil, fmt.Errorf("template name %q is already taken by template %s: %w", req.GetName(), others[0].GetId(), errdefs.ErrAlreadyExists)
	}
	var stores []*stowagev1.DataStore
	plan := &stowagev1.Plan{Strategy: "download", Priority: "DEFAULT"}
	if len(req.GetStoreIds()) > 0 {
		for _, id := range req.GetStoreIds() {
			st, err := s.stores.UpStore(ctx, id, stowagev1.StoreRole_STORE_ROLE_IMAGE)
			if err != nil {
				return nil, err
			}
			stores = append(stores, st)
			plan.Reasons = append(plan.Reasons, fmt.Sprintf("store %s: asked for", st.GetName()))
		}
	} else {
		st, reasons, err := s.stores.PickStore(ctx, stowagev1.StoreRole_STORE_ROLE_IMAGE, req.GetZone(), 0)
		if err != nil {
			return nil, err
		}
		stores = append(stores, st)
		plan.Reasons = append(plan.Reasons, reasons...)
	}
	tmpl := &stowagev1.Template{
		Id: meta.NewID(), Name: req.GetName(), Format: req.GetFormat(), Url: req.GetUrl(), Checksum: sum,
		IsIso: req.GetFormat() == stowagev1.ImageFormat_IMAGE_FORMAT_ISO,
	}
	var refs []*stowagev1.TemplateOnStore
	for _, st := range stores {
		ch, err := s.sel.Select(ctx, "", datastore.Scope(st))
		if err != nil {
			return nil, err
		}
		key, err := s.Locate(st, tmpl)
		if err != nil {
			return nil, err
		}
		step := "download-" + st.GetName()
		plan.Steps = append(plan.Steps, &stowagev1.PlanStep{Name: step, HostId: ch.HostID,
			Reason: fmt.Sprintf("stream %s into store %s (%s provider) as %s, verify checksum and format; %s", redact.URL(req.GetUrl()), st.GetName(), st.GetProvider(), key, ch.Reason)})
		refs = append(refs, &stowagev1.TemplateOnStore{Id: meta.NewID(), TemplateId: tmpl.GetId(), StoreId: st.GetId(), InstallPath: key})
	}
	if req.GetDryRun() {
		jobs.RedactPlan(plan)
		return &stowagev1.RegisterTemplateResponse{Template: tmpl, Plan: plan}, nil
	}
	job := jobs.NewJob(KindRegister, tmpl.GetId(), req.GetIdempotencyKey(), plan, nil)
	job, existing, err := s.jobs.Submit(ctx, job, func(tx *meta.Tx) error {
		if _, err := meta.Templates.CreateTx(tx, tmpl); err != nil {
			return err
		}
		for _, r := range refs {
			if _, err := meta.TemplatesOnStore.CreateTx(tx, r); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("register template %q: %w", req.GetName(), err)
	}
	if existing {
		tmpl, _ = s.db.Templates().Get(ctx, job.GetTargetId())
	}
	return &stowagev1.RegisterTemplateResponse{Template: tmpl, Job: job, Plan: job.GetPlan()}, nil
}
