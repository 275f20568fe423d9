package hostops

import (
	"errors"
	"strings"
	"testing"

	"github.com/stowage/stowage/errdefs"
)

func TestImportPath(t *testing.T) {
	const dir = "/srv/import"
	for raw, want := range map[string]string{
		"file:///srv/import/a.qcow2":            "a.qcow2",
		"file:///srv/import/sub/b.iso":          "sub/b.iso",
		"file://localhost/srv/import/c.raw":     "c.raw",
		"file:///srv/import//d.raw":             "d.raw",
		"file:///srv/import/with%20space.raw":   "with space.raw",
		"FILE:///srv/import/upper-scheme.qcow2": "upper-scheme.qcow2",
	} {
		got, err := ImportPath(raw, dir)
		if err != nil || got != want {
			t.Errorf("ImportPath(%s) = %q, %v; want %q", raw, got, err, want)
		}
	}
	for raw, why := range map[string]string{
		"file:///etc/shadow":                   "not beneath",
		"file:///srv/import":                   "not beneath",
		"file:///srv/import/":                  "not beneath",
		"file:///srv/importer/x":               "not beneath",
		"file:///srv/import/../../etc/shadow":  `".."`,
		"file:///srv/import/a%2F..%2F..%2Fetc": `".."`,
		"file:///srv/import/./a":               `"."`,
		"file:///srv/import/a%00b":             "NUL",
		"file://otherhost/srv/import/a":        "host",
		"file:///srv/import/a?x=1":             "query",
		"file:///srv/import/a#frag":            "fragment",
		"file://user@localhost/srv/import/a":   "user",
		"file:srv/import/a":                    "",
	} {
		_, err := ImportPath(raw, dir)
		if !errors.Is(err, errdefs.ErrPermissionDenied) || !strings.Contains(err.Error(), ImportRule) || !strings.Contains(err.Error(), why) {
			t.Errorf("ImportPath(%s) = %v, want refused naming the rule and %q", raw, err, why)
		}
	}
	if _, err := ImportPath("file:///srv/import/a", ""); !errors.Is(err, errdefs.ErrPermissionDenied) || !strings.Contains(err.Error(), "none is configured") {
		t.Errorf("no import dir: %v", err)
	}
	if _, err := ImportPath("http://example.com/a", dir); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("http URL: %v", err)
	}
}
