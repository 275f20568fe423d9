// Package envtest decides what a test does when the machine lacks what it
// needs (a tool, root, FUSE, a loop device): on a developer's machine it
// skips with the reason; under CI (CI set in the environment, as .ci/run
// does, where scripts/test.sh installs everything) it fails, so a test
// cannot pass by not running.
package envtest

import (
	"fmt"
	"os"
	"testing"
)

// CI says whether the tests run under CI.
func CI() bool { return os.Getenv("CI") != "" }

// Skip skips t with the reason, or fails it under CI.
func Skip(t testing.TB, args ...any) {
	t.Helper()
	if CI() {
		t.Fatal(append([]any{"under CI this must be available:"}, args...)...)
	}
	t.Skip(args...)
}

// Skipf is Skip with a format.
func Skipf(t testing.TB, format string, args ...any) {
	t.Helper()
	Skip(t, fmt.Sprintf(format, args...))
}
