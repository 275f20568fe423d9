// Package redact hides the secrets a URL can carry before it reaches a log
// line, an error, a job record or an API reply: the user information
// (user:password@, or a bare token@), every query value (presigned
// signatures such as X-Amz-Signature, token=, sig=, access_token=), the
// fragment, and the capability of a Stowage export: the token of an HTTP
// export (…/exports/<token>) and the name of an NBD export
// (nbd://host:port/<name>).
// The rest of the URL (scheme, host, port, path) is kept so a message
// still says what was fetched from where.
//
// URL redacts one URL; Text redacts every URL inside free text such as an
// error message; Error does the same to an error and keeps its chain for
// errors.Is; Handler wraps a slog.Handler so that a process cannot log a
// secret by mistake. The package depends only on the standard library, so
// every layer (datapath, drivers, agent, controller) may use it.
//
// Redaction works on the text, never through url.Parse and String: a URL
// that does not parse is still redacted, and everything but the secret
// parts stays byte for byte as it was.
//
//	URL("http://u:pw@h:80/t.qcow2?X-Amz-Signature=abc&region=r")
//	  == "http://u:REDACTED@h:80/t.qcow2?X-Amz-Signature=REDACTED&region=r"
package redact

import (
	"context"
	"log/slog"
	"net/url"
	"regexp"
	"strings"
)

// Marker replaces each secret.
const Marker = "REDACTED"

// exportsPrefix is the path under which agents serve exports: the segment
// after it is a capability token (agent/exports.Prefix).
const exportsPrefix = "/exports/"

// plain are query parameters of Stowage's own URLs whose values are no
// secret and help a reader: s3://bucket/prefix?endpoint=…&region=…,
// nbd+unix:///export?socket=…. Their values are kept unless they carry
// user information or a query of their own. Every other value is redacted:
// an allowlist, because the names of secrets are not a closed set.
var plain = map[string]bool{"endpoint": true, "region": true, "socket": true, "insecure": true}

// URL returns s with its secrets replaced by Marker: the user information
// (user:Marker@ when there is a password, Marker@ when the user alone may
// be a token), each query value (key=Marker; a bare item becomes Marker),
// a non-empty fragment, an HTTP export token and an NBD export name. A
// string without any of them is returned unchanged.
func URL(s string) string {
	nbdURL := len(s) > 3 && strings.EqualFold(s[:3], "nbd")
	if !nbdURL && !strings.ContainsAny(s, "@?#") && !strings.Contains(s, exportsPrefix) {
		return s // fast path: nothing to hide
	}
	var b strings.Builder
	b.Grow(len(s) + len(Marker))
	rest := s
	// Scheme and user information.
	i := strings.Index(rest, "://")
	nbdURL = nbdURL && i >= 0
	if i >= 0 {
		b.WriteString(rest[:i+3])
		rest = rest[i+3:]
		// The user information ends at the last '@' before the path; an
		// unescaped '?' or '#' in a password does not end it early.
		end := strings.IndexByte(rest, '/')
		if end < 0 {
			end = len(rest)
		}
		if at := strings.LastIndexByte(rest[:end], '@'); at >= 0 {
			if user, _, hasPw := strings.Cut(rest[:at], ":"); hasPw {
				b.WriteString(user + ":" + Marker)
			} else {
				b.WriteString(Marker)
			}
			rest = rest[at:]
		}
	}
	// Path (with an export token), query, fragment.
	path, query, fragment := rest, "", ""
	hasQuery, hasFragment := false, false
	if i := strings.IndexByte(path, '#'); i >= 0 {
		path, fragment, hasFragment = path[:i], path[i+1:], true
	}
	if i := strings.IndexByte(path, '?'); i >= 0 {
		path, query, hasQuery = path[:i], path[i+1:], true
	}
	if nbdURL {
		b.WriteString(redactExportName(path))
	} else {
		b.WriteString(redactPath(path))
	}
	if hasQuery {
		b.WriteByte('?')
		b.WriteString(redactQuery(query))
	}
	if hasFragment {
		b.WriteByte('#')
		if fragment != "" {
			b.WriteString(Marker)
		}
	}
	return b.String()
}

// redactPath hides the segment after /exports/.
func redactPath(p string) string {
	i := strings.Index(p, exportsPrefix)
	if i < 0 || len(p) == i+len(exportsPrefix) {
		return p
	}
	tail := p[i+len(exportsPrefix):]
	if j := strings.IndexByte(tail, '/'); j >= 0 {
		return p[:i+len(exportsPrefix)] + Marker + tail[j:]
	}
	return p[:i+len(exportsPrefix)] + Marker
}

