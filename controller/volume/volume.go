// Package volume is the controller's VolumeService: blank volumes, volumes
// from templates (the template is cached on the primary store once, then
// installed by the best TemplateInstallStrategy: reflink, qcow2 linked
// clone or full copy; or, lazy, a qcow2 overlay on the template's file in
// the host's FUSE template mount, with no copy at all), volumes from snapshots (on primary or from a backup),
// delete, resize, access grants and migration between primary stores
// (directly between agents, never through an image store).
//
// Every mutating call validates and plans first (a dry run returns the plan
// and writes nothing), then records the volume and a job in one transaction
// and returns the job at once. A volume that is busy (Creating, Snapshotting,
// Migrating, ...) refuses a second mutating call with ErrAborted.
package volume

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/endpoint"
	"github.com/stowage/stowage/controller/image"
	"github.com/stowage/stowage/controller/jobs"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/controller/motion"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// Job kinds of this service.
const (
	KindCreate  = "volume.create"
	KindDelete  = "volume.delete"
	KindResize  = "volume.resize"
	KindMigrate = "volume.migrate"
)

// Service implements VolumeService.
type Service struct {
	db        *meta.DB
	stores    *datastore.Service
	images    *image.Service
	sel       *endpoint.Selector
	mover     *motion.Mover
	jobs      *jobs.Runner
	providers *drivers.Registry
	log       *slog.Logger
	// CacheLowWater is the fraction of a primary store's capacity that must
	// stay free; unreferenced cached templates are evicted (least recently
	// used first) to keep it.
	CacheLowWater float64
}

// New returns the volume service and registers its job handlers.
func New(db *meta.DB, stores *datastore.Service, images *image.Service, sel *endpoint.Selector, mover *motion.Mover, runner *jobs.Runner, providers *drivers.Registry, log *slog.Logger) *Service {
	s := &Service{db: db, stores: stores, images: images, sel: sel, mover: mover, jobs: runner, providers: providers, log: log, CacheLowWater: 0.10}
	runner.Register(KindCreate, createHandler{s})
	runner.Register(KindDelete, deleteHandler{s})
	runner.Register(KindResize, resizeHandler{s})
	runner.Register(KindMigrate, migrateHandler{s})
	return s
}

// Get returns a volume by id, or by name when exactly one has it.
func (s *Service) Get(ctx context.Context, idOrName string) (*stowagev1.Volume, error) {
	if idOrName == "" {
		return nil, fmt.Errorf("a volume id or name is required: %w", errdefs.ErrInvalid)
	}
	v, err := s.db.Volumes().Get(ctx, idOrName)
	if err == nil {
		return v, nil
	}
	if byName, lerr := s.db.Volumes().ListBy(ctx, meta.IndexName, idOrName); lerr == nil {
		live := byName[:0]
		for _, v := range byName {
			if v.GetState() != stowagev1.VolumeState_VOLUME_STATE_EXPUNGED {
				live = append(live, v)
			}
		}
		if len(live) == 1 {
			return live[0], nil
		}
		if len(live) > 1 {
			return nil, fmt.Errorf("volume name %q is ambiguous (%d volumes); use the id: %w", idOrName, len(live), errdefs.ErrInvalid)
		}
	}
	return nil, fmt.Errorf("volume %q: no volume has that id or name; see `stowage volume list`: %w", idOrName, errdefs.ErrNotFound)
}

// List returns volumes, optionally of one store, without expunged ones.
func (s *Service) List(ctx context.Context, storeID string) ([]*stowagev1.Volume, error) {
	return s.db.Volumes().List(ctx, meta.Filter[*stowagev1.Volume]{Where: func(v *stowagev1.Volume) bool {
		return v.GetState() != stowagev1.VolumeState_VOLUME_STATE_EXPUNGED && (storeID == "" || v.GetStoreId() == storeID)
	}})
}

