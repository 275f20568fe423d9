// Package filesystem is the "filesystem" storage provider: primary and
// image stores on a directory that the hosts in the store's scope see at
// the same path — a local disk for a host-scoped store, or an NFS (or any
// shared) export that the operator mounted on every host of the scope.
//
// The store URL is file:///absolute/path; after Initialize, Details["path"]
// is that directory (only this provider reads it: HostRoot returns it, so an
// agent knows which directory serves the store). The provider never touches
// a host itself: every step goes through hostops, addressed as
// hostops.Ref{Store: <store id>, Key: <key>}, on a host the
// hostops.Selector picks in the store's scope.
//
// # Layout and keys
//
// A key is the object's path relative to the store directory. Locate
// derives it from the object's type, id and format without any I/O; the
// controller records it on the object's record, and every later call uses
// the recorded key (checked to lie in the layout below), so a key written by
// an older release stays valid even when Locate would now choose another.
//
//	<store dir>/
//	├── .stowage-store                      marker naming the store id (the agent's)
//	├── volumes/<volume id>.<raw|qcow2>      primary only
//	├── templates/<template id>.<raw|qcow2|iso>  image; primary: the template spool
//	├── snapshots/
//	│   ├── <snapshot id>.<raw|qcow2>        primary: new snapshots (format of the volume)
//	│   ├── <volume id>/<snapshot id>.<ext>  primary: older snapshots, by recorded key only
//	│   ├── chunks/<hh>/<sha256>             image: backup chunks (datapath/chunkstore)
//	│   └── manifests/<snapshot id>.manifest.json  image: one manifest per backup
//	└── tmp/                                 files being written; never listed
//
// A snapshot's DataObject does not carry its volume's id, so Locate puts
// new snapshots at snapshots/<snapshot id>.<ext>; snapshots taken before
// that live at snapshots/<volume id>/<snapshot id>.<ext>, which their
// records name, and ListObjects still lists them.
//
// # Access
//
// GrantAccess hands out, per Client.Purpose:
//
//	purpose  client host in the store's scope     client host outside it
//	attach   file://<dir>/<key>                   nbd:// export from an Up host in scope
//	                                               (read-write for a volume, else read-only)
//	read     store://<store id>/<key>             http:// export from an Up host in scope,
//	                                               nbd:// read-only with Transport "nbd"
//	write    store://<store id>/<key>             refused: errdefs.ErrFailedPrecondition
//
// Exports are Revocable and name the host that serves them (Access.HostID);
// RevokeAccess ends them there. Client.Transport picks among the forms a
// purpose allows: "file" (attach, in scope), "store" (read and write, in
// scope), "http" (read) and "nbd" (attach and read) — the last two export
// from a host in scope even for a client in scope. A form the purpose or the
// client's place does not allow is errdefs.ErrFailedPrecondition.
//
// # Capabilities
//
// The Driver is a drivers.PrimaryDriver (snapshots through the host's
// qcow2-external, reflink or copy snapshots) and implements Resizer,
// Cloner, Importer, Rebaser and ChunkTarget; the Provider implements
// HostRooted. CanCopy is true only inside one store whose filesystem shares
// extents (Details["reflink"] == "true", as the host saw at Initialize) for
// a copy that keeps the format: Copy is then a reflink clone on a host in
// scope. Every other copy is the controller's generic data motion (a
// store:// source on a host that reaches both stores, or an export).
//
// Backups (ChunkTarget) live on image stores: BackupAccess gives a host in
// scope the chunk store store://<store id>/snapshots, in which the agent
// keeps chunks under chunks/ and manifests under manifests/.
package filesystem
