package volume

import (
	"context"
	"fmt"

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

// Create validates and plans a new volume and, unless it is a dry run,
// records it with its job.
func (s *Service) Create(ctx context.Context, req *stowagev1.CreateVolumeRequest) (*stowagev1.CreateVolumeResponse, error) {
	// A retry with an earlier request's key returns its job before any
	// planning: planned again, it could be refused for what the first
	// request reserved or wrote.
	if key := req.GetIdempotencyKey(); key != "" && !req.GetDryRun() {
		job, err := s.jobs.ByIdempotencyKey(ctx, key)
		switch {
		case err == nil:
			vol, err := s.db.Volumes().Get(ctx, job.GetTargetId())
			if err != nil && !errdefs.IsNotFound(err) {
				return nil, err
			}
			return &stowagev1.CreateVolumeResponse{Volume: vol, Job: job, Plan: job.GetPlan()}, nil
		case !errdefs.IsNotFound(err):
			return nil, err
		}
	}
	if err := image.CheckName("volume", req.GetName()); err != nil {
		return nil, err
	}
	// A negative size and both a template and a snapshot are refused by
	// the request's rules (buf.validate in volume.proto) before this runs.
	var want drivers.Format
	if req.GetFormat() != stowagev1.ImageFormat_IMAGE_FORMAT_UNSPECIFIED {
		f, err := image.FormatFromProto(req.GetFormat())
		if err != nil || f == drivers.FormatISO || f.Foreign() {
			return nil, fmt.Errorf("volume format must be raw or qcow2 (vhd, vhdx and vmdk are template formats, converted on install): %w", errdefs.ErrInvalid)
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
	tags, err := datastore.NormalizeTags(req.GetTags())
	if err != nil {
		return nil, err
	}
	p := &planner{s: s, plan: &stowagev1.Plan{}, params: &stowagev1.VolumeCreateParams{}, tags: tags}
	vol := &stowagev1.Volume{Id: meta.NewID(), Name: req.GetName(), Size: req.GetSize(), TemplateId: req.GetTemplateId(), SnapshotId: req.GetSnapshotId(), Tags: tags}
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
	// Admitted and reserved in one step: a create planned meanwhile sees
	// these bytes as used.
	if err := s.stores.Reserve(st, job.GetId(), p.check, p.params.GetReservedBytes(), tags); err != nil {
		return nil, fmt.Errorf("create volume %q: %w", req.GetName(), err)
	}
	submitted := job.GetId()
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
		s.stores.Cancel(submitted)
		return nil, fmt.Errorf("create volume %q: %w", req.GetName(), err)
	}
	if existing {
		s.stores.Cancel(submitted) // the first request's job holds its own
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
	// tags are the storage tags the volume asked for (sorted, unique).
	tags []string
	// check is what the volume's store was admitted for (see
	// datastore.Service.Reserve); params.reserved_bytes what the job may
	// write there.
	check int64
}

func (p *planner) step(name, host, reason string) {
	p.plan.Steps = append(p.plan.Steps, &stowagev1.PlanStep{Name: name, HostId: host, Reason: reason})
}

// primary returns the primary store storeID, or picks one in zone that
// can take need more bytes.
func (p *planner) primary(ctx context.Context, storeID, zone string, need int64) (*stowagev1.DataStore, error) {
	if storeID != "" {
		st, err := p.s.stores.UpStore(ctx, storeID, stowagev1.StoreRole_STORE_ROLE_PRIMARY)
		if err != nil {
			return nil, err
		}
		// Asked for by name: refused when it lacks a tag or is at its
		// disable threshold already. need is an upper bound (a sparse
		// template writes less), which only automatic choice goes by.
		if err := p.s.stores.Admit(st, 0, p.tags); err != nil {
			return nil, err
		}
		p.plan.Reasons = append(p.plan.Reasons, fmt.Sprintf("store %s: asked for", st.GetName()))
		return st, nil
	}
	p.check = need
	st, reasons, err := p.s.stores.PickStore(ctx, stowagev1.StoreRole_STORE_ROLE_PRIMARY, zone, need, p.tags...)
	p.plan.Reasons = append(p.plan.Reasons, reasons...)
	return st, err
}

// volumeFormat is the format of a volume on st: want, or the store's
// first format when its driver holds some formats only
// (drivers.VolumeFormats), refusing one it does not hold.
func (p *planner) volumeFormat(st *stowagev1.DataStore, want drivers.Format) (drivers.Format, error) {
	d, err := p.s.stores.Driver(st)
	if err != nil {
		return "", err
	}
	vf, ok := d.(drivers.VolumeFormats)
	if !ok || len(vf.VolumeFormats()) == 0 {
		return want, nil
	}
	formats := vf.VolumeFormats()
	if want == "" {
		p.plan.Reasons = append(p.plan.Reasons, fmt.Sprintf("store %s holds %v volumes: %s", st.GetName(), formats, formats[0]))
		return formats[0], nil
	}
	for _, f := range formats {
		if f == want {
			return want, nil
		}
	}
	return "", fmt.Errorf("store %s (provider %s) holds %v volumes, not %s: %w", st.GetName(), st.GetProvider(), formats, want, errdefs.ErrInvalid)
}

func (p *planner) blank(ctx context.Context, req *stowagev1.CreateVolumeRequest, vol *stowagev1.Volume, want drivers.Format) error {
	st, err := p.primary(ctx, req.GetStoreId(), req.GetZone(), 0)
	if err != nil {
		return err
	}
	if want, err = p.volumeFormat(st, want); err != nil {
		return err
	}
	if want == "" {
		want = drivers.FormatQCOW2
	}
	ch, err := p.s.sel.Select(p.s.stores.WithNeeds(ctx, st), "", datastore.Scope(st))
	if err != nil {
		return err
	}
	vol.StoreId, vol.InstallMethod = st.GetId(), "blank"
	p.plan.Strategy, p.plan.Priority = "blank", motion.Default.String()
	p.params.Format = hostops.FormatToProto(want)
	p.step("create", ch.HostID, fmt.Sprintf("create an empty %s image of %d bytes; %s", want, req.GetSize(), ch.Reason))
	return nil
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
	imgRef, imgStore, err := p.s.images.ReadyOn(ctx, tmpl.GetId(), stowagev1.StoreRole_STORE_ROLE_IMAGE)
	if err != nil {
		return err
	}
	// What a copy of the template writes: about its image file's size
	// (holes are not written), the virtual size when that is unknown.
	writes := writesOf(imgRef.GetPhysicalSize(), tmpl.GetVirtualSize())
	st, err := p.primary(ctx, req.GetStoreId(), req.GetZone(), tmpl.GetVirtualSize())
	if err != nil {
		return err
	}
	if want, err = p.volumeFormat(st, want); err != nil {
		return err
	}
	vol.StoreId = st.GetId()
	need := p.s.mountNeed(tmpl.GetId(), datastore.Scope(imgStore).Zone)
	_, mountErr := p.s.sel.SelectWhere(ctx, "", need, datastore.Scope(st))
	d, err := motion.PickInstall(motion.InstallRequest{
		TemplateFormat: tfmt, VolumeFormat: want, StoreReflink: st.GetDetails()["reflink"] == "true", StoreClones: st.GetDetails()["clone"] == "native",
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
	if d.Strategy.Mode() == drivers.CloneFull {
		p.params.ReservedBytes += writes // the volume's own copy
	}
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
		p.params.ReservedBytes += writes // the template's copy cached on the store
		tf, err := image.FormatFromProto(tmpl.GetFormat())
		if err != nil {
			return err
		}
		reasons, host, _, err := p.s.copyPlan(ctx, imgStore, st, &copied{typ: drivers.ObjectTemplate, id: tmpl.GetId(), format: tf}, true, false)
		if err != nil {
			return err
		}
		p.plan.Reasons = append(p.plan.Reasons, reasons...)
		p.step("cache-template", host, fmt.Sprintf("copy template %s once from image store %s to primary store %s (template_spool_ref); %s", tmpl.GetName(), imgStore.GetName(), st.GetName(), reasons[0]))
	default:
		return err
	}
	p.plan.Reasons = append(p.plan.Reasons, d.Reasons...)
	ch, err := p.s.sel.Select(p.s.stores.WithNeeds(ctx, st), "", datastore.Scope(st))
	if err != nil {
		return err
	}
	p.step("install", ch.HostID, fmt.Sprintf("%s clone of the cached template into a %s volume; %s", d.Strategy.Name(), d.Format, ch.Reason))
	return nil
}

// writesOf is what copying an object writes, for its reservation: its
// measured size (physical, or what its backup holds), else its virtual
// size. A compressed qcow2 writes more than its file's size; the
// admission's check still goes by the virtual size.
func writesOf(measured, virtual int64) int64 {
	if measured > 0 {
		return measured
	}
	return virtual
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

// MountCanShow is the need of a lazy volume's host when the create pushes
// the template to the host's mount itself (Service.showOnHost): the host
// has a mount that shows the template, or does not list it yet (a template
// registered since the host's last heartbeat) and is of zone, the zone of
// the template's image store copy ("" any). A mount that lists the
// template with an error is passed over.
func MountCanShow(templateID, zone string) endpoint.Need {
	return endpoint.Need{
		What: "has a template mount that shows, or can show, template " + templateID,
		OK: func(h *stowagev1.Host) bool {
			tc := h.GetCapabilities().GetTemplateCache()
			if tc.GetMount() == "" {
				return false
			}
			for _, t := range tc.GetTemplates() {
				if t.GetId() == templateID {
					return t.GetError() == ""
				}
			}
			return zone == "" || h.GetZone() == zone
		},
	}
}

// mountNeed is MountCanShow when the service can push a template to a
// host's mount, else MountShows (wait for the heartbeats).
func (s *Service) mountNeed(templateID, zone string) endpoint.Need {
	if s.mounts != nil {
		return MountCanShow(templateID, zone)
	}
	return MountShows(templateID)
}

// copied names what a planned copy moves, for the destination driver's
// CanCopy; nil for a copy that flattens a chain (never a driver-native
// copy, as motion.Mover runs it, unless it is of a snapshot).
type copied struct {
	typ    drivers.ObjectType
	id     string
	format drivers.Format
	// into is the type of the copy when it differs from typ (a snapshot
	// copied into a volume), with its format.
	into       drivers.ObjectType
	intoFormat drivers.Format
}

// copyPlan asks the data motion strategies how bytes go from store a to
// store b, and returns the winner's reasons, the host that writes, and
// whether the winner is the destination driver's own copy (native: then
// the host is only a preference for a driver that runs its copy on one,
// and may be "" when no host is Up).
//
// standalone says the source has no backing chain; flatten that the copy
// reads a chain through (so its guest view can travel between hosts).
func (s *Service) copyPlan(ctx context.Context, a, b *stowagev1.DataStore, obj *copied, standalone, flatten bool) (reasons []string, host string, native bool, err error) {
	ctx = s.stores.WithNeeds(ctx, a, b)
	if d, err := s.stores.Driver(b); err == nil && obj != nil {
		src := datastore.Object(a, obj.typ, obj.id, obj.format, 0, "")
		typ, format := obj.typ, obj.format
		if obj.into != "" {
			typ, format = obj.into, obj.intoFormat
		}
		native = d.CanCopy(src, datastore.Object(b, typ, obj.id, format, 0, ""))
	}
	d, err := motion.PickMotion(ctx, motion.MotionRequest{From: datastore.Scope(a), To: datastore.Scope(b), Native: native, Standalone: standalone, Flatten: flatten}, s.sel)
	if err != nil {
		return d.Reasons, "", false, err
	}
	reasons = append([]string{fmt.Sprintf("data motion %s (%s) wins", d.Strategy.Name(), d.Priority)}, d.Reasons...)
	native = d.Strategy.Name() == motion.DriverNative
	scopes := []drivers.Scope{datastore.Scope(b)}
	if d.Strategy.Name() == motion.SameHost {
		scopes = append(scopes, datastore.Scope(a))
	}
	ch, err := s.sel.Select(ctx, "", scopes...)
	if err != nil && !native {
		return d.Reasons, "", false, err
	}
	// A native copy uses a host only if its driver wants one (a reflink
	// runs on a host of the store): the one chosen here, when there is one.
	return reasons, ch.HostID, native, nil
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
	if want, err = p.volumeFormat(st, want); err != nil {
		return err
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
		sf, err := p.s.snapshotFormat(ctx, snap.GetId())
		if err != nil {
			return err
		}
		what := &copied{typ: drivers.ObjectSnapshot, id: snap.GetId(), format: sf, into: drivers.ObjectVolume, intoFormat: want}
		reasons, host, native, err := p.s.copyPlan(ctx, src, st, what, false, true)
		if err != nil {
			return err
		}
		p.plan.Reasons = append(p.plan.Reasons, reasons...)
		p.params.SourceRefId = onPrimary.GetId()
		p.plan.Reasons = append(p.plan.Reasons, "the snapshot is on primary store "+src.GetName()+": no need to read the backup")
		if native {
			// The store makes the volume from its snapshot itself (an RBD
			// clone of the snapshot); the job's result names the driver's
			// method.
			p.plan.Strategy, p.plan.Priority = "native-copy-of-primary-snapshot", motion.Highest.String()
			vol.InstallMethod = "native"
			p.step("copy", host, "store "+st.GetName()+"'s driver makes the volume from the snapshot itself; "+reasons[0])
			return nil
		}
		p.plan.Strategy, p.plan.Priority = "copy-from-primary-snapshot", motion.Hypervisor.String()
		vol.InstallMethod = "full"
		p.params.ReservedBytes = writesOf(onPrimary.GetPhysicalSize(), snap.GetSize())
		p.step("copy", host, "flatten the snapshot's chain into a standalone volume; "+reasons[0])
		return nil
	}
	img, err := p.s.db.Stores().Get(ctx, backup.GetStoreId())
	if err != nil {
		return err
	}
	ch, err := p.s.sel.Select(p.s.stores.WithNeeds(ctx, img, st), "", datastore.Scope(img), datastore.Scope(st))
	if err != nil {
		return fmt.Errorf("restore from backup needs a host that reaches image store %s and primary store %s: %w", img.GetName(), st.GetName(), err)
	}
	p.plan.Strategy, p.plan.Priority = "restore-from-backup", motion.Default.String()
	p.params.SourceRefId = backup.GetId()
	p.params.ReservedBytes = writesOf(backup.GetNewBytes()+backup.GetReusedBytes(), snap.GetSize())
	vol.InstallMethod = "restore"
	p.step("restore", ch.HostID, fmt.Sprintf("rebuild the volume from backup manifest %s (chunks verified); %s", backup.GetInstallPath(), ch.Reason))
	return nil
}
