package drivers

import "context"

// Capability is something a host can do that some steps need; hosts
// report theirs at registration (HostCapabilities), and the controller's
// EndPointSelector picks only hosts that have what a step needs.
type Capability string

// The capabilities drivers ask for.
const (
	// CapISCSIUserspace: the host reaches LUNs through libiscsi (qemu-img's
	// iscsi block driver), with or without the iscsi_tcp kernel module.
	CapISCSIUserspace Capability = "iscsi_userspace"
	// CapISCSIKernel: the host logs in with its kernel initiator
	// (open-iscsi, iscsi_tcp) and sees LUNs as block devices.
	CapISCSIKernel Capability = "iscsi_initiator"
	// CapRBDExport: the host serves Ceph RBD images over NBD (its
	// qemu-storage-daemon has qemu's rbd block driver, librbd).
	CapRBDExport Capability = "rbd_export"
)

// HostNeeds is implemented by a driver whose objects only hosts with some
// capabilities reach (an iSCSI store's LUNs): the data motion and the
// planner pick hosts that have them.
type HostNeeds interface {
	HostNeeds() []Capability
}

type needsKey struct{}

// WithNeeds makes every host selection under ctx (hostops.Selector) pick
// only hosts that have caps, besides any already asked for.
func WithNeeds(ctx context.Context, caps ...Capability) context.Context {
	if len(caps) == 0 {
		return ctx
	}
	return context.WithValue(ctx, needsKey{}, append(NeedsFrom(ctx), caps...))
}

// NeedsFrom returns the capabilities WithNeeds put in ctx.
func NeedsFrom(ctx context.Context) []Capability {
	c, _ := ctx.Value(needsKey{}).([]Capability)
	return append([]Capability(nil), c...)
}

// NeedsOf returns what the drivers' objects need of a host.
func NeedsOf(ds ...Driver) []Capability {
	var out []Capability
	for _, d := range ds {
		if n, ok := d.(HostNeeds); ok {
			out = append(out, n.HostNeeds()...)
		}
	}
	return out
}
