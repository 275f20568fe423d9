package image

import (
	"fmt"
	"net/url"
	"regexp"

	"github.com/stowage/stowage/datapath/checksum"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
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
	return "", fmt.Errorf("format is required: raw, qcow2 or iso: %w", errdefs.ErrInvalid)
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

// checkURL accepts the http:// and https:// URLs an image store imports
// from. A file:// URL is refused: it would have an agent (running as root)
// read a file of the host of its choosing into a template anyone can read.
func checkURL(raw string) error {
	u, err := url.Parse(raw)
	if err != nil || raw == "" {
		return fmt.Errorf("url %q: want http:// or https://: %w", raw, errdefs.ErrInvalid)
	}
	switch u.Scheme {
	case "http", "https":
		if u.Host == "" {
			return fmt.Errorf("url %q has no host: %w", raw, errdefs.ErrInvalid)
		}
	case "file":
		return fmt.Errorf("url %q: a template is imported from http:// or https://, not from a host's file (serve it over HTTP): %w", raw, errdefs.ErrInvalid)
	default:
		return fmt.Errorf("url %q: scheme %q is not http or https: %w", raw, u.Scheme, errdefs.ErrInvalid)
	}
	return nil
}
