package image

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"

	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/jobs"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// images is the image service on a real metadata store, with no host:
// what it decides before any job runs.
type images struct {
	t   *testing.T
	ctx context.Context
	db  *meta.DB
	s   *Service
}

func newImages(t *testing.T) *images {
	t.Helper()
	db, err := meta.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	log := slog.New(slog.DiscardHandler)
	return &images{t: t, ctx: context.Background(), db: db,
		s: New(db, datastore.New(db, drivers.NewRegistry(), log), nil, nil, jobs.New(db, log), log)}
}

func (f *images) template(name string) *stowagev1.Template {
	f.t.Helper()
	t, err := f.db.Templates().Create(f.ctx, &stowagev1.Template{Id: meta.NewID(), Name: name, Format: stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2})
	if err != nil {
		f.t.Fatal(err)
	}
	return t
}

// copyOn records a copy of t on store in state, backing refs volumes.
func (f *images) copyOn(t *stowagev1.Template, store string, events []meta.ObjectEvent, refs int32) *stowagev1.TemplateOnStore {
	f.t.Helper()
	r, err := f.db.TemplatesOnStore().Create(f.ctx, &stowagev1.TemplateOnStore{Id: meta.NewID(), TemplateId: t.GetId(), StoreId: store, RefCount: refs, InstallPath: "templates/" + t.GetId() + ".qcow2"})
	if err != nil {
		f.t.Fatal(err)
	}
	for _, ev := range events {
		if r, err = f.db.TemplatesOnStore().Transition(f.ctx, r.GetId(), ev, nil); err != nil {
			f.t.Fatal(err)
		}
	}
	return r
}

func (f *images) volume(t *stowagev1.Template, name, method, baseRef string) {
	f.t.Helper()
	if _, err := f.db.Volumes().Create(f.ctx, &stowagev1.Volume{Id: meta.NewID(), Name: name, TemplateId: t.GetId(), InstallMethod: method, BaseRefId: baseRef, StoreId: "p1"}); err != nil {
		f.t.Fatal(err)
	}
}

var ready = []meta.ObjectEvent{meta.ObjectCreateRequested, meta.ObjectOperationSucceeded}

// A template delete refuses what would break a volume, and its plan says
// which copies go and which stay.
func TestDeleteTemplateRefusals(t *testing.T) {
	f := newImages(t)
	refused := func(name string, force bool, class error, says ...string) {
		t.Helper()
		_, err := f.s.Delete(f.ctx, name, force, true)
		if !errors.Is(err, class) {
			t.Fatalf("delete %s (force %v): %v, want %v", name, force, err, class)
		}
		for _, w := range says {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%q does not say %q", err, w)
			}
		}
	}

	// Lazy volumes read the image store's copy through the template
	// mounts: no force overrides that.
	lazy := f.template("lazy-base")
	f.copyOn(lazy, "img", ready, 0)
	f.volume(lazy, "vm-lazy", LazyMethod, "")
	refused("lazy-base", true, errdefs.ErrFailedPrecondition, "lazy volumes vm-lazy", "template mounts")

	// Linked clones need their cached copy: refused without force; with
	// it, the plan keeps that copy and removes the rest.
	linked := f.template("linked-base")
	f.copyOn(linked, "img", ready, 0)
	spool := f.copyOn(linked, "p1", ready, 1)
	f.volume(linked, "vm-linked", "linked", spool.GetId())
	refused("linked-base", false, errdefs.ErrFailedPrecondition, "linked clones", "vm-linked", "--force")
	resp, err := f.s.Delete(f.ctx, "linked-base", true, true)
	if err != nil {
		t.Fatalf("forced dry run: %v", err)
	}
	plan := resp.GetPlan()
	if len(plan.GetSteps()) != 1 || !strings.Contains(plan.GetSteps()[0].GetReason(), "store img") {
		t.Errorf("forced plan steps: %v, want the image store's copy only", plan.GetSteps())
	}
	if len(plan.GetReasons()) != 1 || !strings.Contains(plan.GetReasons()[0], "copy on store p1 kept: 1 volumes depend on it") {
		t.Errorf("forced plan reasons: %v", plan.GetReasons())
	}
	if resp.GetJob() != nil {
		t.Errorf("a dry run started job %v", resp.GetJob())
	}

	// A copy being made: wait or cancel first.
	busy := f.template("busy-base")
	f.copyOn(busy, "img", []meta.ObjectEvent{meta.ObjectCreateRequested}, 0)
	refused("busy-base", false, errdefs.ErrAborted, "being copied to store img")

	// Expunged volumes are no dependants.
	gone := f.template("gone-base")
	f.copyOn(gone, "img", ready, 0)
	old, err := f.db.Volumes().Create(f.ctx, &stowagev1.Volume{Id: meta.NewID(), Name: "old", TemplateId: gone.GetId(), InstallMethod: LazyMethod})
	if err != nil {
		t.Fatal(err)
	}
	for _, ev := range []meta.VolumeEvent{meta.VolumeCreateRequested, meta.VolumeOperationSucceeded, meta.VolumeDestroyRequested, meta.VolumeExpungeRequested, meta.VolumeOperationSucceeded} {
		if old, err = f.db.Volumes().Transition(f.ctx, old.GetId(), ev, nil); err != nil {
			t.Fatalf("%v: %v", ev, err)
		}
	}
	if old.GetState() != stowagev1.VolumeState_VOLUME_STATE_EXPUNGED {
		t.Fatalf("volume %v, want Expunged", old)
	}
	if _, err := f.s.Delete(f.ctx, "gone-base", false, true); err != nil {
		t.Errorf("delete with only an expunged volume left: %v", err)
	}
	refused("no-such-template", false, errdefs.ErrNotFound)
}

// Registration refuses before anything is recorded: a taken name, plain
// http without a checksum, no image store to hold it.
func TestRegisterRefusals(t *testing.T) {
	f := newImages(t)
	f.template("taken")
	for _, tc := range []struct {
		name  string
		req   *stowagev1.RegisterTemplateRequest
		class error
		says  string
	}{
		{"taken name", &stowagev1.RegisterTemplateRequest{Name: "taken", Url: "https://example.invalid/t.qcow2", Format: stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2}, errdefs.ErrAlreadyExists, "already taken"},
		{"plain http, no checksum", &stowagev1.RegisterTemplateRequest{Name: "t1", Url: "http://example.invalid/t.qcow2", Format: stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2}, errdefs.ErrInvalid, "plain http"},
		{"file:// without an import dir", &stowagev1.RegisterTemplateRequest{Name: "t2", Url: "file:///etc/shadow", Format: stowagev1.ImageFormat_IMAGE_FORMAT_RAW}, errdefs.ErrPermissionDenied, "--import-dir"},
		{"no image store", &stowagev1.RegisterTemplateRequest{Name: "t3", Url: "https://example.invalid/t.qcow2", Format: stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2}, errdefs.ErrFailedPrecondition, "no image store is added (stowage store add --role image)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := f.s.Register(f.ctx, tc.req)
			if !errors.Is(err, tc.class) || !strings.Contains(err.Error(), tc.says) {
				t.Fatalf("%v, want %v saying %q", err, tc.class, tc.says)
			}
		})
	}
	if all, err := f.db.Templates().List(f.ctx, meta.Filter[*stowagev1.Template]{}); err != nil || len(all) != 1 {
		t.Errorf("templates recorded after the refusals: %d %v, want only the first", len(all), err)
	}
}
