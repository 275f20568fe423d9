package errdefs

import (
	"context"
	"fmt"
	"testing"
)

func TestClassRoundTrip(t *testing.T) {
	for _, c := range classes {
		err := fmt.Errorf("store s1: %w", c)
		if got := Class(err); got != c {
			t.Fatalf("Class(%v) = %v, want %v", err, got, c)
		}
		if got := FromClassName(ClassName(err)); got != c {
			t.Fatalf("FromClassName(%q) = %v, want %v", ClassName(err), got, c)
		}
	}
	if Class(fmt.Errorf("plain")) != nil {
		t.Fatal("an unclassified error must have no class")
	}
	if Class(fmt.Errorf("x: %w", context.Canceled)) != context.Canceled {
		t.Fatal("context.Canceled must be recognised")
	}
	if FromClassName("no such class") != ErrInternal {
		t.Fatal("unknown names map to ErrInternal")
	}
	w := New(ErrNotFound, "remote: volume v1 not found")
	if !IsNotFound(w) || w.Error() != "remote: volume v1 not found" {
		t.Fatalf("New: got %v", w)
	}
}