// busy turns a refused volume transition into ErrAborted when the volume is
// in the middle of another operation.
func busy(v *stowagev1.Volume, err error) error {
	if err == nil {
		return nil
	}
	switch v.GetState() {
	case stowagev1.VolumeState_VOLUME_STATE_CREATING, stowagev1.VolumeState_VOLUME_STATE_SNAPSHOTTING,
		stowagev1.VolumeState_VOLUME_STATE_REVERT_SNAPSHOTTING, stowagev1.VolumeState_VOLUME_STATE_MIGRATING,
		stowagev1.VolumeState_VOLUME_STATE_RESIZING, stowagev1.VolumeState_VOLUME_STATE_COPYING,
		stowagev1.VolumeState_VOLUME_STATE_EXPUNGING:
		if errdefs.IsFailedPrecondition(err) || errdefs.IsConflict(err) {
			return fmt.Errorf("volume %s is busy (%s, job %s); retry when it is Ready: %w", v.GetName(), meta.VolumeStateName(v.GetState()), v.GetBusyJobId(), errdefs.ErrAborted)
		}
	}
	return err
}

// allows refuses, before any planning, an event the volume's state does not
// allow: ErrAborted while another job works on it, ErrFailedPrecondition
// otherwise.
func (s *Service) allows(v *stowagev1.Volume, event meta.VolumeEvent) error {
	if _, ok := s.db.Volumes().Machine().Next(v.GetState(), event); ok {
		return nil
	}
	return busy(v, fmt.Errorf("volume %s is %s; %s is not possible now: %w", v.GetName(), meta.VolumeStateName(v.GetState()), event, errdefs.ErrFailedPrecondition))
}

func checkSize(size int64, what string) error {
	if size <= 0 {
		return fmt.Errorf("%s size %d: a volume needs a positive size, e.g. --size 10G: %w", what, size, errdefs.ErrInvalid)
	}
	if size%512 != 0 {
		return fmt.Errorf("%s size %d is not a multiple of 512 bytes (try %d): %w", what, size, (size/512+1)*512, errdefs.ErrInvalid)
	}
	return nil
}

