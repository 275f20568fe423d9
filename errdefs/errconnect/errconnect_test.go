package errconnect

import (
	"errors"
	"fmt"
	"testing"

	"connectrpc.com/connect"

	"github.com/stowage/stowage/errdefs"
)

func TestRoundTrip(t *testing.T) {
	for class, code := range classToCode {
		err := fmt.Errorf("store s1: %w", class)
		ce := ToConnect(err)
		if got := connect.CodeOf(ce); got != code {
			t.Errorf("%v: code %v, want %v", class, got, code)
		}
		back := FromConnect(ce)
		want := class
		if class == errdefs.ErrConflict {
			want = errdefs.ErrAborted // both travel as Aborted
		}
		if !errors.Is(back, want) {
			t.Errorf("%v: back as %v", class, errdefs.Class(back))
		}
		if back.Error() != err.Error() {
			t.Errorf("message lost: %q vs %q", back.Error(), err.Error())
		}
	}
	if got := connect.CodeOf(ToConnect(errors.New("boom"))); got != connect.CodeInternal {
		t.Errorf("unclassed error: %v, want internal", got)
	}
}
