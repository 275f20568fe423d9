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
	"fmt"
	"log/slog"

	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/endpoint"
	"github.com/stowage/stowage/controller/jobs"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/controller/motion"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
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
	// importDir is the directory file:// template URLs must lie beneath
	// ("": file:// URLs are refused).
	importDir string
}

// Option configures a Service.
type Option func(*Service)

// WithImportDir accepts file:// template and ISO URLs beneath dir (the
// controller's --import-dir); without it they are refused. The agent that
// reads the file checks again beneath its own --import-dir.
func WithImportDir(dir string) Option { return func(s *Service) { s.importDir = dir } }

// New returns the image service and registers its job handlers on runner.
func New(db *meta.DB, stores *datastore.Service, sel *endpoint.Selector, mover *motion.Mover, runner *jobs.Runner, log *slog.Logger, opts ...Option) *Service {
	s := &Service{db: db, stores: stores, sel: sel, mover: mover, jobs: runner, log: log}
	for _, o := range opts {
		o(s)
	}
	runner.Register(KindRegister, registerHandler{s})
	runner.Register(KindDelete, deleteHandler{s})
	runner.Register(KindCreate, createHandler{s})
	return s
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

// List returns up to limit templates (0: no limit) with ids after after,
// in id order, only those named name when it is set.
func (s *Service) List(ctx context.Context, name, after string, limit int) ([]*stowagev1.Template, error) {
	f := meta.Filter[*stowagev1.Template]{After: after, Limit: limit}
	if name != "" {
		f.Index, f.Value = meta.IndexName, name
	}
	return s.db.Templates().List(ctx, f)
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
		if err != nil || st.GetRole() != role || !datastore.Serves(st) {
			continue
		}
		return r, st, nil
	}
	return nil, nil, fmt.Errorf("template %s has no Ready copy on an Up (or Disabled) %s store: %w", templateID, meta.StoreRoleName(role), errdefs.ErrFailedPrecondition)
}

// earlier returns the job an earlier request with idempotency key made
// (false when key is "", unused, or the request is a dry run, which
// writes nothing and so never returns a job).
func (s *Service) earlier(ctx context.Context, key string, dryRun bool) (*stowagev1.Job, bool, error) {
	if key == "" || dryRun {
		return nil, false, nil
	}
	job, err := s.jobs.ByIdempotencyKey(ctx, key)
	if errdefs.IsNotFound(err) {
		return nil, false, nil
	}
	return job, err == nil, err
}
