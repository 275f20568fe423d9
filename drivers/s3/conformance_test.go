package s3_test

import (
	"bytes"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/stowage/stowage/datapath/netguard"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/drivers/driverstest"
	"github.com/stowage/stowage/drivers/s3"
	"github.com/stowage/stowage/drivers/s3/s3test"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
)

// hostOnly is a host that is Up in the store's scope and does no host work:
// an s3 store never asks one for any (its objects are reached by presigned
// URLs). It is named for what it is; a call to any role method panics,
// which would show the provider asked a host for work it must not need.
type hostOnly struct {
	hostops.Host
	id string
}

func (h hostOnly) HostID() string { return h.id }

// credentials writes the server's keys into a private credentials file.
func credentials(t *testing.T, srv *s3test.Server) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "s3.cred")
	if err := os.WriteFile(p, fmt.Appendf(nil, "access_key=%s\nsecret_key=%s\n", srv.AccessKey, srv.SecretKey), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestConformance runs the driver conformance suite against a real S3
// server (versitygw on loopback), one store prefix per subtest.
func TestConformance(t *testing.T) {
	srv := s3test.Start(t)
	cred := credentials(t, srv)
	var n atomic.Int64
	driverstest.Run(t, "s3", func(t *testing.T) driverstest.Env {
		hosts := driverstest.NewHosts(hostOnly{id: "h1"})
		p := s3.New(hosts)
		i := n.Add(1)
		return driverstest.Env{
			Provider: p,
			Spec: drivers.StoreSpec{ID: fmt.Sprintf("s3-%d", i), Name: fmt.Sprintf("img%d", i), Role: drivers.RoleImage,
				URL: fmt.Sprintf("s3://%s/stores/%d", srv.Bucket, i), Scope: drivers.Scope{Zone: "z1"},
				Details: map[string]string{s3.DetailEndpoint: srv.Endpoint, s3.DetailRegion: srv.Region, s3.DetailCredentialsFile: cred}},
			Client: "h1",
		}
	})
}

// Import applies the address policy of template URLs to an operator's URL
// but not to one Stowage made itself (an agent's export during a data
// motion, ImportSource.Internal), which lives on the management network.
func TestImportPolicyOnlyForOperatorURLs(t *testing.T) {
	srv := s3test.Start(t)
	cred := credentials(t, srv)
	raw := bytes.Repeat([]byte{0x5a}, 1<<20)
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write(raw) }))
	defer web.Close()
	guard, err := netguard.Parse("") // nothing private allowed
	if err != nil {
		t.Fatal(err)
	}
	p := s3.New(driverstest.NewHosts(hostOnly{id: "h1"}), s3.WithFetchClient(guard.Client(nil)))
	info, err := p.LifeCycle().Initialize(t.Context(), drivers.StoreSpec{ID: "s1", Name: "img", Role: drivers.RoleImage,
		URL: "s3://" + srv.Bucket + "/policy", Scope: drivers.Scope{Zone: "z1"},
		Details: map[string]string{s3.DetailEndpoint: srv.Endpoint, s3.DetailRegion: srv.Region, s3.DetailCredentialsFile: cred}})
	if err != nil {
		t.Fatal(err)
	}
	imp := p.Driver().(drivers.Importer)
	obj := func(id string) drivers.DataObject {
		return drivers.DataObject{ID: id, Type: drivers.ObjectTemplate, Store: info, Format: drivers.FormatRaw}
	}
	if _, err := imp.Import(t.Context(), obj("operator"), drivers.ImportSource{URL: web.URL}, nil); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Fatalf("an operator's loopback URL: %v, want permission denied", err)
	}
	got, err := imp.Import(t.Context(), obj("motion"), drivers.ImportSource{URL: web.URL, Internal: true}, nil)
	if err != nil || got.StoredSize != int64(len(raw)) {
		t.Fatalf("a URL Stowage made: %+v %v, want imported", got, err)
	}
}
