package connector

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// standinScript is a STAND-IN for open-iscsi's iscsiadm, the one fake
// issue 13 allows: these machines have no iscsi_tcp module, so the real
// iscsiadm cannot log in here. It keeps a tiny target/node/session state in
// a directory, records every invocation (LC_ALL and argv) in $D/log, and
// answers with the output formats and exit codes of iscsiadm 2.1.8
// (include/iscsi_err.h: 4 connection failure, 12 driver not found, 15
// session exists, 20 iscsid not reachable, 21 no objects found, 22 sysfs
// lookup, 24 authorization failure). State files:
//
//	targets   "IP:PORT,TPGT IQN" lines discovery offers
//	luns      "IP:PORT IQN LUN sdX" lines: by-path links made at login
//	chap      "USER SECRET" the target demands at login
//	sessions  "SID IP:PORT,TPGT IQN" lines
//	nodes/    one record per IQN@PORTAL, "key = value" lines
//	appear_on_rescan, never_appear, refuse, iscsid_down, discovery_no_record: switches
const standinScript = `#!/bin/bash
# STAND-IN for iscsiadm (open-iscsi) written by a Stowage test; not the real tool.
D='@STATE@'
BYPATH='@BYPATH@'
echo "LC_ALL=${LC_ALL:-} $*" >> "$D/log"
mode= type= portal= iqn= sid= op= name= value= action= level=
while [ $# -gt 0 ]; do
	case "$1" in
	-m) mode=$2; shift ;;
	-t) type=$2; shift ;;
	-p) portal=$2; shift ;;
	-T) iqn=$2; shift ;;
	-r) sid=$2; shift ;;
	-o|--op) op=$2; shift ;;
	-n) name=$2; shift ;;
	-v) value=$2; shift ;;
	-P) level=$2; shift ;;
	--login|-l) action=login ;;
	--logout|-u) action=logout ;;
	--rescan|-R) action=rescan ;;
	*) echo "iscsiadm: unrecognized option '$1'" >&2; exit 7 ;;
	esac
	shift
done
commaportal=${portal%%:*},${portal##*:}
rec="$D/nodes/$iqn@$portal"
desc="[iface: default, target: $iqn, portal: $commaportal]"
links() { # make the by-path links of every LUN of $portal $iqn
	[ -e "$D/never_appear" ] && return
	while read -r p q lun disk; do
		[ "$p" = "$1" ] && [ "$q" = "$2" ] || continue
		touch "$D/dev/$disk"
		ln -sfn "$D/dev/$disk" "$BYPATH/ip-$p-iscsi-$q-lun-$lun"
	done < "$D/luns"
}
session_of() { grep -E "^[0-9]+ $1,[0-9]+ $2\$" "$D/sessions" 2>/dev/null | head -n1 | cut -d' ' -f1; }
down() {
	echo "iscsiadm: can not connect to iSCSI daemon (111)!" >&2
	echo "iscsiadm: Could not login to $desc." >&2
	echo "iscsiadm: initiator reported error (20 - could not connect to iscsid)" >&2
	echo "iscsiadm: Could not log into all portals" >&2
	exit 20
}
case "$mode" in
discovery)
	if [ -e "$D/iscsid_down" ]; then
		echo "iscsiadm: can not connect to iSCSI daemon (111)!" >&2
		echo "iscsiadm: Could not scan /sys/class/iscsi_transport." >&2
		echo "iscsiadm: iSCSI driver tcp is not loaded. Load the module then retry the command." >&2
		echo "iscsiadm: Could not perform SendTargets discovery: iSCSI driver not found. Please make sure it is loaded, and retry the operation" >&2
		exit 12
	fi
	if [ -e "$D/refuse" ]; then
		echo "iscsiadm: cannot make connection to ${portal%%:*}: Connection refused" >&2
		echo "iscsiadm: connection login retries (reopen_max) 5 exceeded" >&2
		echo "iscsiadm: Could not perform SendTargets discovery: encountered connection failure" >&2
		exit 4
	fi
	found=0
	while read -r pt q; do
		[ "${pt%%,*}" = "$portal" ] || continue
		found=1
		echo "$pt $q"
		r="$D/nodes/$q@$portal"
		[ -e "$D/discovery_no_record" ] || printf 'node.name = %s\nnode.startup = automatic\nnode.session.auth.authmethod = None\n' "$q" > "$r"
	done < "$D/targets"
	if [ $found = 0 ]; then echo "iscsiadm: No portals found" >&2; exit 21; fi
	;;
node)
	if [ "$op" = new ]; then
		printf 'node.name = %s\nnode.startup = automatic\nnode.session.auth.authmethod = None\n' "$iqn" > "$rec"
		echo "New iSCSI node [tcp:[hw=,ip=,net_if=,iscsi_if=default] $commaportal,-1 $iqn] added"
		exit 0
	fi
	s=$(session_of "$portal" "$iqn")
	case "$action" in
	login)
		[ -e "$rec" ] || { echo "iscsiadm: No records found" >&2; exit 21; }
		[ -e "$D/iscsid_down" ] && down
		if [ -n "$s" ]; then echo "iscsiadm: default: 1 session requested, but 1 already present." >&2; exit 15; fi
		echo "Logging in to $desc"
		if [ -e "$D/chap" ]; then
			read -r u pw < "$D/chap"
			if ! grep -qx "node.session.auth.authmethod = CHAP" "$rec" || ! grep -qxF "node.session.auth.username = $u" "$rec" || ! grep -qxF "node.session.auth.password = $pw" "$rec"; then
				echo "iscsiadm: Could not login to $desc." >&2
				echo "iscsiadm: initiator reported error (24 - iSCSI login failed due to authorization failure)" >&2
				echo "iscsiadm: Could not log into all portals" >&2
				exit 24
			fi
		fi
		n=$(cat "$D/nextsid" 2>/dev/null || echo 1)
		echo $((n + 1)) > "$D/nextsid"
		tp=$(grep -E "^$portal,[0-9]+ $iqn\$" "$D/targets" | head -n1 | cut -d' ' -f1)
		echo "$n ${tp:-$portal,1} $iqn" >> "$D/sessions"
		[ -e "$D/appear_on_rescan" ] || links "$portal" "$iqn"
		echo "Login to $desc successful."
		;;
	logout)
		if [ -z "$s" ]; then echo "iscsiadm: No matching sessions found" >&2; exit 21; fi
		echo "Logging out of session [sid: $s, target: $iqn, portal: $commaportal]"
		grep -v -E "^$s " "$D/sessions" > "$D/sessions.new"; mv "$D/sessions.new" "$D/sessions"
		rm -f "$BYPATH/ip-$portal-iscsi-$iqn-lun-"*
		echo "Logout of [sid: $s, target: $iqn, portal: $commaportal] successful."
		;;
	rescan)
		if [ -z "$s" ]; then echo "iscsiadm: No session found." >&2; exit 21; fi
		echo "Rescanning session [sid: $s, target: $iqn, portal: $commaportal]"
		links "$portal" "$iqn"
		;;
	*)
		[ -e "$rec" ] || { echo "iscsiadm: No records found" >&2; exit 21; }
		case "$op" in
		update)
			grep -v "^$name = " "$rec" > "$rec.new"; echo "$name = $value" >> "$rec.new"; mv "$rec.new" "$rec" ;;
		delete)
			rm -f "$rec" ;;
		"")
			echo "# BEGIN RECORD 2.1.8"; cat "$rec"; echo "# END RECORD" ;;
		esac
		;;
	esac
	;;
session)
	if [ -n "$sid" ]; then
		line=$(grep -E "^$sid " "$D/sessions" 2>/dev/null)
		if [ -z "$line" ]; then
			echo "iscsiadm: could not read session targetname: 5" >&2
			echo "iscsiadm: Could not get session info for sid $sid" >&2
			exit 22
		fi
		set -- $line
		p=${2%%,*}
		echo "Rescanning session [sid: $sid, target: $3, portal: ${p%%:*},${p##*:}]"
		links "$p" "$3"
		exit 0
	fi
	if [ ! -s "$D/sessions" ]; then echo "iscsiadm: No active sessions." >&2; exit 21; fi
	while read -r n pt q; do echo "tcp: [$n] $pt $q (non-flash)"; done < "$D/sessions"
	;;
*)
	echo "iscsiadm: stand-in does not implement mode '$mode'" >&2; exit 7 ;;
esac
`

