package main

import (
	"errors"
	"fmt"
	"os/user"
	"strconv"
	"syscall"

	"github.com/stowage/stowage/errdefs"
)

// privateUmask is the umask of the processes that write tenant data (the
// agent, the template cache, dev): volumes, snapshots, chunks and
// templates are created 0640 or tighter and directories 0750, by the
// process itself and by the qemu-img it runs (children inherit it).
const privateUmask = 0o027

// privateFiles sets privateUmask for this process.
func privateFiles() { syscall.Umask(privateUmask) }

// lookupOwner resolves a user and a group (names or numeric ids).
func lookupOwner(owner, group string) (uid, gid uint32, err error) {
	if uid, err = lookupID(owner, func(n string) (string, error) {
		u, err := user.Lookup(n)
		if err != nil {
			return "", err
		}
		return u.Uid, nil
	}); err != nil {
		return 0, 0, fmt.Errorf("--owner %q: %w", owner, err)
	}
	if gid, err = lookupID(group, func(n string) (string, error) {
		g, err := user.LookupGroup(n)
		if err != nil {
			return "", err
		}
		return g.Gid, nil
	}); err != nil {
		return 0, 0, fmt.Errorf("--group %q: %w", group, err)
	}
	return uid, gid, nil
}

func lookupID(name string, lookup func(string) (string, error)) (uint32, error) {
	if name == "" {
		return 0, nil
	}
	if n, err := strconv.ParseUint(name, 10, 32); err == nil {
		return uint32(n), nil
	}
	id, err := lookup(name)
	if err != nil {
		return 0, errors.Join(err, errdefs.ErrInvalid)
	}
	n, err := strconv.ParseUint(id, 10, 32)
	if err != nil {
		return 0, errors.Join(err, errdefs.ErrInvalid)
	}
	return uint32(n), nil
}
