// Package iscsi is the provider of primary stores on an iSCSI target: a
// store is one target of a LUN manager (tgtd, managed by the agent of the
// store's target host), and every volume or snapshot is one LUN backed by
// a file of the store's directory on that host.
//
// A store is added as
//
//	stowage store add --name san1 --role primary --provider iscsi \
//	    --url iscsi://10.0.0.5:3260/iqn.2026-12.org.example:san1 --scope zone1 \
//	    --details target_host=tgt-host-1,backing_dir=/srv/stowage/san1
//
// The target host's agent runs with --iscsi-target (it manages tgtd) and
// serves backing_dir beneath its --store-roots. Hosts in the store's scope
// reach LUNs through the userspace initiator (libiscsi in qemu-img), so
// hosts without the iscsi_tcp kernel module work too.
//
// Access: each host in scope gets an initiator name derived from its id
// (InitiatorName) allowed by the target's ACL, and a CHAP account whose
// secret is derived from the controller's CHAP key (WithCHAPKey), the
// store and the host (HMAC-SHA256): nothing secret is stored in the
// store's record, and a host's secret opens that store only. A grant is an
// iscsi://user%secret@portal/iqn/lun URI for that host (the API redacts
// the secret in replies).
//
// Leaving the scope: the LifeCycle is a drivers.ScopeReconciler. The
// controller hands it every registered host in the store's scope at start
// and whenever a host joins or re-registers in another zone or cluster;
// the target host's agent then makes the target admit exactly those
// (EnsureTarget with Exact): any other initiator loses its ACL entry and
// its CHAP account's binding, and its sessions are logged out (tgtadm
// --op delete --mode conn). tgt answers a login from an initiator its ACL
// does not admit with "Target not found" (status 0x0203).
//
// What a LUN manager cannot do is declared, not faked: volumes are raw
// (VolumeFormats); clones and snapshots are full copies through the
// userspace initiator (tgt has no snapshots); nothing is copied natively
// (CanCopy is false), so data moves through the generic motion path.
package iscsi