// standin is a stand-in iscsiadm with its state, by-path, dev and sysfs
// directories.
type standin struct {
	t                          *testing.T
	bin, dir, bypath, dev, sys string
}

func newStandin(t *testing.T) *standin {
	t.Helper()
	root := t.TempDir()
	s := &standin{t: t, dir: filepath.Join(root, "state"), bypath: filepath.Join(root, "by-path"),
		dev: filepath.Join(root, "dev"), sys: filepath.Join(root, "sys")}
	for _, d := range []string{s.dir, filepath.Join(s.dir, "nodes"), filepath.Join(s.dir, "dev"), s.bypath, s.dev, s.sys} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{"targets", "luns", "sessions", "log"} {
		s.write(f, "")
	}
	s.bin = filepath.Join(root, "iscsiadm")
	if err := os.WriteFile(s.bin, []byte(strings.NewReplacer("@STATE@", s.dir, "@BYPATH@", s.bypath).Replace(standinScript)), 0o755); err != nil {
		t.Fatal(err)
	}
	return s
}

func (s *standin) write(name, content string) {
	s.t.Helper()
	if err := os.WriteFile(filepath.Join(s.dir, name), []byte(content), 0o644); err != nil {
		s.t.Fatal(err)
	}
}

func (s *standin) append(name, line string) {
	s.t.Helper()
	f, err := os.OpenFile(filepath.Join(s.dir, name), os.O_APPEND|os.O_WRONLY|os.O_CREATE, 0o644)
	if err != nil {
		s.t.Fatal(err)
	}
	defer f.Close()
	fmt.Fprintln(f, line)
}

