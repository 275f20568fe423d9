package s3

import (
	"context"
	"fmt"
	"io"
	"maps"
	"strings"

	"github.com/minio/minio-go/v7"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

// LifeCycle manages S3 stores.
type LifeCycle struct{ d *Driver }

// Initialize checks the settings and the bucket (the keys work, the bucket
// exists) and claims the prefix with a marker object naming the store; a
// prefix another store claimed is refused (ErrFailedPrecondition). An S3
// store reports no capacity (0: unknown).
func (lc *LifeCycle) Initialize(ctx context.Context, spec drivers.StoreSpec) (drivers.StoreInfo, error) {
	info, err := lc.initialize(ctx, spec)
	if err != nil {
		return drivers.StoreInfo{}, fmt.Errorf("initialize s3 store %s: %w", spec.Name, err)
	}
	return info, nil
}

func (lc *LifeCycle) initialize(ctx context.Context, spec drivers.StoreSpec) (drivers.StoreInfo, error) {
	if spec.ID == "" {
		return drivers.StoreInfo{}, fmt.Errorf("the spec has no store id: %w", errdefs.ErrInvalid)
	}
	if spec.Role != drivers.RoleImage {
		return drivers.StoreInfo{}, fmt.Errorf("an s3 store holds templates, ISOs and backups (role image), not %s: %w", spec.Role, errdefs.ErrInvalid)
	}
	info := drivers.StoreInfo{ID: spec.ID, Name: spec.Name, Role: spec.Role, Provider: Name, URL: spec.URL, Scope: spec.Scope,
		Details: maps.Clone(spec.Details)}
	st, err := lc.d.store(ctx, info)
	if err != nil {
		return drivers.StoreInfo{}, err
	}
	owner, err := st.marker(ctx)
	switch {
	case err == nil && owner != spec.ID:
		return drivers.StoreInfo{}, fmt.Errorf("prefix %q of bucket %s belongs to store %s: %w", st.cfg.Prefix, st.cfg.Bucket, owner, errdefs.ErrFailedPrecondition)
	case err == nil:
	case errdefs.IsNotFound(err):
		if err := st.putMarker(ctx, spec.ID); err != nil {
			return drivers.StoreInfo{}, err
		}
	default:
		return drivers.StoreInfo{}, err
	}
	return info, nil
}

// Attach returns the Up hosts in scope: they reach the store's objects
// through presigned URLs and need nothing set up.
func (lc *LifeCycle) Attach(ctx context.Context, store drivers.StoreInfo, scope drivers.Scope) ([]string, error) {
	if _, err := lc.d.store(ctx, store); err != nil {
		return nil, fmt.Errorf("attach s3 store %s: %w", store.Name, err)
	}
	hosts, err := lc.d.hosts.AllInScope(ctx, scope)
	if err != nil {
		return nil, fmt.Errorf("attach s3 store %s: %w", store.Name, err)
	}
	ids := make([]string, 0, len(hosts))
	for _, h := range hosts {
		ids = append(ids, h.HostID())
	}
	return ids, nil
}

// Maintain does nothing: there is no host state to drain.
func (lc *LifeCycle) Maintain(ctx context.Context, store drivers.StoreInfo) error { return ctx.Err() }

// CancelMaintain does nothing.
func (lc *LifeCycle) CancelMaintain(ctx context.Context, store drivers.StoreInfo) error {
	return ctx.Err()
}

// Delete releases the prefix (removes the marker); it refuses while any
// object other than the marker remains under it.
func (lc *LifeCycle) Delete(ctx context.Context, store drivers.StoreInfo) error {
	st, err := lc.d.store(ctx, store)
	if err != nil {
		return fmt.Errorf("delete s3 store %s: %w", store.Name, err)
	}
	objs, err := st.List(ctx, "")
	if err != nil {
		return fmt.Errorf("delete s3 store %s: %w", store.Name, err)
	}
	for _, o := range objs {
		if o.Key != markerKey && !strings.HasPrefix(o.Key, backupsDir+"/locks/") {
			return fmt.Errorf("delete s3 store %s: object %s remains: %w", store.Name, o.Key, errdefs.ErrFailedPrecondition)
		}
	}
	return st.Delete(ctx, markerKey)
}

// marker returns the store id the prefix's marker names
// (errdefs.ErrNotFound when there is none).
func (s *Store) marker(ctx context.Context) (string, error) {
	if _, err := s.Stat(ctx, markerKey); err != nil {
		return "", err
	}
	obj, err := s.c.GetObject(ctx, s.cfg.Bucket, s.cfg.Key(markerKey), minio.GetObjectOptions{})
	if err != nil {
		return "", s.wrap("read marker", err)
	}
	defer obj.Close()
	b, err := io.ReadAll(io.LimitReader(obj, 512))
	if err != nil {
		return "", s.wrap("read marker", err)
	}
	return strings.TrimSpace(string(b)), nil
}

// putMarker writes the marker naming id, unless one exists.
func (s *Store) putMarker(ctx context.Context, id string) error {
	body := strings.NewReader(id + "\n")
	opts := minio.PutObjectOptions{ContentType: "text/plain"}
	opts.SetMatchETagExcept("*")
	if _, err := s.c.PutObject(ctx, s.cfg.Bucket, s.cfg.Key(markerKey), body, int64(body.Len()), opts); err != nil {
		return s.wrap("write marker", err)
	}
	return nil
}
