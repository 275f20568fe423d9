package hostops

import (
	"fmt"
	"net/url"
	"path/filepath"
	"strings"

	"github.com/stowage/stowage/errdefs"
)

// ImportRule is the rule a file:// template or ISO URL must follow, named
// in every refusal.
const ImportRule = "file:// URLs are accepted only beneath --import-dir"

// ImportPath decides whether rawURL, a file:// URL, names a file beneath
// dir, the operator's import directory ("" for none), and returns the
// path relative to dir. It is the lexical half of the rule, the same in
// the controller (at registration) and the agent (before it opens the file
// from the directory's descriptor without following symbolic links): a
// file URL names a local path (no host but "localhost", no query or
// fragment); the path is absolute and has no NUL byte and no "."
// or ".." component; and it lies beneath dir (not dir itself). A refusal is
// errdefs.ErrPermissionDenied and names the rule.
func ImportPath(rawURL, dir string) (string, error) {
	u, err := url.Parse(rawURL)
	if err != nil || !strings.EqualFold(u.Scheme, "file") {
		return "", fmt.Errorf("url %q is not a file:// URL: %w", rawURL, errdefs.ErrInvalid)
	}
	refuse := func(why string) error {
		where := "none is configured"
		if dir != "" {
			where = dir
		}
		return fmt.Errorf("url %s: %s (%s): %s: %w", rawURL, ImportRule, where, why, errdefs.ErrPermissionDenied)
	}
	p := u.Path
	switch {
	case dir == "":
		return "", refuse("file:// imports are off")
	case u.Host != "" && u.Host != "localhost":
		return "", refuse(fmt.Sprintf("a file URL names a path of the host that imports it, not host %q (write file:///path)", u.Host))
	case u.User != nil || u.RawQuery != "" || u.Fragment != "" || u.Opaque != "":
		return "", refuse("a file URL has no user, query or fragment")
	case strings.IndexByte(p, 0) >= 0:
		return "", refuse("the path contains a NUL byte")
	case !filepath.IsAbs(p):
		return "", refuse("the path is not absolute")
	}
	for _, c := range strings.Split(p, "/") {
		if c == ".." || c == "." {
			return "", refuse(fmt.Sprintf("the path has a %q component", c))
		}
	}
	rel, err := filepath.Rel(filepath.Clean(dir), filepath.Clean(p))
	if err != nil || rel == "." || !filepath.IsLocal(rel) {
		return "", refuse(fmt.Sprintf("%s is not beneath it", filepath.Clean(p)))
	}
	return rel, nil
}
