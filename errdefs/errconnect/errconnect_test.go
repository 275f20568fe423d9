package errconnect

import (
	"errors"
	"fmt"
	"strings"
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

func TestToConnectRedacts(t *testing.T) {
	err := fmt.Errorf("fetch http://u:S3cr3tPw@h/t?X-Amz-Signature=SECRETSIG: %w", errdefs.ErrDataLoss)
	ce := ToConnect(err)
	if connect.CodeOf(ce) != connect.CodeDataLoss {
		t.Errorf("code %v", connect.CodeOf(ce))
	}
	wrapped := ToConnect(connect.NewError(connect.CodeNotFound, errors.New("get http://h/t?token=SECRETTOK")))
	for _, e := range []error{ce, wrapped} {
		if msg := e.Error(); strings.Contains(msg, "S3cr3tPw") || strings.Contains(msg, "SECRETSIG") || strings.Contains(msg, "SECRETTOK") {
			t.Errorf("leaks: %s", msg)
		}
	}
	if connect.CodeOf(wrapped) != connect.CodeNotFound {
		t.Errorf("code %v", connect.CodeOf(wrapped))
	}
}
