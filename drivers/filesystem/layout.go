package filesystem

import (
	"fmt"
	"path"
	"strings"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

// The layout directories of a store (see the package doc).
const (
	dirVolumes   = "volumes"
	dirTemplates = "templates"
	dirSnapshots = "snapshots"
	dirChunks    = dirSnapshots + "/chunks"
	dirManifests = dirSnapshots + "/manifests"
	dirTmp       = "tmp"
)

// manifestSuffix ends the name of a backup's manifest.
const manifestSuffix = ".manifest.json"

// layouts lists each role's subdirectories, as PrepareStore creates them
// and ReleaseStore removes them (nested ones after their parents).
var layouts = map[drivers.Role][]string{
	drivers.RolePrimary: {dirVolumes, dirSnapshots, dirTemplates, dirTmp},
	drivers.RoleImage:   {dirTemplates, dirSnapshots, dirChunks, dirManifests, dirTmp},
}

// layout returns the subdirectories of a store of role.
func layout(role drivers.Role) ([]string, error) {
	l, ok := layouts[role]
	if !ok {
		return nil, fmt.Errorf("role %q: the filesystem provider serves %s and %s stores: %w",
			role, drivers.RolePrimary, drivers.RoleImage, errdefs.ErrInvalid)
	}
	return l, nil
}

// extensions maps formats to file extensions and back.
var extensions = map[drivers.Format]string{
	drivers.FormatRaw:   ".raw",
	drivers.FormatQCOW2: ".qcow2",
	drivers.FormatISO:   ".iso",
	drivers.FormatVHD:   ".vhd",
	drivers.FormatVHDX:  ".vhdx",
	drivers.FormatVMDK:  ".vmdk",
}

// formatOf returns the format a file name's extension says ("" if none).
func formatOf(name string) drivers.Format {
	ext := path.Ext(name)
	for f, e := range extensions {
		if e == ext {
			return f
		}
	}
	return ""
}

// checkObjectID requires an id that is a plain file name without a leading dot.
func checkObjectID(id string) error {
	switch {
	case id == "":
		return fmt.Errorf("empty object id: %w", errdefs.ErrInvalid)
	case len(id) > 200:
		return fmt.Errorf("object id %.20q... is longer than 200 bytes: %w", id, errdefs.ErrInvalid)
	case strings.HasPrefix(id, "."):
		return fmt.Errorf("object id %q starts with a dot: %w", id, errdefs.ErrInvalid)
	case strings.ContainsFunc(id, func(r rune) bool { return r == '/' || r == '\\' || r < 0x20 || r == 0x7f }):
		return fmt.Errorf("object id %q contains a slash or a control character: %w", id, errdefs.ErrInvalid)
	}
	return nil
}

// locate is Driver.Locate: the key obj gets on its store, from its type,
// id and format.
func locate(obj drivers.DataObject) (string, error) {
	if err := checkObjectID(obj.ID); err != nil {
		return "", err
	}
	if _, err := layout(obj.Store.Role); err != nil {
		return "", err
	}
	primary := obj.Store.Role == drivers.RolePrimary
	ext, ok := extensions[obj.Format]
	switch obj.Type {
	case drivers.ObjectVolume:
		if !primary {
			return "", fmt.Errorf("volume %s: volumes live on primary stores, and store %s is a %s store: %w", obj.ID, obj.Store.ID, obj.Store.Role, errdefs.ErrInvalid)
		}
		if obj.Format != drivers.FormatRaw && obj.Format != drivers.FormatQCOW2 {
			return "", fmt.Errorf("volume %s has format %q; a volume is %s or %s: %w", obj.ID, obj.Format, drivers.FormatRaw, drivers.FormatQCOW2, errdefs.ErrInvalid)
		}
		return dirVolumes + "/" + obj.ID + ext, nil
	case drivers.ObjectTemplate:
		if !ok {
			return "", fmt.Errorf("template %s has format %q, not raw, qcow2, iso, vhd, vhdx or vmdk: %w", obj.ID, obj.Format, errdefs.ErrInvalid)
		}
		return dirTemplates + "/" + obj.ID + ext, nil
	case drivers.ObjectSnapshot:
		if !primary {
			// A snapshot on an image store is its backup's manifest.
			return dirManifests + "/" + obj.ID + manifestSuffix, nil
		}
		if obj.Format != drivers.FormatRaw && obj.Format != drivers.FormatQCOW2 {
			return "", fmt.Errorf("snapshot %s has format %q; a snapshot has its volume's format, %s or %s: %w", obj.ID, obj.Format, drivers.FormatRaw, drivers.FormatQCOW2, errdefs.ErrInvalid)
		}
		return dirSnapshots + "/" + obj.ID + ext, nil
	}
	return "", fmt.Errorf("object %s has type %q, not volume, template or snapshot: %w", obj.ID, obj.Type, errdefs.ErrInvalid)
}

// keyOf returns obj's key: obj.Key when the record has one (checked to be
// an object file of the store's layout for obj's type), else Locate's.
func keyOf(obj drivers.DataObject) (string, error) {
	if obj.Key == "" {
		return locate(obj)
	}
	if err := checkKey(obj.Store.Role, obj.Type, obj.Key); err != nil {
		return "", err
	}
	return obj.Key, nil
}

// checkKey requires key to be an object file of a store of role, in the
// directory of objects of type typ: volumes/<f>, templates/<f>,
// snapshots/<f> and snapshots/<volume id>/<f> (primary), or
// snapshots/manifests/<f>.manifest.json (image).
func checkKey(role drivers.Role, typ drivers.ObjectType, key string) error {
	bad := func(why string) error {
		return fmt.Errorf("key %q %s: %w", key, why, errdefs.ErrInvalid)
	}
	if _, err := layout(role); err != nil {
		return err
	}
	if key == "" || path.Clean(key) != key || strings.HasPrefix(key, "/") || strings.ContainsAny(key, "\\\x00") {
		return bad("is not a clean relative path inside the store")
	}
	parts := strings.Split(key, "/")
	for _, p := range parts {
		if p == ".." || strings.HasPrefix(p, ".") {
			return bad("has a component starting with a dot")
		}
	}
	dir, name := path.Dir(key), path.Base(key)
	primary := role == drivers.RolePrimary
	ok := false
	switch typ {
	case drivers.ObjectVolume:
		ok = primary && dir == dirVolumes
	case drivers.ObjectTemplate:
		ok = dir == dirTemplates
	case drivers.ObjectSnapshot:
		if primary {
			ok = dir == dirSnapshots || (len(parts) == 3 && parts[0] == dirSnapshots && parts[1] != "chunks" && parts[1] != "manifests")
		} else {
			ok = dir == dirManifests && strings.HasSuffix(name, manifestSuffix) && name != manifestSuffix
		}
	default:
		return fmt.Errorf("object type %q, not volume, template or snapshot: %w", typ, errdefs.ErrInvalid)
	}
	if !ok {
		return bad(fmt.Sprintf("is not where a %s store keeps a %s", role, typ))
	}
	return nil
}

// objectDirs are the directories ListObjects reads for role, with the type
// of the objects in each.
func objectDirs(role drivers.Role) []struct {
	dir string
	typ drivers.ObjectType
} {
	type d = struct {
		dir string
		typ drivers.ObjectType
	}
	if role == drivers.RolePrimary {
		return []d{{dirVolumes, drivers.ObjectVolume}, {dirTemplates, drivers.ObjectTemplate}, {dirSnapshots, drivers.ObjectSnapshot}}
	}
	return []d{{dirTemplates, drivers.ObjectTemplate}, {dirSnapshots, drivers.ObjectSnapshot}, {dirManifests, drivers.ObjectSnapshot}}
}

// idOf returns the object id of a file name: the name without its
// extension (".manifest.json" for a manifest).
func idOf(name string) string {
	if id, ok := strings.CutSuffix(name, manifestSuffix); ok {
		return id
	}
	return strings.TrimSuffix(name, path.Ext(name))
}