// lun offers target iqn at portal with a LUN backed by disk (sdX) of
// size bytes in the stand-in sysfs.
func (s *standin) lun(portal, iqn string, lun int, disk string, size int64) {
	s.t.Helper()
	if !strings.Contains(s.read("targets"), portal+",1 "+iqn+"\n") {
		s.append("targets", portal+",1 "+iqn)
	}
	s.append("luns", fmt.Sprintf("%s %s %d %s", portal, iqn, lun, disk))
	dev := filepath.Join(s.sys, "block", disk, "device")
	if err := os.MkdirAll(dev, 0o755); err != nil {
		s.t.Fatal(err)
	}
	for _, f := range []string{"delete", "rescan"} {
		if err := os.WriteFile(filepath.Join(dev, f), nil, 0o644); err != nil {
			s.t.Fatal(err)
		}
	}
	s.setSize(disk, size)
}

func (s *standin) setSize(disk string, size int64) {
	s.t.Helper()
	if err := os.WriteFile(filepath.Join(s.sys, "block", disk, "size"), []byte(fmt.Sprintf("%d\n", size/512)), 0o644); err != nil {
		s.t.Fatal(err)
	}
}

func (s *standin) read(name string) string {
	s.t.Helper()
	b, err := os.ReadFile(filepath.Join(s.dir, name))
	if err != nil && !os.IsNotExist(err) {
		s.t.Fatal(err)
	}
	return string(b)
}

// calls returns the recorded invocations since the last call, checking
// that each ran with LC_ALL=C.
func (s *standin) calls() []string {
	s.t.Helper()
	var out []string
	for _, l := range strings.Split(strings.TrimSpace(s.read("log")), "\n") {
		if l == "" {
			continue
		}
		rest, ok := strings.CutPrefix(l, "LC_ALL=C ")
		if !ok {
			s.t.Errorf("iscsiadm ran without LC_ALL=C: %q", l)
		}
		out = append(out, rest)
	}
	s.write("log", "")
	return out
}

func (s *standin) connector(opts ...Option) *Connector {
	base := []Option{WithIscsiadm(s.bin), WithByPathDir(s.bypath), WithSysfs(s.sys), WithDevDir(s.dev),
		WithDeviceTimeout(2*time.Second, 5*time.Millisecond), WithMultipath(false), WithModprobe("")}
	return New(append(base, opts...)...)
}
