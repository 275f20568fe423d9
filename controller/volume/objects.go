package volume

import (
	"context"
	"fmt"
	"slices"

	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/image"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// The data objects the volume workflows hand to drivers, from the records.

// VolumeObject is volume v on store st, at its recorded key.
func VolumeObject(st *stowagev1.DataStore, v *stowagev1.Volume) (drivers.DataObject, error) {
	f, err := formatOf(v)
	if err != nil {
		return drivers.DataObject{}, err
	}
	return datastore.Object(st, drivers.ObjectVolume, v.GetId(), f, v.GetSize(), v.GetInstallPath()), nil
}

// TemplateObject is the copy ref of template id on store st, of the
// copy's size once known, else the template's virtual size (a store that
// allocates per object, such as a LUN, sizes a new copy by it).
func (s *Service) TemplateObject(ctx context.Context, st *stowagev1.DataStore, ref *stowagev1.TemplateOnStore) (drivers.DataObject, error) {
	t, err := s.db.Templates().Get(ctx, ref.GetTemplateId())
	if err != nil {
		return drivers.DataObject{}, err
	}
	f, err := image.FormatFromProto(t.GetFormat())
	if err != nil {
		return drivers.DataObject{}, err
	}
	size := ref.GetSize()
	if size == 0 {
		size = t.GetVirtualSize()
	}
	// A store that holds its objects in some formats only keeps its copy
	// of the template in the first of them (drivers.ObjectFormats).
	if d, err := s.stores.Driver(st); err == nil {
		if of, ok := d.(drivers.ObjectFormats); ok && len(of.ObjectFormats()) > 0 && !slices.Contains(of.ObjectFormats(), f) {
			f = of.ObjectFormats()[0]
		}
	}
	return datastore.Object(st, drivers.ObjectTemplate, ref.GetTemplateId(), f, size, ref.GetInstallPath()), nil
}

// SnapshotObject is the copy ref of a snapshot on store st, in its
// volume's format.
func (s *Service) SnapshotObject(ctx context.Context, st *stowagev1.DataStore, ref *stowagev1.SnapshotOnStore) (drivers.DataObject, error) {
	f, err := s.snapshotFormat(ctx, ref.GetSnapshotId())
	if err != nil {
		return drivers.DataObject{}, err
	}
	return datastore.Object(st, drivers.ObjectSnapshot, ref.GetSnapshotId(), f, ref.GetSize(), ref.GetInstallPath()), nil
}

// locateVolume returns the key volume v (of format f) gets on store st.
func (s *Service) locateVolume(st *stowagev1.DataStore, id string, f drivers.Format, size int64) (string, error) {
	obj, err := s.stores.Locate(st, datastore.Object(st, drivers.ObjectVolume, id, f, size, ""))
	return obj.Key, err
}

// locateTemplate returns the key template t's cached copy gets on store st.
func (s *Service) locateTemplate(st *stowagev1.DataStore, t *stowagev1.Template) (string, error) {
	return s.images.Locate(st, t)
}

func formatOf(v *stowagev1.Volume) (drivers.Format, error) {
	f, err := image.FormatFromProto(v.GetFormat())
	if err != nil || f == drivers.FormatISO || f.Foreign() {
		return "", fmt.Errorf("volume %s has no disk format: %w", v.GetId(), errdefs.ErrInternal)
	}
	return f, nil
}

// templateFormat is the format of template id as its record says; its
// copies on stores (the cached one on primary too) have it.
func (s *Service) templateFormat(ctx context.Context, id string) (drivers.Format, error) {
	t, err := s.db.Templates().Get(ctx, id)
	if err != nil {
		return "", err
	}
	return image.FormatFromProto(t.GetFormat())
}

// snapshotFormat is the format of snapshot id's files on primary: its
// volume's format, as the volume's record says.
func (s *Service) snapshotFormat(ctx context.Context, id string) (drivers.Format, error) {
	sn, err := s.db.Snapshots().Get(ctx, id)
	if err != nil {
		return "", err
	}
	sv, err := s.db.Volumes().Get(ctx, sn.GetVolumeId())
	if err != nil {
		return "", fmt.Errorf("volume of snapshot %s: %w", id, err)
	}
	return formatOf(sv)
}
