//go:build ceph

// Package rbd is the Ceph RBD provider: a primary store is a Ceph pool
// (rbd://POOL?mon_host=HOST:PORT&id=USER, the cephx key in the keyring
// file the store's details name), its volumes and templates are RBD
// images, snapshots are RBD snapshots (rollback to revert), and a volume
// from a template cached in the pool is an RBD clone of the template's
// protected snapshot: no byte copied.
//
// The control operations (create, delete, resize, snapshot, clone, stat,
// pool capacity) run where the provider runs, the controller, through
// librbd and librados (github.com/ceph/go-ceph, cgo), as Cinder's RBD
// driver does; the controller needs the monitors' addresses and a key.
// Hypervisors open a volume as rbd:POOL/IMAGE (qemu's rbd driver).
//
// Built with -tags ceph (and pacific for Debian 12's Ceph 16.2 librbd):
// a binary built without it has no rbd provider. Not done yet (Stowage
// issue 18): moving bytes into and out of a pool (template import through
// librbd, copies to and from other stores, NBD access for hosts without
// librbd), backups by rbd diff.
package rbd
