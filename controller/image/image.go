// Package image is the controller's ImageService: it registers templates
// and ISOs from URLs onto image stores (an agent downloads them, verifying
// the checksum in-stream and the real format with qemu-img), makes templates
// from volumes and snapshots, and deletes templates no volume needs.
//
// Per store, a template is a TemplateOnStore record (CloudStack's
// template_store_ref on image stores, template_spool_ref on primary stores)
// moving Allocated -> Creating -> Ready, or Failed with the reason; a failed
// download leaves no file behind.
package image

import (
	"context"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net/url"
	"regexp"
	"slices"
	"strings"

	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/endpoint"
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
	KindRegister = "template.register"
	KindDelete   = "template.delete"
	KindCreate   = "template.create"
)

// Service implements ImageService.
type Service struct {
	db     *meta.DB
	stores *datastore.Service
	sel    *endpoint.Selector
	mover  *motion.Mover
	jobs   *jobs.Runner
	log    *slog.Logger
}

// New returns the image service and registers its job handlers on runner.
func New(db *meta.DB, stores *datastore.Service, sel *endpoint.Selector, mover *motion.Mover, runner *jobs.Runner, log *slog.Logger) *Service {
	s := &Service{db: db, stores: stores, sel: sel, mover: mover, jobs: runner, log: log}
	runner.Register(KindRegister, registerHandler{s})
	runner.Register(KindDelete, deleteHandler{s})
	runner.Register(KindCreate, createHandler{s})
	return s
}

var namePattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// CheckName validates an object name (templates, volumes, snapshots).
func CheckName(kind, name string) error {
	if !namePattern.MatchString(name) {
		return fmt.Errorf("%s name %q: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit: %w", kind, name, errdefs.ErrInvalid)
	}
	return nil
}

// FormatFromProto converts a format, refusing unspecified ones.
func FormatFromProto(f stowagev1.ImageFormat) (drivers.Format, error) {
	if df := hostops.FormatFromProto(f); df != "" {
		return df, nil
	}
	return "", fmt.Errorf("format is required: raw, qcow2 or iso: %w", errdefs.ErrInvalid)
}

// Locate returns the key template t has on store st (its driver's choice).
func (s *Service) Locate(st *stowagev1.DataStore, t *stowagev1.Template) (string, error) {
	f, err := FormatFromProto(t.GetFormat())
	if err != nil {
		return "", err
	}
	obj, err := s.stores.Locate(st, datastore.Object(st, drivers.ObjectTemplate, t.GetId(), f, t.GetVirtualSize(), ""))
	return obj.Key, err
}

var checksumLen = map[string]int{"sha256": 64, "sha512": 128, "md5": 32}

func checkChecksum(c string) (string, error) {
	if c == "" {
		return "", nil
	}
	algo, hexsum, ok := strings.Cut(c, ":")
	algo = strings.ToLower(algo)
	n, known := checksumLen[algo]
	if !ok || !known {
		return "", fmt.Errorf("checksum %q: want sha256:HEX, sha512:HEX or md5:HEX: %w", c, errdefs.ErrInvalid)
	}
	if _, err := hex.DecodeString(hexsum); err != nil || len(hexsum) != n {
		return "", fmt.Errorf("checksum %q: a %s is %d hex digits: %w", c, algo, n, errdefs.ErrInvalid)
	}
	return algo + ":" + strings.ToLower(hexsum), nil
}

// checkURL accepts the http:// and https:// URLs an image store imports
// from. A file:// URL is refused: it would have an agent (running as root)
// read a file of the host of its choosing into a template anyone can read.
func checkURL(raw string) error {
	u, err := url.Parse(raw)
	if err != nil || raw == "" {
		return fmt.Errorf("url %q: want http:// or https://: %w", raw, errdefs.ErrInvalid)
	}
	switch u.Scheme {
	case "http", "https":
		if u.Host == "" {
			return fmt.Errorf("url %q has no host: %w", raw, errdefs.ErrInvalid)
		}
	case "file":
		return fmt.Errorf("url %q: a template is imported from http:// or https://, not from a host's file (serve it over HTTP): %w", raw, errdefs.ErrInvalid)
	default:
		return fmt.Errorf("url %q: scheme %q is not http or https: %w", raw, u.Scheme, errdefs.ErrInvalid)
	}
	return nil
}

