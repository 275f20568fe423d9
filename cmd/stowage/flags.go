package main

// Checking flag values against the valid ones.

import (
	"fmt"
	"strings"
)

// oneOf checks a flag's value against the valid ones, case-insensitively, and
// returns it lower-cased; "" passes as "".
func oneOf(flag, s string, valid ...string) (string, error) {
	v := strings.ToLower(strings.TrimSpace(s))
	if v == "" {
		return "", nil
	}
	for _, ok := range valid {
		if v == ok {
			return v, nil
		}
	}
	want := strings.Join(valid, ", ")
	if n := len(valid); n > 1 {
		want = strings.Join(valid[:n-1], ", ") + " or " + valid[n-1]
	}
	return "", usageError{fmt.Errorf("%s %q: want %s", flag, s, want)}
}

// enumFlag reads a flag value such as "qcow2" as the enum value named
// prefix+"QCOW2"; "" is the zero value.
func enumFlag[E ~int32](flag, s string, values map[string]int32, prefix string, valid ...string) (E, error) {
	v, err := oneOf(flag, s, valid...)
	if err != nil || v == "" {
		return 0, err
	}
	return E(values[prefix+strings.ToUpper(v)]), nil
}
