package hostops

import (
	"testing"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

// TestWriteGrant: a store:// grant names an object, any other URI is
// written in place (zeroed as the grant says), a malformed store:// URI is
// refused.
func TestWriteGrant(t *testing.T) {
	ref, uri, zero, err := WriteGrant(drivers.Access{URI: "store://s%201/volumes/v.raw", Zeroed: true})
	if err != nil || ref != (Ref{Store: "s 1", Key: "volumes/v.raw"}) || uri != "" || zero {
		t.Errorf("store:// grant: %+v %q %v %v", ref, uri, zero, err)
	}
	ref, uri, zero, err = WriteGrant(drivers.Access{URI: "nbd://127.0.0.1:10809/x", Zeroed: true})
	if err != nil || ref != (Ref{}) || uri != "nbd://127.0.0.1:10809/x" || !zero {
		t.Errorf("nbd:// grant: %+v %q %v %v", ref, uri, zero, err)
	}
	if _, _, _, err := WriteGrant(drivers.Access{URI: "store://only-a-store"}); !errdefs.IsInvalid(err) {
		t.Errorf("malformed store:// grant: %v", err)
	}
}
