package image

import (
	"context"
	"fmt"

	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/jobs"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/controller/motion"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

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
	// Reserved when submitted; held again when resumed (the runner's
	// end-of-job hook releases it).
	s.stores.Hold(dst.GetId(), job.GetId(), t.GetVirtualSize())
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

// Create plans and starts making a template from a volume or a snapshot on
// primary, flattened into a standalone image on an image store.
func (s *Service) Create(ctx context.Context, req *stowagev1.CreateTemplateRequest) (*stowagev1.CreateTemplateResponse, error) {
	// A retry with an earlier request's key returns its job (see Register).
	if job, ok, err := s.earlier(ctx, req.GetIdempotencyKey(), req.GetDryRun()); err != nil || ok {
		if err != nil {
			return nil, err
		}
		t, err := s.db.Templates().Get(ctx, job.GetTargetId())
		if err != nil && !errdefs.IsNotFound(err) {
			return nil, err
		}
		return &stowagev1.CreateTemplateResponse{Template: t, Job: job, Plan: job.GetPlan()}, nil
	}
	if err := CheckName("template", req.GetName()); err != nil {
		return nil, err
	}
	if others, err := s.db.Templates().ListBy(ctx, meta.IndexName, req.GetName()); err == nil && len(others) > 0 {
		return nil, fmt.Errorf("template name %q is already taken by template %s: %w", req.GetName(), others[0].GetId(), errdefs.ErrAlreadyExists)
	}
	format := req.GetFormat()
	if format == stowagev1.ImageFormat_IMAGE_FORMAT_UNSPECIFIED {
		format = stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2
	}
	if format == stowagev1.ImageFormat_IMAGE_FORMAT_ISO {
		return nil, fmt.Errorf("a template made from a disk is raw or qcow2: %w", errdefs.ErrInvalid)
	}
	tmpl := &stowagev1.Template{Id: meta.NewID(), Name: req.GetName(), Format: format}
	var srcStoreID, srcKey, srcType, srcID string
	switch {
	case req.GetVolumeId() != "":
		v, err := s.db.Volumes().Get(ctx, req.GetVolumeId())
		if err != nil {
			if byName, lerr := s.db.Volumes().ListBy(ctx, meta.IndexName, req.GetVolumeId()); lerr == nil && len(byName) == 1 {
				v, err = byName[0], nil
			}
		}
		if err != nil {
			return nil, fmt.Errorf("volume %q: no volume has that id or name: %w", req.GetVolumeId(), errdefs.ErrNotFound)
		}
		if v.GetState() != stowagev1.VolumeState_VOLUME_STATE_READY {
			return nil, fmt.Errorf("volume %s is %s; a template is made from a Ready volume: %w", v.GetName(), meta.VolumeStateName(v.GetState()), errdefs.ErrFailedPrecondition)
		}
		srcStoreID, srcKey, tmpl.SourceVolumeId, tmpl.VirtualSize = v.GetStoreId(), v.GetInstallPath(), v.GetId(), v.GetSize()
		srcType, srcID = string(drivers.ObjectVolume), v.GetId()
	case req.GetSnapshotId() != "":
		refs, err := s.db.SnapshotsOnStore().ListBy(ctx, meta.IndexSnapshotID, req.GetSnapshotId())
		if err != nil {
			return nil, err
		}
		for _, r := range refs {
			if r.GetRole() == stowagev1.StoreRole_STORE_ROLE_PRIMARY && r.GetState() == stowagev1.ObjectState_OBJECT_STATE_READY {
				srcStoreID, srcKey, tmpl.VirtualSize = r.GetStoreId(), r.GetInstallPath(), r.GetSize()
				srcType, srcID = string(drivers.ObjectSnapshot), r.GetSnapshotId()
			}
		}
		if srcKey == "" {
			return nil, fmt.Errorf("snapshot %q has no Ready copy on primary (restore a volume from its backup, then make the template from that volume): %w", req.GetSnapshotId(), errdefs.ErrFailedPrecondition)
		}
		tmpl.SourceSnapshotId = req.GetSnapshotId()
	default:
		return nil, fmt.Errorf("a template is made from a volume or a snapshot: give one: %w", errdefs.ErrInvalid)
	}
	src, err := s.db.Stores().Get(ctx, srcStoreID)
	if err != nil {
		return nil, err
	}
	plan := &stowagev1.Plan{Strategy: "flatten-copy", Priority: "DEFAULT"}
	var dst *stowagev1.DataStore
	var check int64 // what admission goes by (datastore.Service.Reserve)
	if req.GetStoreId() != "" {
		if dst, err = s.stores.UpStore(ctx, req.GetStoreId(), stowagev1.StoreRole_STORE_ROLE_IMAGE); err != nil {
			return nil, err
		}
	} else {
		var reasons []string
		if dst, reasons, err = s.stores.PickStore(ctx, stowagev1.StoreRole_STORE_ROLE_IMAGE, src.GetScope().GetZone(), tmpl.GetVirtualSize()); err != nil {
			return nil, err
		}
		check = tmpl.GetVirtualSize()
		plan.Reasons = append(plan.Reasons, reasons...)
	}
	ch, err := s.sel.Select(s.stores.WithNeeds(ctx, src, dst), "", datastore.Scope(src), datastore.Scope(dst))
	if err != nil {
		return nil, fmt.Errorf("making a template needs a host that reaches primary store %s and image store %s: %w", src.GetName(), dst.GetName(), err)
	}
	key, err := s.Locate(dst, tmpl)
	if err != nil {
		return nil, err
	}
	ref := &stowagev1.TemplateOnStore{Id: meta.NewID(), TemplateId: tmpl.GetId(), StoreId: dst.GetId(), InstallPath: key}
	plan.Steps = []*stowagev1.PlanStep{{Name: "copy", HostId: ch.HostID, Reason: fmt.Sprintf("flatten %s %s into a standalone %s template on store %s; %s",
		srcType, srcID, hostops.FormatFromProto(format), dst.GetName(), ch.Reason)}}
	if req.GetDryRun() {
		return &stowagev1.CreateTemplateResponse{Template: tmpl, Plan: plan}, nil
	}
	job := jobs.NewJob(KindCreate, tmpl.GetId(), req.GetIdempotencyKey(), plan, &stowagev1.JobParams{Kind: &stowagev1.JobParams_TemplateCreate{TemplateCreate: &stowagev1.TemplateCreateParams{
		SourceStoreId: src.GetId(), SourceKey: srcKey, SourceType: srcType, SourceId: srcID}}})
	// The flattened copy writes at most the virtual size to dst.
	if err := s.stores.Reserve(dst, job.GetId(), check, tmpl.GetVirtualSize(), nil); err != nil {
		return nil, err
	}
	submitted := job.GetId()
	job, existing, err := s.jobs.Submit(ctx, job, func(tx *meta.Tx) error {
		if _, err := meta.Templates.CreateTx(tx, tmpl); err != nil {
			return err
		}
		_, err := meta.TemplatesOnStore.CreateTx(tx, ref)
		return err
	})
	if err != nil {
		s.stores.Cancel(submitted)
		return nil, err
	}
	if existing {
		s.stores.Cancel(submitted) // the first request's job holds its own
		tmpl, _ = s.db.Templates().Get(ctx, job.GetTargetId())
	}
	return &stowagev1.CreateTemplateResponse{Template: tmpl, Job: job, Plan: job.GetPlan()}, nil
}
