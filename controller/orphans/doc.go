// Package orphans finds what the stores hold that no record accounts for,
// and removes it: an object file or LUN that no volume, snapshot or
// template copy points to (a crash between a step's work and its record,
// or an operator's stray file of Stowage's layout), the chunks no backup's
// manifest uses (a backup that died before its manifest), and the exports
// on agents that no volume, template mount or running job holds (a
// controller that died mid-copy).
//
// Everything it asks goes through the stores' drivers (ListObjects,
// Delete, ChunkCollector, GrantLister, RevokeAccess): a new kind of
// storage brings its own listing, never a special case here.
//
// It is conservative by construction. Objects are listed before records
// are read, and the controller records an object's key before any work
// makes it (drivers.Driver.Locate), so an object listed without a record
// either never had one or lost it. An object (or grant) is removed only
// when it has been seen orphaned for the grace period, when its own
// modification time (if the driver knows it) is older than that, and when
// no unfinished job targets it or the records next to its target. A store
// that is not Up is left alone.
package orphans
