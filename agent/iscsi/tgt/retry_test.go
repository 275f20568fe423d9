package tgt

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stowage/stowage/errdefs"
)

// standIn writes a stand-in tgtadm (a shell script, named as one: tgtd's
// resets cannot be provoked on demand) that fails its first run with
// first and every later run with later; it returns the binary and a
// function counting the runs.
func standIn(t *testing.T, first, later string) (string, func() int) {
	t.Helper()
	dir := t.TempDir()
	count := filepath.Join(dir, "count")
	script := "#!/bin/sh\nn=$(cat " + count + " 2>/dev/null || echo 0); n=$((n+1)); echo $n > " + count + "\n" +
		"if [ $n -eq 1 ]; then echo \"tgtadm: " + first + "\" >&2; exit 107; fi\n" +
		"echo \"tgtadm: " + later + "\" >&2; exit 22\n"
	bin := filepath.Join(dir, "tgtadm")
	if err := os.WriteFile(bin, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return bin, func() int {
		b, _ := os.ReadFile(count)
		n := 0
		for _, c := range strings.TrimSpace(string(b)) {
			n = n*10 + int(c-'0')
		}
		return n
	}
}

// tgtd can reset tgtadm's connection before it answers ("can't get the
// response"): the request may have been applied. Sent again, a new account
// that now exists, or a deleted one now missing, is the first request's
// doing; a new target is not (its tid may be another's): that error stays.
func TestAmbiguousResetIsRetried(t *testing.T) {
	ctx := context.Background()
	const reset = "can't get the response, Connection reset by peer"
	for _, tc := range []struct {
		name, later string
		args        []string
		ok          bool
	}{
		{"new account", "this account already exists", []string{"--op", "new", "--mode", "account", "--user", "u"}, true},
		{"delete account", "can't find the account", []string{"--op", "delete", "--mode", "account", "--user", "u"}, true},
		{"new target", "this target already exists", []string{"--op", "new", "--mode", "target", "--tid", "1", "-T", "iqn.x"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bin, runs := standIn(t, reset, tc.later)
			m := New(WithBinary(bin))
			_, err := m.run(ctx, tc.name, tc.args...)
			if tc.ok && err != nil {
				t.Errorf("after a reset: %v, want the first request's result", err)
			}
			if !tc.ok && !errdefs.IsAlreadyExists(err) {
				t.Errorf("after a reset: %v, want already exists", err)
			}
			if n := runs(); n != 2 {
				t.Errorf("tgtadm ran %d times, want 2", n)
			}
		})
	}
	// A dropped request that never reached tgtd is sent again; an
	// answer that is not a reset is not.
	bin, runs := standIn(t, "this account already exists", "unused")
	if _, err := New(WithBinary(bin)).run(ctx, "new account", "--op", "new", "--mode", "account"); !errdefs.IsAlreadyExists(err) || runs() != 1 {
		t.Errorf("a plain answer: %v after %d runs, want already exists after 1", err, runs())
	}
}
