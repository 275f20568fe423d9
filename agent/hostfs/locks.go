package hostfs

import (
	"context"
	"fmt"
	"sort"
	"sync"
)

// keyedLocks serialises steps on the same object path (per-key, never one
// global lock): two fetches into one destination, or a snapshot and a
// revert of one volume, run one after the other. Waiting honours ctx.
type keyedLocks struct {
	mu   sync.Mutex
	held map[string]chan struct{} // closed when released
}

// lock takes the locks of keys (in sorted order, so two steps locking the
// same pair cannot deadlock) and returns the function that releases them.
func (k *keyedLocks) lock(ctx context.Context, keys ...string) (func(), error) {
	keys = append([]string(nil), keys...)
	sort.Strings(keys)
	var got []string
	release := func() {
		k.mu.Lock()
		for _, key := range got {
			close(k.held[key])
			delete(k.held, key)
		}
		k.mu.Unlock()
	}
	for i, key := range keys {
		if i > 0 && keys[i-1] == key {
			continue
		}
		for {
			k.mu.Lock()
			if k.held == nil {
				k.held = map[string]chan struct{}{}
			}
			wait, busy := k.held[key]
			if !busy {
				k.held[key] = make(chan struct{})
				k.mu.Unlock()
				got = append(got, key)
				break
			}
			k.mu.Unlock()
			select {
			case <-wait:
			case <-ctx.Done():
				release()
				return nil, fmt.Errorf("waiting for another step on %s: %w", key, ctx.Err())
			}
		}
	}
	return release, nil
}

// tryLock takes key's lock if it is free.
func (k *keyedLocks) tryLock(key string) (func(), bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.held == nil {
		k.held = map[string]chan struct{}{}
	}
	if _, busy := k.held[key]; busy {
		return nil, false
	}
	ch := make(chan struct{})
	k.held[key] = ch
	return func() {
		k.mu.Lock()
		close(ch)
		delete(k.held, key)
		k.mu.Unlock()
	}, true
}
