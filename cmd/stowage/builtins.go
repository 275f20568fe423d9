package main

import (
	"github.com/stowage/stowage/datapath/nbd"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/drivers/filesystem"
)

// registerDataSchemes wires the URL schemes the copy engine reads and
// writes beyond its own (file, http, https): nbd:// and nbd+unix://.
func registerDataSchemes() { nbd.Register() }

// builtinProviders is the one place where storage providers are wired into
// the controller. Add a provider here (behind a build tag if it is optional).
func builtinProviders(deps drivers.Deps) (*drivers.Registry, error) {
	reg := drivers.NewRegistry()
	for _, factory := range []drivers.Factory{
		filesystem.Factory,
	} {
		p, err := factory(deps)
		if err != nil {
			return nil, err
		}
		reg.Register(p)
	}
	return reg, nil
}
