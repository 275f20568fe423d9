package image

import (
	"errors"
	"strings"
	"testing"

	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
)

func TestCheckURL(t *testing.T) {
	const dir = "/srv/import"
	for _, ok := range []string{"https://example.com/t.qcow2", "http://example.com/t.raw", "HTTPS://example.com/x", "file:///srv/import/t.qcow2"} {
		if err := checkURL(ok, dir); err != nil {
			t.Errorf("checkURL(%s) = %v", ok, err)
		}
	}
	for raw, want := range map[string]struct {
		class error
		says  string
	}{
		"file:///srv/import/t.qcow2":    {errdefs.ErrPermissionDenied, "none is configured"}, // with no dir: below
		"file:///etc/shadow":            {errdefs.ErrPermissionDenied, hostops.ImportRule},
		"file:///srv/import/../x":       {errdefs.ErrPermissionDenied, `".."`},
		"http://[fe80::1%25eth0]/t.raw": {errdefs.ErrPermissionDenied, "zone"},
		"http:///nohost":                {errdefs.ErrInvalid, "no host"},
		"ftp://example.com/t":           {errdefs.ErrInvalid, "scheme"},
		"":                              {errdefs.ErrInvalid, "want http"},
	} {
		d := dir
		if want.says == "none is configured" {
			d = ""
		}
		err := checkURL(raw, d)
		if !errors.Is(err, want.class) || !strings.Contains(err.Error(), want.says) {
			t.Errorf("checkURL(%q, %q) = %v, want %v naming %q", raw, d, err, want.class, want.says)
		}
	}
}
