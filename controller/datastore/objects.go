package datastore

import (
	"context"
	"fmt"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// Objects on stores, as the workflows hand them to drivers: the controller
// names an object by its store, type, id, format and size; where it lives
// on the store (its key) is the store's driver's business (Locate), and is
// recorded on the object's record (install_path) before any work starts.

// Driver returns the driver of store st's provider.
func (s *Service) Driver(st *stowagev1.DataStore) (drivers.Driver, error) {
	p, err := s.providers.Get(st.GetProvider())
	if err != nil {
		return nil, fmt.Errorf("store %s: %w", st.GetName(), err)
	}
	return p.Driver(), nil
}

// Object returns the data object of an entity on store st. key is the
// object's recorded key ("" before it is located).
func Object(st *stowagev1.DataStore, typ drivers.ObjectType, id string, format drivers.Format, size int64, key string) drivers.DataObject {
	return drivers.DataObject{ID: id, Type: typ, Store: InfoFromRecord(st), Format: format, Size: size, Key: key}
}

// Locate returns obj with the key its store's driver gives it.
func (s *Service) Locate(st *stowagev1.DataStore, obj drivers.DataObject) (drivers.DataObject, error) {
	d, err := s.Driver(st)
	if err != nil {
		return obj, err
	}
	key, err := d.Locate(obj)
	if err != nil {
		return obj, fmt.Errorf("locate %s %s on store %s: %w", obj.Type, obj.ID, st.GetName(), err)
	}
	obj.Key = key
	return obj, nil
}

// Capability returns store st's driver as capability C, or
// errdefs.ErrNotImplemented naming what the workflow needed.
func Capability[C any](s *Service, st *stowagev1.DataStore, what string) (C, error) {
	var zero C
	d, err := s.Driver(st)
	if err != nil {
		return zero, err
	}
	c, ok := d.(C)
	if !ok {
		return zero, fmt.Errorf("store %s (provider %s) cannot %s: %w", st.GetName(), st.GetProvider(), what, errdefs.ErrNotImplemented)
	}
	return c, nil
}

// Primary returns store st's driver as a drivers.PrimaryDriver.
func (s *Service) Primary(st *stowagev1.DataStore) (drivers.PrimaryDriver, error) {
	return Capability[drivers.PrimaryDriver](s, st, "take or revert snapshots")
}

// WithNeeds is ctx asking host selection for what the stores' drivers need
// of a host (drivers.HostNeeds: a LUN's userspace initiator).
func (s *Service) WithNeeds(ctx context.Context, stores ...*stowagev1.DataStore) context.Context {
	for _, st := range stores {
		if d, err := s.Driver(st); err == nil {
			ctx = drivers.WithNeeds(ctx, drivers.NeedsOf(d)...)
		}
	}
	return ctx
}
