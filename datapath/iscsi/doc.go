// Package iscsi reaches iSCSI LUNs from userspace, through libiscsi inside
// qemu-img (Debian qemu-block-extra), so that copies into and out of LUNs
// run on hosts without the kernel initiator (no iscsi_tcp module, as in
// most containers).
//
//	dst, err := iscsi.ParseURL("iscsi://host1@10.0.0.5:3260/iqn.2026-12.io.stowage:store1/3")
//	dst.Secret = secret // from the secret store, never in the URL
//	dst.Initiator = "iqn.2026-12.io.stowage:host1"
//	err = iscsi.Write(ctx, "/var/cache/t.qcow2", "qcow2", dst, progress, iscsi.TargetIsZero())
//	err = iscsi.Compare(ctx, dst, "/var/cache/t.qcow2", "qcow2")
//
// # Secrets
//
// The CHAP secret never appears in a URL or an argv: qemu-img prints the
// URL it opened (a json: filename) and any local user can read
// /proc/<pid>/cmdline. The secret goes to qemu-img as a secret object read
// from a 0600 temporary file (--object secret,id=…,file=…), which the LUN's
// options name (file.password-secret=…); SecretArgs writes that file.
// Target.String and every error leave the secret out.
//
// # Sparseness
//
// Write copies with zero detection (-S 4k) and, unless the LUN is known
// to read as zeros (TargetIsZero, right for a freshly created sparse
// backing), lets qemu-img zero the rest with WRITE SAME/UNMAP: on a target
// that advertises thin provisioning (tgt with thin_provisioning=1, as
// agent/iscsi/tgt sets up LUNs) that punches holes, so in both cases the
// backing allocates only the source's data.
//
// Errors: a failed CHAP login is errdefs.ErrUnauthenticated, a target that
// is missing or refuses the initiator and a missing LUN errdefs.ErrNotFound,
// a portal that does not answer errdefs.ErrUnavailable.
package iscsi