// Create validates and plans a new volume and, unless it is a dry run,
// records it with its job.
func (s *Service) Create(ctx context.Context, req *stowagev1.CreateVolumeRequest) (*stowagev1.CreateVolumeResponse, error) {
	if err := image.CheckName("volume", req.GetName()); err != nil {
		return nil, err
	}
	if req.GetSize() < 0 {
		return nil, fmt.Errorf("volume size %d is negative: %w", req.GetSize(), errdefs.ErrInvalid)
	}
	if req.GetTemplateId() != "" && req.GetSnapshotId() != "" {
		return nil, fmt.Errorf("a volume comes from a template or a snapshot, not both: %w", errdefs.ErrInvalid)
	}
	var want drivers.Format
	if req.GetFormat() != stowagev1.ImageFormat_IMAGE_FORMAT_UNSPECIFIED {
		f, err := image.FormatFromProto(req.GetFormat())
		if err != nil || f == drivers.FormatISO {
			return nil, fmt.Errorf("volume format must be raw or qcow2: %w", errdefs.ErrInvalid)
		}
		want = f
	}
	if req.GetTemplateId() == "" && req.GetSnapshotId() == "" {
		if err := checkSize(req.GetSize(), "blank volume"); err != nil {
			return nil, err
		}
	} else if req.GetSize() != 0 {
		if err := checkSize(req.GetSize(), "volume"); err != nil {
			return nil, err
		}
	}
	p := &planner{s: s, plan: &stowagev1.Plan{}, params: &stowagev1.VolumeCreateParams{}}
	vol := &stowagev1.Volume{Id: meta.NewID(), Name: req.GetName(), Size: req.GetSize(), TemplateId: req.GetTemplateId(), SnapshotId: req.GetSnapshotId()}
	var err error
	switch {
	case req.GetTemplateId() != "":
		err = p.fromTemplate(ctx, req, vol, want)
	case req.GetSnapshotId() != "":
		err = p.fromSnapshot(ctx, req, vol, want)
	default:
		err = p.blank(ctx, req, vol, want)
	}
	if err != nil {
		return nil, err
	}
	st, err := s.db.Stores().Get(ctx, vol.GetStoreId())
	if err != nil {
		return nil, err
	}
	if vol.InstallPath, err = s.locateVolume(st, vol.GetId(), hostops.FormatFromProto(p.params.GetFormat()), vol.GetSize()); err != nil {
		return nil, err
	}
	vol.Format = p.params.GetFormat()
	if req.GetDryRun() {
		return &stowagev1.CreateVolumeResponse{Volume: vol, Plan: p.plan}, nil
	}
	job := jobs.NewJob(KindCreate, vol.GetId(), req.GetIdempotencyKey(), p.plan, &stowagev1.JobParams{Kind: &stowagev1.JobParams_VolumeCreate{VolumeCreate: p.params}})
	vol.BusyJobId = job.GetId()
	job, existing, err := s.jobs.Submit(ctx, job, func(tx *meta.Tx) error {
		if p.newRef != nil {
			if _, err := meta.TemplatesOnStore.CreateTx(tx, p.newRef); err != nil && !errdefs.IsAlreadyExists(err) {
				return err
			}
		}
		_, err := meta.Volumes.CreateTx(tx, vol)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("create volume %q: %w", req.GetName(), err)
	}
	if existing {
		vol, _ = s.db.Volumes().Get(ctx, job.GetTargetId())
	}
	return &stowagev1.CreateVolumeResponse{Volume: vol, Job: job, Plan: job.GetPlan()}, nil
}

// planner builds the plan of a volume creation.
type planner struct {
	s      *Service
	plan   *stowagev1.Plan
	params *stowagev1.VolumeCreateParams
	newRef *stowagev1.TemplateOnStore
}

func (p *planner) step(name, host, reason string) {
	p.plan.Steps = append(p.plan.Steps, &stowagev1.PlanStep{Name: name, HostId: host, Reason: reason})
}

func (p *planner) primary(ctx context.Context, storeID, zone string, need int64) (*stowagev1.DataStore, error) {
	if storeID != "" {
		st, err := p.s.stores.UpStore(ctx, storeID, stowagev1.StoreRole_STORE_ROLE_PRIMARY)
		if err != nil {
			return nil, err
		}
		p.plan.Reasons = append(p.plan.Reasons, fmt.Sprintf("store %s: asked for", st.GetName()))
		return st, nil
	}
	st, reasons, err := p.s.stores.PickStore(ctx, stowagev1.StoreRole_STORE_ROLE_PRIMARY, zone, need)
	p.plan.Reasons = append(p.plan.Reasons, reasons...)
	return st, err
}

func (p *planner) blank(ctx context.Context, req *stowagev1.CreateVolumeRequest, vol *stowagev1.Volume, want drivers.Format) error {
	if want == "" {
		want = drivers.FormatQCOW2
	}
	st, err := p.primary(ctx, req.GetStoreId(), req.GetZone(), 0)
	if err != nil {
		return err
	}
	ch, err := p.s.sel.Select(ctx, "", datastore.Scope(st))
	if err != nil {
		return err
	}
	vol.StoreId, vol.InstallMethod = st.GetId(), "blank"
	p.plan.Strategy, p.plan.Priority = "blank", motion.Default.String()
	p.params.Format = hostops.FormatToProto(want)
	p.step("create", ch.HostID, fmt.Sprintf("create an empty %s image of %d bytes; %s", want, req.GetSize(), ch.Reason))
	return nil
}

// SpoolRef returns the cached copy of template on primary store st, if any.
func (s *Service) SpoolRef(ctx context.Context, templateID, storeID string) (*stowagev1.TemplateOnStore, error) {
	return s.db.TemplatesOnStore().GetBy(ctx, meta.IndexTemplateStore, meta.TemplateStoreKey(templateID, storeID))
}

func (p *planner) fromTemplate(ctx context.Context, req *stowagev1.CreateVolumeRequest, vol *stowagev1.Volume, want drivers.Format) error {
	tmpl, _, err := p.s.images.Get(ctx, req.GetTemplateId())
	if err != nil {
		return err
	}
	vol.TemplateId = tmpl.GetId()
	tfmt, err := image.FormatFromProto(tmpl.GetFormat())
	if err != nil {
		return err
	}
	if tfmt == drivers.FormatISO {
		return fmt.Errorf("template %s is an ISO; attach it, or create a blank volume: %w", tmpl.GetName(), errdefs.ErrInvalid)
	}
	if req.GetSize() != 0 && req.GetSize() < tmpl.GetVirtualSize() {
		return fmt.Errorf("size %d is smaller than template %s (%d bytes): %w", req.GetSize(), tmpl.GetName(), tmpl.GetVirtualSize(), errdefs.ErrInvalid)
	}
	_, imgStore, err := p.s.images.ReadyOn(ctx, tmpl.GetId(), stowagev1.StoreRole_STORE_ROLE_IMAGE)
	if err != nil {
		return err
	}
	st, err := p.primary(ctx, req.GetStoreId(), req.GetZone(), tmpl.GetVirtualSize())
	if err != nil {
		return err
	}
	vol.StoreId = st.GetId()
	need := MountShows(tmpl.GetId())
	_, mountErr := p.s.sel.SelectWhere(ctx, "", need, datastore.Scope(st))
	d, err := motion.PickInstall(motion.InstallRequest{
		TemplateFormat: tfmt, VolumeFormat: want, StoreReflink: st.GetDetails()["reflink"] == "true",
		Grow: req.GetSize() > tmpl.GetVirtualSize(), Mounted: mountErr == nil,
	}, req.GetStrategy())
	if mountErr != nil && req.GetStrategy() == image.LazyMethod {
		p.plan.Reasons = append(p.plan.Reasons, mountErr.Error())
	}
	if err != nil {
		p.plan.Reasons = append(p.plan.Reasons, d.Reasons...)
		if mountErr != nil && req.GetStrategy() == image.LazyMethod {
			return fmt.Errorf("%w (%v)", err, mountErr)
		}
		return err
	}
	p.plan.Strategy, p.plan.Priority = d.Strategy.Name(), d.Priority.String()
	p.params.Format, p.params.CloneMode, p.params.ImageStoreId = hostops.FormatToProto(d.Format), string(d.Strategy.Mode()), imgStore.GetId()
	vol.InstallMethod = d.Strategy.Name()
	if d.Strategy.Name() == image.LazyMethod {
		ch, err := p.s.sel.SelectWhere(ctx, "", need, datastore.Scope(st))
		if err != nil {
			return err
		}
		p.plan.Reasons = append(p.plan.Reasons, fmt.Sprintf("template %s is read through the template mount of the volume's host: nothing is copied to store %s", tmpl.GetName(), st.GetName()))
		p.plan.Reasons = append(p.plan.Reasons, d.Reasons...)
		p.step("install", ch.HostID, fmt.Sprintf("lazy clone: a qcow2 overlay backed by %s/%s; %s", ch.Host.GetCapabilities().GetTemplateCache().GetMount(), tmpl.GetId(), ch.Reason))
		return nil
	}
	spool, err := p.s.SpoolRef(ctx, tmpl.GetId(), st.GetId())
	switch {
	case err == nil && spool.GetState() == stowagev1.ObjectState_OBJECT_STATE_READY:
		p.plan.Reasons = append(p.plan.Reasons, fmt.Sprintf("template %s is already cached on store %s (%s)", tmpl.GetName(), st.GetName(), spool.GetInstallPath()))
	case err == nil:
		p.plan.Reasons = append(p.plan.Reasons, fmt.Sprintf("template %s is being cached on store %s (%s): wait for that one copy", tmpl.GetName(), st.GetName(), meta.ObjectStateName(spool.GetState())))
		p.step("cache-template", "", "wait for the copy already under way, or redo it if it failed")
	case errdefs.IsNotFound(err):
		key, err := p.s.locateTemplate(st, tmpl)
		if err != nil {
			return err
		}
		p.newRef = &stowagev1.TemplateOnStore{Id: meta.NewID(), TemplateId: tmpl.GetId(), StoreId: st.GetId(), InstallPath: key}
		reasons, host, err := p.s.copyPlan(ctx, imgStore, st, true)
		if err != nil {
			return err
		}
		p.plan.Reasons = append(p.plan.Reasons, reasons...)
		p.step("cache-template", host, fmt.Sprintf("copy template %s once from image store %s to primary store %s (template_spool_ref); %s", tmpl.GetName(), imgStore.GetName(), st.GetName(), reasons[0]))
	default:
		return err
	}
	p.plan.Reasons = append(p.plan.Reasons, d.Reasons...)
	ch, err := p.s.sel.Select(ctx, "", datastore.Scope(st))
	if err != nil {
		return err
	}
	p.step("install", ch.HostID, fmt.Sprintf("%s clone of the cached template into a %s volume; %s", d.Strategy.Name(), d.Format, ch.Reason))
	return nil
}

// MountShows is the need of a lazy volume's host: its template mount shows
// the template.
func MountShows(templateID string) endpoint.Need {
	return endpoint.Need{
		What: "shows template " + templateID + " in its template mount",
		OK: func(h *stowagev1.Host) bool {
			tc := h.GetCapabilities().GetTemplateCache()
			if tc.GetMount() == "" {
				return false
			}
			for _, t := range tc.GetTemplates() {
				if t.GetId() == templateID && t.GetError() == "" {
					return true
				}
			}
			return false
		},
	}
}

// copyPlan asks the data motion strategies how bytes go from store a to
// store b, and returns the winner's reasons and the host that writes.
func (s *Service) copyPlan(ctx context.Context, a, b *stowagev1.DataStore, standalone bool) (reasons []string, host string, err error) {
	d, err := motion.PickMotion(ctx, motion.MotionRequest{From: datastore.Scope(a), To: datastore.Scope(b), Standalone: standalone}, s.sel)
	if err != nil {
		return d.Reasons, "", err
	}
	scopes := []drivers.Scope{datastore.Scope(b)}
	if d.Strategy.Name() == motion.SameHost {
		scopes = append(scopes, datastore.Scope(a))
	}
	ch, err := s.sel.Select(ctx, "", scopes...)
	if err != nil {
		return d.Reasons, "", err
	}
	return append([]string{fmt.Sprintf("data motion %s (%s) wins", d.Strategy.Name(), d.Priority)}, d.Reasons...), ch.HostID, nil
}

func (p *planner) fromSnapshot(ctx context.Context, req *stowagev1.CreateVolumeRequest, vol *stowagev1.Volume, want drivers.Format) error {
	snap, err := p.s.db.Snapshots().Get(ctx, req.GetSnapshotId())
	if err != nil {
		return fmt.Errorf("snapshot %q: %w", req.GetSnapshotId(), err)
	}
	refs, err := p.s.db.SnapshotsOnStore().ListBy(ctx, meta.IndexSnapshotID, snap.GetId())
	if err != nil {
		return err
	}
	var onPrimary, backup *stowagev1.SnapshotOnStore
	for _, r := range refs {
		if r.GetState() != stowagev1.ObjectState_OBJECT_STATE_READY {
			continue
		}
		if r.GetRole() == stowagev1.StoreRole_STORE_ROLE_PRIMARY {
			onPrimary = r
		} else {
			backup = r
		}
	}
	if onPrimary == nil && backup == nil {
		return fmt.Errorf("snapshot %s has no Ready copy on primary or in a backup: %w", snap.GetId(), errdefs.ErrFailedPrecondition)
	}
	st, err := p.primary(ctx, req.GetStoreId(), req.GetZone(), snap.GetSize())
	if err != nil {
		return err
	}
	vol.StoreId, vol.SnapshotId = st.GetId(), snap.GetId()
	if vol.Size == 0 {
		vol.Size = snap.GetSize()
	}
	if want == "" {
		want = drivers.FormatQCOW2
	}
	p.params.Format = hostops.FormatToProto(want)
	if onPrimary != nil {
		src, err := p.s.db.Stores().Get(ctx, onPrimary.GetStoreId())
		if err != nil {
			return err
		}
		reasons, host, err := p.s.copyPlan(ctx, src, st, false)
		if err != nil {
			return err
		}
		p.plan.Reasons = append(p.plan.Reasons, reasons...)
		p.plan.Strategy, p.plan.Priority = "copy-from-primary-snapshot", motion.Hypervisor.String()
		p.params.SourceRefId = onPrimary.GetId()
		vol.InstallMethod = "full"
		p.plan.Reasons = append(p.plan.Reasons, "the snapshot is on primary store "+src.GetName()+": no need to read the backup")
		p.step("copy", host, "flatten the snapshot's chain into a standalone volume; "+reasons[0])
		return nil
	}
	img, err := p.s.db.Stores().Get(ctx, backup.GetStoreId())
	if err != nil {
		return err
	}
	ch, err := p.s.sel.Select(ctx, "", datastore.Scope(img), datastore.Scope(st))
	if err != nil {
		return fmt.Errorf("restore from backup needs a host that reaches image store %s and primary store %s: %w", img.GetName(), st.GetName(), err)
	}
	p.plan.Strategy, p.plan.Priority = "restore-from-backup", motion.Default.String()
	p.params.SourceRefId = backup.GetId()
	vol.InstallMethod = "restore"
	p.step("restore", ch.HostID, fmt.Sprintf("rebuild the volume from backup manifest %s (chunks verified); %s", backup.GetInstallPath(), ch.Reason))
	return nil
}

// waitReady polls until the spool ref is Ready, Failed, or gone.
func (s *Service) waitRef(ctx context.Context, id string) (*stowagev1.TemplateOnStore, error) {
	for {
		r, err := s.db.TemplatesOnStore().Get(ctx, id)
		if err != nil {
			return nil, err
		}
		switch r.GetState() {
		case stowagev1.ObjectState_OBJECT_STATE_READY, stowagev1.ObjectState_OBJECT_STATE_FAILED:
			return r, nil
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// Delete destroys and expunges a volume; its snapshots on primary go with
// it (their backups stay), and a cached template it was linked to loses a
// reference.
func (s *Service) Delete(ctx context.Context, idOrName string, dryRun bool) (*stowagev1.DeleteVolumeResponse, error) {
	v, err := s.Get(ctx, idOrName)
	if err != nil {
		return nil, err
	}
	if v.GetState() != stowagev1.VolumeState_VOLUME_STATE_DESTROY {
		if err := s.allows(v, meta.VolumeDestroyRequested); err != nil {
			return nil, err
		}
	}
	st, err := s.db.Stores().Get(ctx, v.GetStoreId())
	if err != nil {
		return nil, err
	}
	plan := &stowagev1.Plan{Strategy: "expunge", Priority: motion.Default.String()}
	ch, err := s.sel.Select(ctx, "", datastore.Scope(st))
	if err != nil {
		return nil, err
	}
	plan.Steps = append(plan.Steps, &stowagev1.PlanStep{Name: "expunge", HostId: ch.HostID, Reason: "remove " + v.GetInstallPath() + " and the volume's snapshots on primary; " + ch.Reason})
	if dryRun {
		return &stowagev1.DeleteVolumeResponse{Plan: plan}, nil
	}
	job := jobs.NewJob(KindDelete, v.GetId(), "", plan, nil)
	job, _, err = s.jobs.Submit(ctx, job, func(tx *meta.Tx) error {
		if v.GetState() == stowagev1.VolumeState_VOLUME_STATE_DESTROY {
			return nil
		}
		_, err := meta.Volumes.TransitionTx(tx, v.GetId(), v.GetRevision(), meta.VolumeDestroyRequested, func(v *stowagev1.Volume) error {
			v.BusyJobId = job.GetId()
			return nil
		})
		return busy(v, err)
	})
	if err != nil {
		return nil, err
	}
	return &stowagev1.DeleteVolumeResponse{Job: job, Plan: plan}, nil
}

// Resize grows a volume.
func (s *Service) Resize(ctx context.Context, idOrName string, size int64, dryRun bool) (*stowagev1.ResizeVolumeResponse, error) {
	v, err := s.Get(ctx, idOrName)
	if err != nil {
		return nil, err
	}
	if err := checkSize(size, "new"); err != nil {
		return nil, err
	}
	if err := s.allows(v, meta.VolumeResizeRequested); err != nil {
		return nil, err
	}
	if size < v.GetSize() {
		return nil, fmt.Errorf("volume %s is %d bytes; shrinking to %d would lose data and is refused: %w", v.GetName(), v.GetSize(), size, errdefs.ErrInvalid)
	}
	st, err := s.db.Stores().Get(ctx, v.GetStoreId())
	if err != nil {
		return nil, err
	}
	ch, err := s.sel.Select(ctx, "", datastore.Scope(st))
	if err != nil {
		return nil, err
	}
	plan := &stowagev1.Plan{Strategy: "resize", Priority: motion.Default.String(),
		Steps: []*stowagev1.PlanStep{{Name: "resize", HostId: ch.HostID, Reason: fmt.Sprintf("grow %s to %d bytes; %s", v.GetInstallPath(), size, ch.Reason)}}}
	if dryRun {
		return &stowagev1.ResizeVolumeResponse{Volume: v, Plan: plan}, nil
	}
	job := jobs.NewJob(KindResize, v.GetId(), "", plan, &stowagev1.JobParams{Kind: &stowagev1.JobParams_VolumeResize{VolumeResize: &stowagev1.VolumeResizeParams{SizeBytes: size}}})
	job, _, err = s.jobs.Submit(ctx, job, func(tx *meta.Tx) error {
		_, err := meta.Volumes.TransitionTx(tx, v.GetId(), v.GetRevision(), meta.VolumeResizeRequested, func(v *stowagev1.Volume) error {
			v.BusyJobId = job.GetId()
			return nil
		})
		return busy(v, err)
	})
	if err != nil {
		return nil, err
	}
	v, _ = s.db.Volumes().Get(ctx, v.GetId())
	return &stowagev1.ResizeVolumeResponse{Volume: v, Job: job, Plan: plan}, nil
}

// Migrate moves a volume to another primary store.
func (s *Service) Migrate(ctx context.Context, idOrName, storeID string, dryRun bool) (*stowagev1.MigrateVolumeResponse, error) {
	v, err := s.Get(ctx, idOrName)
	if err != nil {
		return nil, err
	}
	if err := s.allows(v, meta.VolumeMigrationRequested); err != nil {
		return nil, err
	}
	src, err := s.db.Stores().Get(ctx, v.GetStoreId())
	if err != nil {
		return nil, err
	}
	dst, err := s.stores.UpStore(ctx, storeID, stowagev1.StoreRole_STORE_ROLE_PRIMARY)
	if err != nil {
		return nil, err
	}
	if dst.GetId() == src.GetId() {
		return nil, fmt.Errorf("volume %s is already on store %s: %w", v.GetName(), dst.GetName(), errdefs.ErrInvalid)
	}
	snaps, err := s.primarySnapshots(ctx, v)
	if err != nil {
		return nil, err
	}
	if len(snaps) > 0 {
		return nil, fmt.Errorf("volume %s has %d snapshots on primary store %s; back them up and delete them first (their backups stay usable): %w",
			v.GetName(), len(snaps), src.GetName(), errdefs.ErrFailedPrecondition)
	}
	reasons, host, err := s.copyPlan(ctx, src, dst, standalone(v))
	if err != nil {
		if !standalone(v) {
			return nil, fmt.Errorf("volume %s is a linked clone and no host reaches both stores; an HTTP export carries the overlay without its backing file (flattening across hosts needs the NBD export): %w",
				v.GetName(), errdefs.ErrFailedPrecondition)
		}
		return nil, err
	}
	plan := &stowagev1.Plan{Strategy: "migrate", Priority: motion.Default.String(), Reasons: append([]string{
		"a direct copy between primary stores, never through an image store"}, reasons...)}
	if strings.Contains(reasons[0], motion.SameHost) {
		plan.Strategy, plan.Priority = "migrate-same-host", motion.Highest.String()
	} else {
		plan.Strategy = "migrate-agent-to-agent"
	}
	plan.Steps = []*stowagev1.PlanStep{
		{Name: "copy", HostId: host, Reason: "copy (flattened) volume " + v.GetName() + " to store " + dst.GetName()},
		{Name: "cleanup-source", Reason: "remove the source file once the volume points at the copy"},
	}
	if dryRun {
		return &stowagev1.MigrateVolumeResponse{Volume: v, Plan: plan}, nil
	}
	job := jobs.NewJob(KindMigrate, v.GetId(), "", plan, &stowagev1.JobParams{Kind: &stowagev1.JobParams_VolumeMigrate{VolumeMigrate: &stowagev1.VolumeMigrateParams{
		SrcStoreId: src.GetId(), DstStoreId: dst.GetId(), SrcKey: v.GetInstallPath()}}})
	job, _, err = s.jobs.Submit(ctx, job, func(tx *meta.Tx) error {
		_, err := meta.Volumes.TransitionTx(tx, v.GetId(), v.GetRevision(), meta.VolumeMigrationRequested, func(v *stowagev1.Volume) error {
			v.BusyJobId = job.GetId()
			return nil
		})
		return busy(v, err)
	})
	if err != nil {
		return nil, err
	}
	v, _ = s.db.Volumes().Get(ctx, v.GetId())
	return &stowagev1.MigrateVolumeResponse{Volume: v, Job: job, Plan: plan}, nil
}

// standalone says v is one self-contained file: no template or snapshot
// file under it.
func standalone(v *stowagev1.Volume) bool {
	return v.GetBaseRefId() == "" && v.GetHeadSnapshotRefId() == "" && v.GetInstallMethod() != image.LazyMethod
}

func (s *Service) primarySnapshots(ctx context.Context, v *stowagev1.Volume) ([]*stowagev1.SnapshotOnStore, error) {
	snaps, err := s.db.Snapshots().ListBy(ctx, meta.IndexVolumeID, v.GetId())
	if err != nil {
		return nil, err
	}
	var out []*stowagev1.SnapshotOnStore
	for _, sn := range snaps {
		refs, err := s.db.SnapshotsOnStore().ListBy(ctx, meta.IndexSnapshotID, sn.GetId())
		if err != nil {
			return nil, err
		}
		for _, r := range refs {
			if r.GetRole() == stowagev1.StoreRole_STORE_ROLE_PRIMARY && r.GetState() != stowagev1.ObjectState_OBJECT_STATE_DESTROYED {
				out = append(out, r)
			}
		}
	}
	return out, nil
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
