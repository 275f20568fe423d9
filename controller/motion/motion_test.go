package motion

import (
	"context"
	"errors"
	"testing"

	"github.com/stowage/stowage/controller/endpoint"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

func TestPickInstall(t *testing.T) {
	for _, tc := range []struct {
		name   string
		req    InstallRequest
		want   string
		strat  string
		format drivers.Format
		err    error
	}{
		{"reflink wins on xfs", InstallRequest{TemplateFormat: drivers.FormatRaw, StoreReflink: true}, "auto", "reflink", drivers.FormatRaw, nil},
		{"linked on ext4", InstallRequest{TemplateFormat: drivers.FormatQCOW2}, "auto", "linked", drivers.FormatQCOW2, nil},
		{"raw asked on ext4 is full", InstallRequest{TemplateFormat: drivers.FormatQCOW2, VolumeFormat: drivers.FormatRaw}, "", "full", drivers.FormatRaw, nil},
		{"forced full", InstallRequest{TemplateFormat: drivers.FormatRaw, StoreReflink: true}, "full", "full", drivers.FormatRaw, nil},
		{"forced reflink refused", InstallRequest{TemplateFormat: drivers.FormatRaw}, "reflink", "", "", errdefs.ErrInvalid},
		{"forced linked with raw refused", InstallRequest{TemplateFormat: drivers.FormatRaw, VolumeFormat: drivers.FormatRaw}, "linked", "", "", errdefs.ErrInvalid},
		{"unknown strategy", InstallRequest{TemplateFormat: drivers.FormatRaw}, "magic", "", "", errdefs.ErrInvalid},
		{"iso refused", InstallRequest{TemplateFormat: drivers.FormatISO}, "auto", "", "", errdefs.ErrInvalid},
		{"vhd on reflink xfs is a full qcow2 copy", InstallRequest{TemplateFormat: drivers.FormatVHD, StoreReflink: true, Mounted: true}, "auto", "full", drivers.FormatQCOW2, nil},
		{"vmdk to raw is full", InstallRequest{TemplateFormat: drivers.FormatVMDK, VolumeFormat: drivers.FormatRaw}, "", "full", drivers.FormatRaw, nil},
		{"vhdx forced linked refused", InstallRequest{TemplateFormat: drivers.FormatVHDX}, "linked", "", "", errdefs.ErrInvalid},
		{"vhd forced lazy refused", InstallRequest{TemplateFormat: drivers.FormatVHD, Mounted: true}, "lazy", "", "", errdefs.ErrInvalid},
		{"vmdk forced reflink refused", InstallRequest{TemplateFormat: drivers.FormatVMDK, VolumeFormat: drivers.FormatVMDK, StoreReflink: true}, "reflink", "", "", errdefs.ErrInvalid},
	} {
		d, err := PickInstall(tc.req, tc.want)
		if tc.err != nil {
			if !errors.Is(err, tc.err) {
				t.Errorf("%s: err %v, want %v", tc.name, err, tc.err)
			}
			continue
		}
		if err != nil || d.Strategy.Name() != tc.strat || d.Format != tc.format || len(d.Reasons) == 0 {
			t.Errorf("%s: %+v %v", tc.name, d, err)
		}
	}
}

// hostsIn is a test HostPicker over a fixed map of host -> the scopes it reaches.
type hostsIn map[string][]drivers.Scope

func (h hostsIn) Select(_ context.Context, _ string, scopes ...drivers.Scope) (endpoint.Choice, error) {
	for id, reach := range h {
		ok := true
		for _, want := range scopes {
			found := false
			for _, r := range reach {
				found = found || r == want
			}
			ok = ok && found
		}
		if ok {
			return endpoint.Choice{HostID: id, Reason: "host " + id}, nil
		}
	}
	return endpoint.Choice{}, errdefs.ErrUnavailable
}

func TestPickMotion(t *testing.T) {
	a, b := drivers.Scope{Zone: "z", HostID: "h1"}, drivers.Scope{Zone: "z", HostID: "h2"}
	ctx := context.Background()
	d, err := PickMotion(ctx, MotionRequest{From: a, To: b, Standalone: true}, hostsIn{"h1": {a, b}})
	if err != nil || d.Strategy.Name() != SameHost || d.Priority != Highest {
		t.Fatalf("one host reaches both: %+v %v", d, err)
	}
	d, err = PickMotion(ctx, MotionRequest{From: a, To: b, Standalone: true}, hostsIn{"h1": {a}, "h2": {b}})
	if err != nil || d.Strategy.Name() != AgentToAgent || len(d.Reasons) != 3 {
		t.Fatalf("two hosts: %+v %v", d, err)
	}
	d, err = PickMotion(ctx, MotionRequest{From: a, To: b, Native: true}, hostsIn{"h1": {a}, "h2": {b}})
	if err != nil || d.Strategy.Name() != DriverNative || d.Priority != Highest {
		t.Fatalf("the destination's driver copies natively: %+v %v", d, err)
	}
	if _, err := PickMotion(ctx, MotionRequest{From: a, To: b}, hostsIn{"h1": {a}, "h2": {b}}); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("a backing chain across hosts: %v", err)
	}
}
