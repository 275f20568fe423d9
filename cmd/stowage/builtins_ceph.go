//go:build ceph

package main

import (
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/drivers/rbd"
	"github.com/stowage/stowage/hostops"
)

// optionalProviders are the providers built only with their tags: the
// Ceph RBD provider (librbd through cgo; -tags ceph,pacific on Debian 12).
func optionalProviders(hosts hostops.Selector) []drivers.Provider {
	return []drivers.Provider{rbd.New(hosts)}
}
