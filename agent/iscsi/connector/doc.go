// Package connector attaches iSCSI LUNs to this host through the kernel
// initiator (open-iscsi's iscsiadm and iscsid), in the order OpenStack
// os-brick's ISCSIConnector does, so that every step is safe to repeat
// after a crash:
//
//	Connect:    iscsiadm -m discovery -t sendtargets -p PORTAL   (the IQN must be offered)
//	            iscsiadm -m node -T IQN -p PORTAL                (show; --op new when exit 21)
//	            iscsiadm -m node -T IQN -p PORTAL --op update -n node.session.auth.{authmethod,username,password} -v …
//	            iscsiadm -m node -T IQN -p PORTAL --op update -n node.startup -v manual
//	            iscsiadm -m session                              (reuse a session to PORTAL+IQN)
//	            iscsiadm -m node -T IQN -p PORTAL --login        (exit 15, session exists, is success)
//	            wait for /dev/disk/by-path/ip-PORTAL-iscsi-IQN-lun-N, with one
//	            iscsiadm -m session -r SID --rescan half way through the wait,
//	            then the dm device holding the disk when multipathd runs.
//	Rescan:     iscsiadm -m node -T IQN -p PORTAL -R, /sys/block/sdX/device/rescan, size from sysfs.
//	Disconnect: flush and delete the SCSI device (/sys/block/sdX/device/delete),
//	            then, only when no other LUN of the target is in use on the host,
//	            iscsiadm … --logout and iscsiadm … --op delete. Missing is success.
//	Adopt:      iscsiadm -m session at agent start (exit 21: none).
//
// Every iscsiadm call goes through one runner (context, bounded time,
// LC_ALL=C, stderr captured, CHAP secrets redacted) and iscsiadm's exit
// codes (open-iscsi include/iscsi_err.h) become errdefs classes there.
// Available says whether the kernel path can work on this host at all (it
// cannot where the iscsi_tcp module is missing; the agent then reports only
// the userspace libiscsi path as its capability).
package connector
