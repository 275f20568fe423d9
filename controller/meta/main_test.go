package meta

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// The conformance suite: TestMain runs every test of this package twice,
// first on Badger, then on etcd (an embedded etcd server started here,
// every test under its own key prefix). A test that concerns one engine
// only says so with onlyBadger.
var (
	etcdURL   string // "host:port" of the embedded server in the etcd pass
	specCount atomic.Int64
)

func TestMain(m *testing.M) {
	code := m.Run()
	if code != 0 || os.Getenv("STOWAGE_META_SKIP_ETCD") != "" {
		os.Exit(code)
	}
	stop, err := startEmbeddedEtcd()
	if err != nil {
		fmt.Fprintf(os.Stderr, "meta: embedded etcd: %v\n", err)
		os.Exit(1)
	}
	fmt.Println("meta: the same tests again, on etcd at", etcdURL)
	code = m.Run()
	stop()
	os.Exit(code)
}

// startEmbeddedEtcd starts a one-member etcd on loopback ports in a
// temporary directory.
func startEmbeddedEtcd() (func(), error) {
	dir, err := os.MkdirTemp("", "stowage-meta-etcd-")
	if err != nil {
		return nil, err
	}
	cfg, client, err := embedConfig(dir, "http")
	if err != nil {
		return nil, err
	}
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(30 * time.Second):
		e.Close()
		os.RemoveAll(dir)
		return nil, fmt.Errorf("not ready after 30s")
	}
	etcdURL = client.Host
	return func() { e.Close(); os.RemoveAll(dir) }, nil
}

// embedConfig is a one-member etcd in dir on free loopback ports; clients
// reach it with scheme (http, or https once the caller sets ClientTLSInfo).
func embedConfig(dir, scheme string) (*embed.Config, *url.URL, error) {
	cfg := embed.NewConfig()
	cfg.Dir = dir
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	cfg.LogLevel = "error"
	ports := make([]string, 2)
	for i := range ports {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, nil, err
		}
		ports[i] = ln.Addr().String()
		ln.Close()
	}
	client, _ := url.Parse(scheme + "://" + ports[0])
	peer, _ := url.Parse("http://" + ports[1])
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*client}, []url.URL{*client}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*peer}, []url.URL{*peer}
	cfg.InitialCluster = cfg.Name + "=" + peer.String()
	// Tests write fast and often; fsync per commit would make the suite
	// slow without testing anything more.
	cfg.UnsafeNoFsync = true
	return cfg, client, nil
}

// testSpec names a new, empty store for t: a directory in the Badger
// pass, a fresh key prefix of the embedded etcd in the etcd pass.
func testSpec(t *testing.T) string {
	t.Helper()
	if etcdURL == "" {
		return t.TempDir()
	}
	return fmt.Sprintf("etcd://%s/test/%d", etcdURL, specCount.Add(1))
}

// onlyBadger skips t in the etcd pass.
func onlyBadger(t *testing.T) {
	t.Helper()
	if etcdURL != "" {
		t.Skip("Badger only")
	}
}

// onEtcd reports whether this is the etcd pass.
func onEtcd() bool { return etcdURL != "" }
