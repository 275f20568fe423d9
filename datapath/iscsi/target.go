package iscsi

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"

	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/redact"
)

// DefaultPort is the iSCSI port a portal without one uses.
const DefaultPort = 3260

// Target names one LUN and how to log in to it.
type Target struct {
	Portal string // host:port
	IQN    string // the target's name
	LUN    int
	// User and Secret are the CHAP credentials; empty User: no CHAP.
	User, Secret string
	// Initiator is the initiator name to log in as (targets grant access
	// by it); empty: libiscsi's default.
	Initiator string
}

// String is the target as an iscsi:// URL without its secret:
// iscsi://user%REDACTED@host:port/iqn/lun when there is one.
func (t Target) String() string {
	var b strings.Builder
	b.WriteString("iscsi://")
	if t.User != "" {
		b.WriteString(t.User)
		if t.Secret != "" {
			b.WriteString("%" + redact.Marker)
		}
		b.WriteString("@")
	}
	fmt.Fprintf(&b, "%s/%s/%d", t.Portal, t.IQN, t.LUN)
	return b.String()
}

// ParseURL parses libiscsi's URL form,
// iscsi://[user[%secret]@]host[:port]/iqn/lun; the port defaults to 3260.
// The secret may be left out and set on the Target afterwards (the usual
// case: URLs travel, secrets come from a secret store). Query parameters
// are refused.
func ParseURL(u string) (Target, error) {
	bad := func(why string) (Target, error) {
		return Target{}, fmt.Errorf("iscsi URL %s: %s: %w", redact.URL(redactUserinfo(u)), why, errdefs.ErrInvalid)
	}
	rest, ok := strings.CutPrefix(u, "iscsi://")
	if !ok {
		return bad("want iscsi://[user[%secret]@]host[:port]/iqn/lun")
	}
	if strings.ContainsAny(rest, "?#") {
		return bad("query or fragment not supported")
	}
	authority, path, ok := strings.Cut(rest, "/")
	if !ok {
		return bad("no target name")
	}
	var t Target
	if at := strings.LastIndex(authority, "@"); at >= 0 {
		userinfo := authority[:at]
		authority = authority[at+1:]
		t.User, t.Secret, _ = strings.Cut(userinfo, "%")
		if t.User == "" {
			return bad("empty user")
		}
	}
	host, port, err := net.SplitHostPort(authority)
	if err != nil {
		host, port = strings.TrimSuffix(strings.TrimPrefix(authority, "["), "]"), strconv.Itoa(DefaultPort)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		return bad("bad port")
	}
	if host == "" {
		return bad("no host")
	}
	t.Portal = net.JoinHostPort(host, port)
	iqn, lun, ok := strings.Cut(path, "/")
	if !ok || iqn == "" {
		return bad("want /iqn/lun after the portal")
	}
	t.IQN = iqn
	n, err := strconv.Atoi(lun)
	if err != nil || n < 0 || n > 16383 {
		return bad("bad LUN number")
	}
	t.LUN = n
	return t, t.validate()
}

// redactUserinfo hides a secret in libiscsi's user%secret@ form, which
// redact.URL (user:password@) does not know.
func redactUserinfo(u string) string {
	rest, ok := strings.CutPrefix(u, "iscsi://")
	if !ok {
		return u
	}
	authority, path, _ := strings.Cut(rest, "/")
	if at := strings.LastIndex(authority, "@"); at >= 0 {
		user, _, _ := strings.Cut(authority[:at], "%")
		authority = user + "%" + redact.Marker + authority[at:]
	}
	return "iscsi://" + authority + "/" + path
}

func (t Target) validate() error {
	bad := func(what string) error {
		return fmt.Errorf("iscsi target %s: %s: %w", t, what, errdefs.ErrInvalid)
	}
	if t.Portal == "" || t.IQN == "" {
		return bad("portal and IQN are required")
	}
	if strings.ContainsAny(t.IQN+t.Portal, ", /\n") {
		return bad("portal or IQN with a comma, blank or slash")
	}
	if t.LUN < 0 {
		return bad("negative LUN")
	}
	if strings.ContainsAny(t.User+t.Initiator, "\n\x00") {
		return bad("user or initiator with a control character")
	}
	if t.Secret != "" && t.User == "" {
		return bad("a CHAP secret without a user")
	}
	return nil
}

// optEscape escapes a value for a qemu option string: commas double.
func optEscape(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// ImageOpts is the LUN as qemu's --image-opts (or --target-image-opts)
// string, a raw image on libiscsi. secretID names the secret object that
// holds the CHAP secret (SecretArgs); it is left out when t has no user.
func (t Target) ImageOpts(secretID string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "driver=raw,file.driver=iscsi,file.transport=tcp,file.portal=%s,file.target=%s,file.lun=%d",
		optEscape(t.Portal), optEscape(t.IQN), t.LUN)
	if t.User != "" {
		b.WriteString(",file.user=" + optEscape(t.User))
		if secretID != "" {
			b.WriteString(",file.password-secret=" + optEscape(secretID))
		}
	}
	if t.Initiator != "" {
		b.WriteString(",file.initiator-name=" + optEscape(t.Initiator))
	}
	return b.String()
}

// SecretArgs writes t's CHAP secret to a new 0600 file in the temporary
// directory and returns the qemu arguments that define it as the secret
// object id ("--object", "secret,id=<id>,file=<path>"), and a cleanup that
// removes the file; call it once qemu has started or ended. Without a
// secret there are no arguments and cleanup does nothing.
func (t Target) SecretArgs(id string) (args []string, cleanup func(), err error) {
	if t.Secret == "" {
		return nil, func() {}, nil
	}
	f, err := os.CreateTemp("", "stowage-iscsi-*.secret") // mode 0600
	if err != nil {
		return nil, nil, fmt.Errorf("iscsi target %s: secret file: %w", t, err)
	}
	cleanup = func() { os.Remove(f.Name()) }
	if _, err := f.WriteString(t.Secret); err != nil {
		f.Close()
		cleanup()
		return nil, nil, fmt.Errorf("iscsi target %s: writing the secret file: %w", t, err)
	}
	if err := f.Close(); err != nil {
		cleanup()
		return nil, nil, fmt.Errorf("iscsi target %s: writing the secret file: %w", t, err)
	}
	return []string{"--object", "secret,id=" + optEscape(id) + ",format=raw,file=" + optEscape(f.Name())}, cleanup, nil
}
