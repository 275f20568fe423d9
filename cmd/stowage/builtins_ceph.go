//go:build ceph

package main

import (
	"net/http"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/drivers/rbd"
	"github.com/stowage/stowage/hostops"
)

// optionalProviders are the providers built only with their tags: the
// Ceph RBD provider (librbd through cgo; -tags ceph,pacific on Debian 12).
func optionalProviders(hosts hostops.Selector, fetch, peer *http.Client) []drivers.Provider {
	return []drivers.Provider{rbd.New(hosts, rbd.WithFetchClient(fetch), rbd.WithPeerClient(peer))}
}
