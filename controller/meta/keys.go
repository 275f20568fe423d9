package meta

import (
	"fmt"
	"net/url"

	"github.com/stowage/stowage/errdefs"
)

// Key prefixes. The layout is documented in doc.go; keep the two in step.
const (
	indexPrefix      = "idx/"
	uniquePrefix     = "uniq/"
	schemaVersionKey = "meta/schema-version"
	maxIDLen         = 128
)

// recordKey is <kind>/<id>.
func recordKey(kind, id string) []byte { return []byte(kind + "/" + id) }

// recordPrefix is <kind>/.
func recordPrefix(kind string) []byte { return []byte(kind + "/") }

// indexValuePrefix is idx/<kind>/<field>/<value>/, the prefix of every
// index entry of one value.
func indexValuePrefix(kind, field, value string) []byte {
	return []byte(indexPrefix + kind + "/" + field + "/" + escapeValue(value) + "/")
}

// indexKey is idx/<kind>/<field>/<value>/<id>.
func indexKey(kind, field, value, id string) []byte {
	return append(indexValuePrefix(kind, field, value), id...)
}

// uniqueKey is uniq/<kind>/<field>/<value>; its value is the owner's id.
func uniqueKey(kind, field, value string) []byte {
	return []byte(uniquePrefix + kind + "/" + field + "/" + escapeValue(value))
}

// escapeValue makes an indexed value safe as one key segment: "/" and "%"
// and anything outside printable ASCII are percent-encoded, so a value can
// never reach into the next segment and a prefix scan for "a" never sees
// the entries of "a/b".
func escapeValue(v string) string { return url.PathEscape(v) }

// TemplateStoreKey is the value of the unique template_store index of
// TemplatesOnStore: at most one TemplateOnStore per (template, store) pair.
// Use it with GetBy(ctx, IndexTemplateStore, TemplateStoreKey(t, s)).
func TemplateStoreKey(templateID, storeID string) string {
	return escapeValue(templateID) + "/" + escapeValue(storeID)
}

// checkID accepts ids of 1 to 128 characters from [A-Za-z0-9._:-]: UUIDs,
// host names and short test names all fit, and none can break the key
// layout.
func checkID(noun, id string) error {
	if id == "" {
		return fmt.Errorf("%s: empty id: %w", noun, errdefs.ErrInvalid)
	}
	if len(id) > maxIDLen {
		return fmt.Errorf("%s %.16s...: id longer than %d bytes: %w", noun, id, maxIDLen, errdefs.ErrInvalid)
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9',
			c == '-', c == '_', c == '.', c == ':':
		default:
			return fmt.Errorf("%s %q: an id holds only letters, digits and '-', '_', '.', ':': %w", noun, id, errdefs.ErrInvalid)
		}
	}
	return nil
}
