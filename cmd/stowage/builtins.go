package main

import (
	"net/http"

	"github.com/stowage/stowage/datapath/nbd"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/drivers/filesystem"
	"github.com/stowage/stowage/drivers/iscsi"
	"github.com/stowage/stowage/drivers/s3"
	"github.com/stowage/stowage/hostops"
)

// registerDataSchemes wires the URL schemes the copy engine reads and
// writes beyond its own (file, http, https): nbd:// and nbd+unix://.
func registerDataSchemes() { nbd.Register() }

// builtinProviders is the one place where storage providers are wired into
// the controller, each constructed explicitly with what it needs. Add a
// provider here (behind a build tag if it is optional).
// fetch downloads user-supplied template URLs in this process (the s3
// provider's import), peer the URLs Stowage made (agents' exports);
// chapKey derives iSCSI stores' CHAP secrets.
func builtinProviders(hosts hostops.Selector, fetch, peer *http.Client, chapKey []byte) *drivers.Registry {
	reg := drivers.NewRegistry()
	reg.Register(filesystem.New(hosts))
	reg.Register(s3.New(hosts, s3.WithFetchClient(fetch), s3.WithPeerClient(peer)))
	reg.Register(iscsi.New(hosts, iscsi.WithCHAPKey(chapKey)))
	for _, p := range optionalProviders(hosts, fetch, peer) {
		reg.Register(p)
	}
	return reg
}
