package motion

import (
	"errors"
	"testing"

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
