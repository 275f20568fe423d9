// Package tgt manages iSCSI targets and LUNs on the host it runs on through
// the Linux SCSI target framework's userspace daemon, tgtd, and its
// administration tool, tgtadm (Debian package tgt). One target per store,
// one LUN per volume, each LUN backed by a file or a block device on this
// host.
//
// LUNManager is the seam: the operations a store needs from whatever makes
// LUNs. *Manager implements it with tgtadm; a vendor array (LIO/targetcli,
// a REST-managed SAN) is another implementation of the same interface.
//
//	m := tgt.New(tgt.WithControlPort(7), tgt.WithLogger(log))
//	if err := m.EnsureTarget(ctx, "iqn.2026-12.io.stowage:store1"); err != nil { ... }
//	n, err := m.AddLUN(ctx, "iqn.2026-12.io.stowage:store1", "/srv/iscsi/v1.raw")
//	err = m.Allow(ctx, "iqn.2026-12.io.stowage:store1", "iqn.1993-08.org.debian:01:host1")
//	err = m.SetCHAP(ctx, "iqn.2026-12.io.stowage:store1", "host1", secret)
//	// initiators now reach iscsi://<portal>/iqn.2026-12.io.stowage:store1/<n>
//
// Every operation is idempotent: creating what exists returns it, removing
// what is missing succeeds. Targets are named by IQN; tgt's numeric target
// ids (tid) stay inside this package. LUNs are named by their backing path;
// their numbers are what initiators address.
//
// State lives in tgtd only (tgtadm changes are not persistent across a
// tgtd restart); the caller re-applies its desired state after one.
//
// Secrets: tgtadm takes a CHAP password only as a command-line argument
// (--password), so while SetCHAP's tgtadm runs, the secret is readable in
// /proc/<pid>/cmdline by local users of this host. There is no other way to
// give tgtadm an account. The package keeps it out of logs and error
// messages; hosts that must not expose it even briefly should use a
// LUNManager that talks to its target over an API instead.
//
// Errors are classed with errdefs from tgtadm's messages: "can't find ..."
// is ErrNotFound, "... already exists" ErrAlreadyExists, a tgtd that does
// not answer on its control socket ErrUnavailable.
package tgt
