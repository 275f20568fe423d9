// Package motion is Stowage's DataMotionService and TemplateInstallStrategy
// registry: strategies answer "can you handle this, and how well" with a
// priority (CantHandle < Default < Hypervisor < Highest, as in CloudStack),
// the strictly highest wins (the first registered on a tie), and every
// answer carries a reason, so a plan can say why it chose what it chose and
// what it refused.
package motion

import (
	"fmt"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

// Priority is how well a strategy can handle a request.
type Priority int

// The priorities, in CloudStack's order.
const (
	CantHandle Priority = iota
	Default
	Hypervisor
	Highest
)

func (p Priority) String() string {
	switch p {
	case CantHandle:
		return "CANT_HANDLE"
	case Default:
		return "DEFAULT"
	case Hypervisor:
		return "HYPERVISOR"
	case Highest:
		return "HIGHEST"
	}
	return fmt.Sprintf("Priority(%d)", int(p))
}

// InstallRequest describes a volume to be made from a template that is (or
// will be) cached on the volume's primary store.
type InstallRequest struct {
	TemplateFormat drivers.Format
	// VolumeFormat is what the caller asked for; "" lets the strategy choose.
	VolumeFormat drivers.Format
	// StoreReflink says the primary store's filesystem can clone extents.
	StoreReflink bool
	// StoreClones says the primary store's driver clones an image
	// natively, copy-on-write (an RBD clone): store detail clone=native.
	StoreClones bool
	// Grow says the volume is larger than the template.
	Grow bool
	// Mounted says an Up host reaching the primary store shows the
	// template in its FUSE template mount (lazy volumes).
	Mounted bool
}

// InstallStrategy is a TemplateInstallStrategy: one way of turning a cached
// template into a volume on the same store.
type InstallStrategy interface {
	Name() string
	Mode() drivers.CloneMode
	// CanHandle says how well the strategy fits req, why, and the volume
	// format it would produce.
	CanHandle(req InstallRequest) (Priority, string, drivers.Format)
}

// InstallStrategies are the built-in strategies, best first on a tie.
// Lazy ties with linked on priority and comes after it: it is chosen when
// asked for (--strategy lazy), or when linked cannot handle the request.
var InstallStrategies = []InstallStrategy{cloneInstall{}, reflinkInstall{}, linkedInstall{}, lazyInstall{}, fullInstall{}}

// cloneInstall is the store's own copy-on-write clone of the template
// cached on it (an RBD clone of its protected snapshot): O(1), the volume
// in the store's format, kept referencing the cached template (a linked
// clone as far as the records go).
type cloneInstall struct{}

func (cloneInstall) Name() string            { return "clone" }
func (cloneInstall) Mode() drivers.CloneMode { return drivers.CloneLinked }
func (cloneInstall) CanHandle(r InstallRequest) (Priority, string, drivers.Format) {
	switch {
	case !r.StoreClones:
		return CantHandle, "the store has no native clone", ""
	case r.TemplateFormat == drivers.FormatISO:
		return CantHandle, "an ISO is not a disk", ""
	}
	f := r.VolumeFormat
	if f == "" {
		f = r.TemplateFormat
	}
	return Highest, "O(1) copy-on-write clone by the store of the template cached on it (kept while referenced)", f
}

type reflinkInstall struct{}

func (reflinkInstall) Name() string            { return "reflink" }
func (reflinkInstall) Mode() drivers.CloneMode { return drivers.CloneReflink }
func (reflinkInstall) CanHandle(r InstallRequest) (Priority, string, drivers.Format) {
	switch {
	case !r.StoreReflink:
		return CantHandle, "the store's filesystem cannot clone extents", ""
	case r.TemplateFormat.Foreign():
		return CantHandle, fmt.Sprintf("a reflink keeps the template's format (%s), which no volume is in", r.TemplateFormat), ""
	case r.VolumeFormat != "" && r.VolumeFormat != r.TemplateFormat:
		return CantHandle, fmt.Sprintf("a reflink keeps the template's format (%s), %s was asked", r.TemplateFormat, r.VolumeFormat), ""
	}
	return Highest, "O(1) extent clone, independent of the template afterwards", r.TemplateFormat
}

type linkedInstall struct{}

func (linkedInstall) Name() string            { return "linked" }
func (linkedInstall) Mode() drivers.CloneMode { return drivers.CloneLinked }
func (linkedInstall) CanHandle(r InstallRequest) (Priority, string, drivers.Format) {
	if r.VolumeFormat != "" && r.VolumeFormat != drivers.FormatQCOW2 {
		return CantHandle, "a linked clone is a qcow2 overlay, " + string(r.VolumeFormat) + " was asked", ""
	}
	if r.TemplateFormat == drivers.FormatISO {
		return CantHandle, "an ISO is not a disk", ""
	}
	if r.TemplateFormat.Foreign() {
		return CantHandle, foreignNoOverlay(r.TemplateFormat), ""
	}
	return Hypervisor, "O(1) qcow2 overlay backed by the cached template (kept while referenced)", drivers.FormatQCOW2
}

// lazyInstall makes a qcow2 overlay whose backing file is the template's
// file in the host's FUSE template mount (datapath/imagecache): no copy to
// the primary store at all; the volume is usable at once and the
// template's bytes arrive as the guest reads them (and by prefetch).
type lazyInstall struct{}

func (lazyInstall) Name() string            { return "lazy" }
func (lazyInstall) Mode() drivers.CloneMode { return drivers.CloneLinked }
func (lazyInstall) CanHandle(r InstallRequest) (Priority, string, drivers.Format) {
	switch {
	case r.VolumeFormat != "" && r.VolumeFormat != drivers.FormatQCOW2:
		return CantHandle, "a lazy volume is a qcow2 overlay, " + string(r.VolumeFormat) + " was asked", ""
	case r.TemplateFormat == drivers.FormatISO:
		return CantHandle, "an ISO is not a disk", ""
	case r.TemplateFormat.Foreign():
		return CantHandle, foreignNoOverlay(r.TemplateFormat), ""
	case !r.Mounted:
		return CantHandle, "no Up host reaching the store shows the template in its template mount (stowage cache serve)", ""
	}
	return Hypervisor, "O(1) qcow2 overlay backed by the template in the host's FUSE template mount: usable at once, no copy to primary, bytes fetched as read", drivers.FormatQCOW2
}

type fullInstall struct{}

func (fullInstall) Name() string            { return "full" }
func (fullInstall) Mode() drivers.CloneMode { return drivers.CloneFull }
func (fullInstall) CanHandle(r InstallRequest) (Priority, string, drivers.Format) {
	if r.TemplateFormat == drivers.FormatISO {
		return CantHandle, "an ISO is not a disk", ""
	}
	f := r.VolumeFormat
	if r.TemplateFormat.Foreign() {
		if f == "" {
			f = drivers.FormatQCOW2
		}
		qf := string(r.TemplateFormat)
		if r.TemplateFormat == drivers.FormatVHD {
			qf = "vpc" // qemu's name for VHD
		}
		return Default, fmt.Sprintf("a full sparse copy converted by qemu-img convert -f %s -O %s (the template is %s, which the copy engine cannot read and no volume is in)", qf, f, r.TemplateFormat), f
	}
	if f == "" {
		f = r.TemplateFormat
	}
	return Default, "a full sparse copy, independent of the template", f
}

// Decision is the strategy that won, with what every candidate said.
type Decision struct {
	Strategy InstallStrategy
	Priority Priority
	Format   drivers.Format
	Reasons  []string
}

// PickInstall asks every strategy (only the one named by want, unless want
// is "" or "auto") and returns the strictly best; none able is ErrInvalid
// with every refusal.
func PickInstall(req InstallRequest, want string) (Decision, error) {
	var d Decision
	known := false
	for _, s := range InstallStrategies {
		if want != "" && want != "auto" && want != s.Name() {
			continue
		}
		known = true
		p, why, f := s.CanHandle(req)
		d.Reasons = append(d.Reasons, fmt.Sprintf("install strategy %s: %s (%s)", s.Name(), p, why))
		if p > d.Priority {
			d.Strategy, d.Priority, d.Format = s, p, f
		}
	}
	if !known {
		return d, fmt.Errorf("strategy %q: want auto, clone, reflink, linked, lazy or full: %w", want, errdefs.ErrInvalid)
	}
	if d.Strategy == nil {
		return d, fmt.Errorf("no install strategy can make this volume: %v: %w", d.Reasons, errdefs.ErrInvalid)
	}
	return d, nil
}

// foreignNoOverlay says why a vhd, vhdx or vmdk template cannot back an overlay.
func foreignNoOverlay(f drivers.Format) string {
	return fmt.Sprintf("the template is %s: a qcow2 overlay cannot be backed by it (only qemu-img convert reads it; a volume's base must be raw or qcow2), so it is copied in full", f)
}