// Register validates req, plans the download and, unless it is a dry run,
// records the template and its per-store rows and starts the job.
func (s *Service) Register(ctx context.Context, req *stowagev1.RegisterTemplateRequest) (*stowagev1.RegisterTemplateResponse, error) {
	if err := CheckName("template", req.GetName()); err != nil {
		return nil, err
	}
	if _, err := FormatFromProto(req.GetFormat()); err != nil {
		return nil, err
	}
	if err := checkURL(req.GetUrl()); err != nil {
		return nil, err
	}
	sum, err := checkChecksum(req.GetChecksum())
	if err != nil {
		return nil, err
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
			Reason: fmt.Sprintf("stream %s into store %s (%s provider) as %s, verify checksum and format; %s", req.GetUrl(), st.GetName(), st.GetProvider(), key, ch.Reason)})
		refs = append(refs, &stowagev1.TemplateOnStore{Id: meta.NewID(), TemplateId: tmpl.GetId(), StoreId: st.GetId(), InstallPath: key})
	}
	if req.GetDryRun() {
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

// Get returns a template by id or name, with its per-store rows.
func (s *Service) Get(ctx context.Context, idOrName string) (*stowagev1.Template, []*stowagev1.TemplateOnStore, error) {
	t, err := s.find(ctx, idOrName)
	if err != nil {
		return nil, nil, err
	}
	refs, err := s.db.TemplatesOnStore().ListBy(ctx, meta.IndexTemplateID, t.GetId())
	return t, refs, err
}

func (s *Service) find(ctx context.Context, idOrName string) (*stowagev1.Template, error) {
	if idOrName == "" {
		return nil, fmt.Errorf("a template id or name is required: %w", errdefs.ErrInvalid)
	}
	t, err := s.db.Templates().Get(ctx, idOrName)
	if err == nil {
		return t, nil
	}
	if byName, lerr := s.db.Templates().ListBy(ctx, meta.IndexName, idOrName); lerr == nil && len(byName) == 1 {
		return byName[0], nil
	}
	return nil, fmt.Errorf("template %q: no template has that id or name; see `stowage template list`: %w", idOrName, errdefs.ErrNotFound)
}

// List returns every template.
func (s *Service) List(ctx context.Context) ([]*stowagev1.Template, error) {
	return s.db.Templates().List(ctx, meta.Filter[*stowagev1.Template]{})
}

// ReadyOn returns the template's Ready copy on one of the stores of role,
// preferring a store reachable from prefer (a scope), or ErrFailedPrecondition.
func (s *Service) ReadyOn(ctx context.Context, templateID string, role stowagev1.StoreRole) (*stowagev1.TemplateOnStore, *stowagev1.DataStore, error) {
	refs, err := s.db.TemplatesOnStore().ListBy(ctx, meta.IndexTemplateID, templateID)
	if err != nil {
		return nil, nil, err
	}
	for _, r := range refs {
		if r.GetState() != stowagev1.ObjectState_OBJECT_STATE_READY {
			continue
		}
		st, err := s.db.Stores().Get(ctx, r.GetStoreId())
		if err != nil || st.GetRole() != role || st.GetState() != stowagev1.StoreState_STORE_STATE_UP {
			continue
		}
		return r, st, nil
	}
	return nil, nil, fmt.Errorf("template %s has no Ready copy on an Up %s store: %w", templateID, meta.StoreRoleName(role), errdefs.ErrFailedPrecondition)
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

// Create plans and starts making a template from a volume or a snapshot on
// primary, flattened into a standalone image on an image store.
func (s *Service) Create(ctx context.Context, req *stowagev1.CreateTemplateRequest) (*stowagev1.CreateTemplateResponse, error) {
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
	if req.GetStoreId() != "" {
		if dst, err = s.stores.UpStore(ctx, req.GetStoreId(), stowagev1.StoreRole_STORE_ROLE_IMAGE); err != nil {
			return nil, err
		}
	} else {
		var reasons []string
		if dst, reasons, err = s.stores.PickStore(ctx, stowagev1.StoreRole_STORE_ROLE_IMAGE, src.GetScope().GetZone(), tmpl.GetVirtualSize()); err != nil {
			return nil, err
		}
		plan.Reasons = append(plan.Reasons, reasons...)
	}
	ch, err := s.sel.Select(ctx, "", datastore.Scope(src), datastore.Scope(dst))
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
	job, existing, err := s.jobs.Submit(ctx, job, func(tx *meta.Tx) error {
		if _, err := meta.Templates.CreateTx(tx, tmpl); err != nil {
			return err
		}
		_, err := meta.TemplatesOnStore.CreateTx(tx, ref)
		return err
	})
	if err != nil {
		return nil, err
	}
	if existing {
		tmpl, _ = s.db.Templates().Get(ctx, job.GetTargetId())
	}
	return &stowagev1.CreateTemplateResponse{Template: tmpl, Job: job, Plan: job.GetPlan()}, nil
}
