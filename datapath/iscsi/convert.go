package iscsi

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"

	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/redact"
)

// ParseGrant parses the URI a Stowage driver grants a host for a LUN,
// iscsi://user:secret@host[:port]/iqn/lun?initiator=<initiator iqn>: the
// form net/url and the redaction of secrets understand.
func ParseGrant(u string) (Target, error) {
	bad := func(why string) (Target, error) {
		return Target{}, fmt.Errorf("iscsi grant %s: %s: %w", redact.URL(u), why, errdefs.ErrInvalid)
	}
	p, err := url.Parse(u)
	if err != nil || p.Scheme != "iscsi" || p.Host == "" || p.Fragment != "" {
		return bad("want iscsi://user:secret@host[:port]/iqn/lun?initiator=iqn")
	}
	var t Target
	if p.User != nil {
		t.User = p.User.Username()
		t.Secret, _ = p.User.Password()
	}
	host, port, err := net.SplitHostPort(p.Host)
	if err != nil {
		host, port = p.Hostname(), strconv.Itoa(DefaultPort)
	}
	t.Portal = net.JoinHostPort(host, port)
	iqn, lun, ok := strings.Cut(strings.TrimPrefix(p.Path, "/"), "/")
	if !ok || iqn == "" {
		return bad("want /iqn/lun after the portal")
	}
	n, err := strconv.Atoi(lun)
	if err != nil || n < 0 || n > 16383 {
		return bad("bad LUN number")
	}
	t.IQN, t.LUN, t.Initiator = iqn, n, p.Query().Get("initiator")
	return t, t.validate()
}

// endpoint is one side of Convert: a LUN, or a file of this host.
type endpoint struct {
	lun  *Target
	path string
}

func parseEndpoint(s string) (endpoint, error) {
	if strings.HasPrefix(s, "iscsi://") {
		t, err := ParseGrant(s)
		if err != nil {
			return endpoint{}, err
		}
		return endpoint{lun: &t}, nil
	}
	if s == "" {
		return endpoint{}, fmt.Errorf("iscsi convert: an empty path: %w", errdefs.ErrInvalid)
	}
	return endpoint{path: s}, nil
}

// opts is the endpoint as image options of format (a LUN), with its
// secret object named id.
func (e endpoint) opts(format, id string) string {
	return "driver=" + optEscape(format) + strings.TrimPrefix(e.lun.ImageOpts(id), "driver=raw")
}

func (e endpoint) String() string {
	if e.lun != nil {
		return e.lun.String()
	}
	return e.path
}

// Convert copies src into dst, each an iscsi:// grant (ParseGrant) or a
// file of this host, with qemu-img through libiscsi. Equal formats copy
// the bytes as they are (a qcow2 image kept in a LUN); otherwise src is
// read as srcFormat and written as dstFormat, which must be raw for a LUN
// (a LUN is written in place, -n). Zero ranges of 4 KiB or more are not
// written as data (-S 4k); dstIsZero skips them altogether
// (--target-is-zero, for a new LUN). A file destination is created (or
// replaced) sparse. Secrets go to qemu-img in 0600 files, never in argv.
func Convert(ctx context.Context, src, srcFormat, dst, dstFormat string, dstIsZero bool, progress func(done, total int64)) error {
	in, err := parseEndpoint(src)
	if err != nil {
		return err
	}
	out, err := parseEndpoint(dst)
	if err != nil {
		return err
	}
	if srcFormat == "" || dstFormat == "" {
		return fmt.Errorf("iscsi convert %s to %s: formats are required: %w", in, out, errdefs.ErrInvalid)
	}
	if srcFormat == dstFormat {
		srcFormat, dstFormat = "raw", "raw" // the bytes as they are
	}
	if out.lun != nil && dstFormat != "raw" {
		return fmt.Errorf("iscsi convert %s to %s: a LUN is written raw or byte for byte, not converted to %s: %w", in, out, dstFormat, errdefs.ErrInvalid)
	}
	args := []string{"convert", "-S", "4k", "-W", "-m", "8"}
	var cleanups []func()
	defer func() {
		for _, c := range cleanups {
			c()
		}
	}()
	for _, e := range []struct {
		ep endpoint
		id string
	}{{in, "stowage-iscsi-src"}, {out, "stowage-iscsi-dst"}} {
		if e.ep.lun == nil {
			continue
		}
		obj, cleanup, err := e.ep.lun.SecretArgs(e.id)
		if err != nil {
			return err
		}
		cleanups = append(cleanups, cleanup)
		args = append(args, obj...)
	}
	var what Target
	if in.lun != nil {
		args = append(args, "--image-opts")
		what = *in.lun
	} else {
		args = append(args, "-f", srcFormat)
	}
	if out.lun != nil {
		args = append(args, "-n", "--target-image-opts")
		if dstIsZero {
			args = append(args, "--target-is-zero")
		}
		what = *out.lun
	} else {
		args = append(args, "-O", dstFormat)
	}
	if in.lun != nil {
		args = append(args, in.opts(srcFormat, "stowage-iscsi-src"))
	} else {
		args = append(args, fileArg(in.path))
	}
	if out.lun != nil {
		args = append(args, out.opts(dstFormat, "stowage-iscsi-dst"))
	} else {
		args = append(args, fileArg(out.path))
	}
	// No progress: qemu-img reports a percentage of a total this side
	// does not know in bytes (a LUN's, or the image's virtual size).
	_ = progress
	return run(ctx, command(ctx, "convert", args), "convert "+in.String()+" to", what)
}
