package api

import (
	"context"
	"errors"
	"testing"

	"connectrpc.com/grpchealth"

	"github.com/stowage/stowage/errdefs"
)

// TestHealthChecker: every served service shares the metadata store's
// health; a service not served is NotFound.
func TestHealthChecker(t *testing.T) {
	var down error
	c := NewHealthChecker([]string{"stowage.v1.StoreService"}, func(context.Context) error { return down })
	check := func(svc string) (grpchealth.Status, error) {
		resp, err := c.Check(t.Context(), &grpchealth.CheckRequest{Service: svc})
		if err != nil {
			return 0, err
		}
		return resp.Status, nil
	}
	for _, svc := range []string{"", "stowage.v1.StoreService"} {
		if st, err := check(svc); err != nil || st != grpchealth.StatusServing {
			t.Errorf("healthy: %q is %v %v", svc, st, err)
		}
	}
	if _, err := check("stowage.v1.AgentService"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("a service not served: %v, want NotFound", err)
	}
	down = errors.New("etcd: no leader")
	for _, svc := range []string{"", "stowage.v1.StoreService"} {
		if st, err := check(svc); err != nil || st != grpchealth.StatusNotServing {
			t.Errorf("metadata down: %q is %v %v", svc, st, err)
		}
	}
}
