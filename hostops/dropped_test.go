package hostops

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"

	"connectrpc.com/connect"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
)

// An agent that dies mid-call (its process killed: the connection is
// reset, or closed before an answer) is a dropped call, retried as
// unavailable; an agent that answers with a code is not.
func TestDropped(t *testing.T) {
	for _, tc := range []struct {
		name    string
		handler http.HandlerFunc
		want    bool
	}{
		{"reset", func(w http.ResponseWriter, r *http.Request) {
			c, _, err := w.(http.Hijacker).Hijack()
			if err != nil {
				t.Error(err)
				return
			}
			c.(*net.TCPConn).SetLinger(0) // RST, as a killed process's socket
			c.Close()
		}, true},
		{"closed", func(w http.ResponseWriter, r *http.Request) {
			c, _, _ := w.(http.Hijacker).Hijack()
			c.Close()
		}, true},
		{"answered", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusForbidden)
			_, _ = w.Write([]byte(`{"code":"permission_denied","message":"no"}`))
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(tc.handler)
			defer srv.Close()
			c := stowagev1connect.NewAgentServiceClient(srv.Client(), srv.URL, connect.WithProtoJSON())
			_, err := c.RunTask(context.Background(), connect.NewRequest(&stowagev1.RunTaskRequest{}))
			if err == nil {
				t.Fatal("no error")
			}
			if got := dropped(err); got != tc.want {
				t.Errorf("dropped(%v) = %v, want %v (code %v)", err, got, tc.want, connect.CodeOf(err))
			}
		})
	}
}
