//go:build ceph

// Package rbd is the Ceph RBD provider: a primary store is a Ceph pool
// (rbd://POOL?mon_host=HOST:PORT&id=USER, the cephx key in the keyring
// file the store's details name), its volumes and templates are RBD
// images, snapshots are RBD snapshots (rollback to revert), and a volume
// from a template cached in the pool is an RBD clone of the template's
// protected snapshot: no byte copied. So is a volume made from a snapshot
// of the pool (Copy, native: CanCopy); deleting a snapshot flattens its
// clones first.
//
// The control operations (create, delete, resize, snapshot, clone, stat,
// diff, pool capacity) run where the provider runs, the controller,
// through librbd and librados (github.com/ceph/go-ceph, cgo), as Cinder's
// RBD driver does; the controller needs the monitors' addresses and a key.
// Bytes move through agents: GrantAccess has an agent whose
// qemu-storage-daemon has qemu's rbd driver (capability rbd_export) serve
// the image, or a snapshot of it, over NBD, and the data motion reads and
// writes that export as any other URI (copies to and from other stores,
// templates cached in the pool, backups; Changed gives an incremental
// backup the ranges rbd diff names). Hypervisors with librbd open a volume
// as rbd:POOL/IMAGE; others get an NBD export.
//
// Built with -tags ceph (and pacific for Debian 12's Ceph 16.2 librbd):
// a binary built without it has no rbd provider.
package rbd
