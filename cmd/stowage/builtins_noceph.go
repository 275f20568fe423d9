//go:build !ceph

package main

import (
	"net/http"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/hostops"
)

// optionalProviders are the providers built only with their tags: none in
// this build (the rbd provider needs -tags ceph, builtins_ceph.go).
func optionalProviders(hostops.Selector, *http.Client, *http.Client) []drivers.Provider { return nil }