// redactExportName hides the export name of an nbd:// URL: what follows
// the authority's "/" (host:port stays).
func redactExportName(p string) string {
	if i := strings.IndexByte(p, '/'); i >= 0 && i+1 < len(p) {
		return p[:i+1] + Marker
	}
	return p
}

// redactQuery replaces every value but those of plain keys.
func redactQuery(q string) string {
	if q == "" {
		return q
	}
	items := strings.Split(q, "&")
	for i, it := range items {
		if it == "" {
			continue
		}
		k, v, ok := strings.Cut(it, "=")
		switch {
		case !ok:
			items[i] = Marker // a bare item may be the secret itself
		case v == "":
		case plain[strings.ToLower(k)] && isPlainValue(v):
		default:
			items[i] = k + "=" + Marker
		}
	}
	return strings.Join(items, "&")
}

// isPlainValue reports whether a kept value carries no secret of its own.
func isPlainValue(v string) bool {
	if d, err := url.QueryUnescape(v); err == nil {
		v = d
	}
	return !strings.ContainsAny(v, "@?#")
}

// urlInText is a URL inside free text: a scheme, "://", and everything up
// to a space, a quote, a bracket or a backslash (the ends a message or a
// %q puts around a URL).
var urlInText = regexp.MustCompile(`[A-Za-z][A-Za-z0-9+.-]*://[^\s"'<>()\[\]{}\x60\\]+`)

// Text returns s with every URL in it (scheme://…) redacted by URL; the
// rest of s is unchanged. Punctuation that ends a URL (".,;:!") is taken
// as the sentence's, as in "fetch http://h/t?sig=x: refused". A secret
// outside a URL (a bare password, a query without a scheme before it) is
// not recognised.
func Text(s string) string {
	if !strings.Contains(s, "://") {
		return s
	}
	return urlInText.ReplaceAllStringFunc(s, func(u string) string {
		core := strings.TrimRight(u, ".,;:!")
		return URL(core) + u[len(core):]
	})
}

// Error returns err with its message redacted by Text. errors.Is and
// errors.As still see err's chain (Unwrap); only the message changes. A
// nil error, or one with nothing to hide, is returned as is.
func Error(err error) error {
	if err == nil {
		return nil
	}
	msg := err.Error()
	red := Text(msg)
	if red == msg {
		return err
	}
	return &redacted{msg: red, err: err}
}

type redacted struct {
	msg string
	err error
}

func (r *redacted) Error() string { return r.msg }
func (r *redacted) Unwrap() error { return r.err }

// Handler returns a slog.Handler that redacts, by Text, the message and
// every string, error and fmt.Stringer attribute (groups included) before
// passing the record to h. Install it once where a process builds its
// logger.
func Handler(h slog.Handler) slog.Handler {
	if _, ok := h.(handler); ok {
		return h
	}
	return handler{h}
}

type handler struct{ h slog.Handler }

func (x handler) Enabled(ctx context.Context, l slog.Level) bool { return x.h.Enabled(ctx, l) }

func (x handler) Handle(ctx context.Context, r slog.Record) error {
	out := slog.NewRecord(r.Time, r.Level, Text(r.Message), r.PC)
	r.Attrs(func(a slog.Attr) bool {
		out.AddAttrs(attr(a))
		return true
	})
	return x.h.Handle(ctx, out)
}

func (x handler) WithAttrs(as []slog.Attr) slog.Handler {
	red := make([]slog.Attr, len(as))
	for i, a := range as {
		red[i] = attr(a)
	}
	return handler{x.h.WithAttrs(red)}
}

func (x handler) WithGroup(name string) slog.Handler { return handler{x.h.WithGroup(name)} }

// attr redacts one attribute.
func attr(a slog.Attr) slog.Attr {
	v := a.Value.Resolve()
	switch v.Kind() {
	case slog.KindString:
		return slog.String(a.Key, Text(v.String()))
	case slog.KindGroup:
		g := v.Group()
		red := make([]any, len(g))
		for i, ga := range g {
			red[i] = attr(ga)
		}
		return slog.Group(a.Key, red...)
	case slog.KindAny:
		switch x := v.Any().(type) {
		case error:
			return slog.Any(a.Key, Error(x))
		case interface{ String() string }:
			// Only a value with something to hide loses its type.
			if s := x.String(); Text(s) != s {
				return slog.String(a.Key, Text(s))
			}
		case []string:
			red := make([]string, len(x))
			for i, s := range x {
				red[i] = Text(s)
			}
			return slog.Any(a.Key, red)
		}
	}
	return slog.Attr{Key: a.Key, Value: v}
}

var (
	_ error        = (*redacted)(nil)
	_ slog.Handler = handler{}
)
