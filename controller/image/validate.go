package image

import (
	"fmt"
	"net/url"
	"regexp"
	"strings"

	"github.com/stowage/stowage/datapath/checksum"
	"github.com/stowage/stowage/datapath/netguard"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/redact"
)

var namePattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// CheckName validates an object name (templates, volumes, snapshots).
func CheckName(kind, name string) error {
	if !namePattern.MatchString(name) {
		return fmt.Errorf("%s name %q: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit: %w", kind, name, errdefs.ErrInvalid)
	}
	return nil
}

// FormatFromProto converts a format, refusing unspecified ones.
func FormatFromProto(f stowagev1.ImageFormat) (drivers.Format, error) {
	if df := hostops.FormatFromProto(f); df != "" {
		return df, nil
	}
	return "", fmt.Errorf("format is required: raw, qcow2, iso, vhd, vhdx or vmdk: %w", errdefs.ErrInvalid)
}

// checkChecksum validates an operator's checksum and returns it as
// algo:hex ("" for none): the one parser the agents and the S3 import use.
func checkChecksum(c string) (string, error) {
	sum, err := checksum.Parse(c)
	if err != nil || sum.IsZero() {
		return "", err
	}
	return sum.String(), nil
}

// checkURL accepts the URLs an image store imports from: http:// and
// https:// with a host (the address policy is applied when the download
// dials, netguard), and file:// only beneath importDir, the operator's
// import directory (hostops.ImportPath; "" refuses every file:// URL: it
// would have an agent, running as root, read a file of the host of its
// choosing into a template anyone can read). A literal IPv6 zone in the
// host is refused here already.
func checkURL(raw, importDir string) error {
	u, err := url.Parse(raw)
	if err != nil || raw == "" {
		return fmt.Errorf("url %q: want http://, https:// or file:// (beneath --import-dir): %w", redact.URL(raw), errdefs.ErrInvalid)
	}
	switch strings.ToLower(u.Scheme) {
	case "http", "https":
		if u.Host == "" {
			return fmt.Errorf("url %s has no host: %w", redact.URL(raw), errdefs.ErrInvalid)
		}
		if err := netguard.CheckURL(u); err != nil {
			return fmt.Errorf("url %s: %w", redact.URL(raw), err)
		}
	case "file":
		_, err := hostops.ImportPath(raw, importDir)
		return err
	default:
		return fmt.Errorf("url %s: scheme %q is not http, https or file: %w", redact.URL(raw), u.Scheme, errdefs.ErrInvalid)
	}
	return nil
}
