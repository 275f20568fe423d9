package api

import (
	"net/url"
	"strings"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/redact"
)

// textFields are the string fields, in any message of a reply, that say
// what happened in words and may quote a URL: errors, reasons, results.
// Their URLs are redacted (redact.Text).
var textFields = map[protoreflect.Name]bool{
	"error": true, "reason": true, "reasons": true, "state_reason": true, "result": true,
}

// templateName is the message whose url is the operator's own input
// (user:password@, a presigned query): the reply shows it redacted
// (redact.URL); the record keeps it whole for the download.
var templateName = (&stowagev1.Template{}).ProtoReflect().Descriptor().FullName()

// redactReply returns a copy of m whose words and template URLs carry no
// secret (package redact). The domain's records are left alone: a reply
// may share them (a job the runner is still running), so m is cloned
// first, and only when something changes.
func redactReply[M proto.Message](m M) M {
	if !redactMessage(m.ProtoReflect(), false) {
		return m
	}
	c := proto.Clone(m).(M)
	redactMessage(c.ProtoReflect(), true)
	return c
}

// redactMessage redacts m's secret-bearing strings in place when apply is
// set, and reports whether any would change.
func redactMessage(m protoreflect.Message, apply bool) bool {
	changed := false
	isTemplate := m.Descriptor().FullName() == templateName
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.Message() != nil && fd.IsList():
			for i, l := 0, v.List(); i < l.Len(); i++ {
				changed = redactMessage(l.Get(i).Message(), apply) || changed
			}
		case fd.Message() != nil && fd.IsMap():
			if fd.MapValue().Message() != nil {
				v.Map().Range(func(_ protoreflect.MapKey, mv protoreflect.Value) bool {
					changed = redactMessage(mv.Message(), apply) || changed
					return true
				})
			}
		case fd.Message() != nil:
			changed = redactMessage(v.Message(), apply) || changed
		case fd.Kind() != protoreflect.StringKind:
		case isTemplate && fd.Name() == "url":
			changed = redactString(m, fd, v, redact.URL, apply) || changed
		case textFields[fd.Name()] && fd.IsList():
			for i, l := 0, v.List(); i < l.Len(); i++ {
				if s := l.Get(i).String(); redact.Text(s) != s {
					changed = true
					if apply {
						l.Set(i, protoreflect.ValueOfString(redact.Text(s)))
					}
				}
			}
		case textFields[fd.Name()]:
			changed = redactString(m, fd, v, redact.Text, apply) || changed
		case !fd.IsList() && !fd.IsMap():
			// Any URI with a password (a LUN's CHAP secret in an access
			// grant): the password never leaves the controller in a reply;
			// hosts get it from their tasks.
			changed = redactString(m, fd, v, withoutPassword, apply) || changed
		}
		return true
	})
	return changed
}

func redactString(m protoreflect.Message, fd protoreflect.FieldDescriptor, v protoreflect.Value, f func(string) string, apply bool) bool {
	s := v.String()
	r := f(s)
	if r == s {
		return false
	}
	if apply {
		m.Set(fd, protoreflect.ValueOfString(r))
	}
	return true
}

// withoutPassword replaces the password of a URL's user information with
// redact.Marker; any other string is returned as it is.
func withoutPassword(s string) string {
	if !strings.Contains(s, "://") || !strings.Contains(s, "@") {
		return s
	}
	u, err := url.Parse(s)
	if err != nil || u.User == nil {
		return s
	}
	if _, ok := u.User.Password(); !ok {
		return s
	}
	u.User = url.UserPassword(u.User.Username(), redact.Marker)
	return u.String()
}
