package drivers

import (
	"fmt"
	"sort"
	"sync"

	"github.com/stowage/stowage/errdefs"
)

// Registry maps provider names to providers. Fill it explicitly at start
// (cmd/stowage/builtins.go); registering a name twice panics.
type Registry struct {
	mu        sync.RWMutex
	providers map[string]Provider
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry { return &Registry{providers: map[string]Provider{}} }

// Register adds p; it panics when p's name is taken, a programming error.
func (r *Registry) Register(p Provider) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, dup := r.providers[p.Name()]; dup {
		panic(fmt.Sprintf("drivers: provider %q registered twice", p.Name()))
	}
	r.providers[p.Name()] = p
}

// Get returns the provider called name, or ErrInvalid naming the known ones.
func (r *Registry) Get(name string) (Provider, error) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if p, ok := r.providers[name]; ok {
		return p, nil
	}
	return nil, fmt.Errorf("unknown storage provider %q (known: %v): %w", name, r.namesLocked(), errdefs.ErrInvalid)
}

// Names lists the registered providers, sorted.
func (r *Registry) Names() []string {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.namesLocked()
}

func (r *Registry) namesLocked() []string {
	names := make([]string, 0, len(r.providers))
	for n := range r.providers {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// HasRole reports whether p serves role.
func HasRole(p Provider, role Role) bool {
	for _, r := range p.Roles() {
		if r == role {
			return true
		}
	}
	return false
}
