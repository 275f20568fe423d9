package main

import (
	"github.com/stowage/stowage/datapath/nbd"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/drivers/filesystem"
	"github.com/stowage/stowage/drivers/s3"
	"github.com/stowage/stowage/hostops"
)

// registerDataSchemes wires the URL schemes the copy engine reads and
// writes beyond its own (file, http, https): nbd:// and nbd+unix://.
func registerDataSchemes() { nbd.Register() }

// builtinProviders is the one place where storage providers are wired into
// the controller, each constructed explicitly with what it needs. Add a
// provider here (behind a build tag if it is optional).
func builtinProviders(hosts hostops.Selector) *drivers.Registry {
	reg := drivers.NewRegistry()
	reg.Register(filesystem.New(hosts))
	reg.Register(s3.New(hosts))
	return reg
}
