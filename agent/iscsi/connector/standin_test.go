package connector

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stowage/stowage/errdefs"
)

// standIn is a stand-in iscsiadm (the one fake issue 13 allows: this
// machine has no iscsi_tcp module, so the real iscsiadm cannot log in). It
// records every invocation and answers with open-iscsi's output formats and
// exit codes, keeping its state (targets, node records, sessions) in a
// directory; a login makes the by-path links of the LUNs listed in
// state/luns point at fake disks, as udev would.
const standIn = `#!/bin/bash
S=%[1]q; BYPATH=%[2]q; DEV=%[3]q
echo "$*" >>"$S/calls"
mode= op= target= portal= name= value= login= logout= rescan=
while [ $# -gt 0 ]; do
  case $1 in
    -m) mode=$2; shift;; -T) target=$2; shift;; -p) portal=$2; shift;; --op) op=$2; shift;;
    -n) name=$2; shift;; -v) value=$2; shift;; --login) login=1;; --logout) logout=1;; --rescan) rescan=1;;
    -t|-r) shift;;
  esac
  shift
done
case $mode in
discovery)
  if [ -e "$S/down" ]; then echo "iscsiadm: cannot make connection to $portal: Connection refused" >&2; exit 4; fi
  while read -r t; do echo "$portal,1 $t"; done <"$S/targets"; exit 0;;
session)
  if [ -n "$rescan" ]; then exit 0; fi
  if [ ! -s "$S/sessions" ]; then echo "iscsiadm: No active sessions." >&2; exit 21; fi
  cat "$S/sessions"; exit 0;;
node)
  rec="$S/node-$target"
  if [ "$op" = new ]; then echo "New iSCSI node [tcp:[hw=,ip=,net_if=,iscsi_if=default] $portal,-1 $target] added"; : >>"$rec"; exit 0; fi
  if [ "$op" = update ]; then echo "$name=$value" >>"$rec"; exit 0; fi
  if [ "$op" = delete ]; then [ -e "$rec" ] || { echo "iscsiadm: No records found" >&2; exit 21; }; rm -f "$rec"; exit 0; fi
  if [ -n "$login" ]; then
    if grep -q "$target" "$S/sessions" 2>/dev/null; then echo "iscsiadm: default: 1 session requested, but 1 already present." >&2; exit 15; fi
    pw=$(grep '^node.session.auth.password=' "$rec" | tail -1 | cut -d= -f2-)
    if [ "$pw" != "$(cat "$S/secret")" ]; then
      echo "iscsiadm: Could not login to [iface: default, target: $target, portal: $portal]." >&2
      echo "iscsiadm: initiator reported error (24 - iSCSI login failed due to authorization failure)" >&2
      echo "iscsiadm: Could not log into all portals" >&2; exit 24
    fi
    echo "tcp: [1] $portal,1 $target (non-flash)" >>"$S/sessions"
    if [ ! -e "$S/nolink" ]; then
      for l in $(cat "$S/luns"); do ln -sf "$DEV/sd$l" "$BYPATH/ip-$portal-iscsi-$target-lun-$l"; done
    fi
    echo "Logging in to [iface: default, target: $target, portal: $portal] (multiple)"
    echo "Login to [iface: default, target: $target, portal: $portal] successful."; exit 0
  fi
  if [ -n "$logout" ]; then
    grep -q "$target" "$S/sessions" 2>/dev/null || { echo "iscsiadm: No matching sessions found" >&2; exit 21; }
    : >"$S/sessions"
    echo "Logout of [sid: 1, target: $target, portal: $portal] successful."; exit 0
  fi;;
esac
echo "iscsiadm: unsupported call" >&2; exit 7
`

const (
	iqn    = "iqn.2026-12.org.stowage.test:san1"
	portal = "127.0.0.1:3260"
	secret = "chap-secret-0123"
)

type rig struct {
	c                         *Connector
	state, byPath, dev, sysfs string
}

func newRig(t *testing.T, opts ...Option) *rig {
	t.Helper()
	d := t.TempDir()
	r := &rig{state: filepath.Join(d, "state"), byPath: filepath.Join(d, "by-path"), dev: filepath.Join(d, "dev"), sysfs: filepath.Join(d, "sys")}
	for _, dir := range []string{r.state, r.byPath, r.dev} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, l := range []string{"1", "2"} {
		dev := filepath.Join(r.dev, "sd"+l)
		if err := os.WriteFile(dev, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(filepath.Join(r.sysfs, "block", "sd"+l, "device"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(r.sysfs, "block", "sd"+l, "device", "delete"), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write := func(name, s string) {
		if err := os.WriteFile(filepath.Join(r.state, name), []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("targets", iqn+"\n")
	write("secret", secret)
	write("luns", "1")
	bin := filepath.Join(d, "iscsiadm")
	if err := os.WriteFile(bin, []byte(fmt.Sprintf(standIn, r.state, r.byPath, r.dev)), 0o755); err != nil {
		t.Fatal(err)
	}
	r.c = New(append([]Option{WithISCSIAdm(bin), WithByPath(r.byPath), WithSysfs(r.sysfs), WithTimeout(2 * time.Second), WithMultipath(false)}, opts...)...)
	return r
}

func (r *rig) calls(t *testing.T) []string {
	t.Helper()
	b, _ := os.ReadFile(filepath.Join(r.state, "calls"))
	return strings.Split(strings.TrimSpace(string(b)), "\n")
}

func (r *rig) reset(t *testing.T) { _ = os.Remove(filepath.Join(r.state, "calls")) }

func grant(lun int, pw string) string {
	return fmt.Sprintf("iscsi://stw-1:%s@%s/%s/%d?initiator=iqn.2026-12.org.stowage%%3Ahost.h1", pw, portal, iqn, lun)
}

func TestConnectSequenceReuseAndDisconnect(t *testing.T) {
	ctx := context.Background()
	r := newRig(t)
	if err := os.WriteFile(filepath.Join(r.state, "luns"), []byte("1 2"), 0o600); err != nil {
		t.Fatal(err)
	}
	dev, err := r.c.Connect(ctx, grant(1, secret))
	if err != nil || dev != filepath.Join(r.dev, "sd1") {
		t.Fatalf("connect: %q %v", dev, err)
	}
	want := []string{
		"-m discovery -t sendtargets -p " + portal,
		"-m node -T " + iqn + " -p " + portal + " --op new",
		"-m node -T " + iqn + " -p " + portal + " --op update -n node.startup -v manual",
		"-m node -T " + iqn + " -p " + portal + " --op update -n node.session.scan -v manual",
		"-m node -T " + iqn + " -p " + portal + " --op update -n iface.initiatorname -v iqn.2026-12.org.stowage:host.h1",
		"-m node -T " + iqn + " -p " + portal + " --op update -n node.session.auth.authmethod -v CHAP",
		"-m node -T " + iqn + " -p " + portal + " --op update -n node.session.auth.username -v stw-1",
		"-m node -T " + iqn + " -p " + portal + " --op update -n node.session.auth.password -v " + secret,
		"-m session",
		"-m node -T " + iqn + " -p " + portal + " --login",
	}
	if got := r.calls(t); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("iscsiadm calls:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}

	// A second LUN of the same target: the session is reused, not logged in again.
	r.reset(t)
	if dev, err := r.c.Connect(ctx, grant(2, secret)); err != nil || dev != filepath.Join(r.dev, "sd2") {
		t.Fatalf("connect LUN 2: %q %v", dev, err)
	}
	calls := strings.Join(r.calls(t), "\n")
	if strings.Contains(calls, "--login") || !strings.Contains(calls, "-m session -r 1 --rescan") {
		t.Fatalf("second LUN: %s", calls)
	}
	ss, err := r.c.Sessions(ctx)
	if err != nil || len(ss) != 1 || ss[0] != (Session{ID: 1, Portal: portal, IQN: iqn}) {
		t.Fatalf("sessions (what the agent adopts at start): %+v %v", ss, err)
	}

	// Disconnecting LUN 1 while LUN 2 is in use keeps the session.
	r.reset(t)
	if err := r.c.Disconnect(ctx, grant(1, secret)); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(r.sysfs, "block", "sd1", "device", "delete")); string(b) != "1" {
		t.Fatalf("the SCSI device of LUN 1 was not removed: %q", b)
	}
	if calls := strings.Join(r.calls(t), "\n"); strings.Contains(calls, "--logout") {
		t.Fatalf("logged out while LUN 2 is in use: %s", calls)
	}
	// The last LUN: logout and the node record goes.
	r.reset(t)
	if err := r.c.Disconnect(ctx, grant(2, secret)); err != nil {
		t.Fatal(err)
	}
	calls = strings.Join(r.calls(t), "\n")
	if !strings.Contains(calls, "--logout") || !strings.Contains(calls, "--op delete") {
		t.Fatalf("last LUN: %s", calls)
	}
	// Again: nothing connected, still success.
	if err := r.c.Disconnect(ctx, grant(2, secret)); err != nil {
		t.Fatalf("disconnect twice: %v", err)
	}
}

func TestConnectErrors(t *testing.T) {
	ctx := context.Background()
	r := newRig(t)
	_, err := r.c.Connect(ctx, grant(1, "wrong-secret-000"))
	if !errors.Is(err, errdefs.ErrUnauthenticated) || !strings.Contains(err.Error(), "CHAP") || strings.Contains(err.Error(), "wrong-secret-000") {
		t.Fatalf("wrong CHAP secret: %v", err)
	}
	if links, _ := filepath.Glob(filepath.Join(r.byPath, "*")); len(links) != 0 {
		t.Fatalf("a failed login left devices: %v", links)
	}
	if err := os.WriteFile(filepath.Join(r.state, "down"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := r.c.Connect(ctx, grant(1, secret)); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("portal down: %v", err)
	}
	_ = os.Remove(filepath.Join(r.state, "down"))
	other := strings.Replace(grant(1, secret), iqn, "iqn.2026-12.org.stowage.test:other", 1)
	if _, err := r.c.Connect(ctx, other); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("a target discovery does not offer: %v", err)
	}
	// Logged in, but the device never appears: a bounded wait, one rescan.
	if err := os.WriteFile(filepath.Join(r.state, "nolink"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	r.c.timeout = 300 * time.Millisecond
	r.reset(t)
	if _, err := r.c.Connect(ctx, grant(1, secret)); !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "no device") {
		t.Fatalf("no device: %v", err)
	}
	if calls := strings.Join(r.calls(t), "\n"); !strings.Contains(calls, "--rescan") {
		t.Fatalf("no rescan while waiting: %s", calls)
	}
}

func TestMultipathAndAvailability(t *testing.T) {
	ctx := context.Background()
	r := newRig(t, WithMultipath(true))
	if err := os.MkdirAll(filepath.Join(r.sysfs, "block", "sd1", "holders", "dm-3"), 0o755); err != nil {
		t.Fatal(err)
	}
	if dev, err := r.c.Connect(ctx, grant(1, secret)); err != nil || dev != "/dev/dm-3" {
		t.Fatalf("multipath: %q %v", dev, err)
	}
	if ok, why := r.c.Available(ctx); ok || !strings.Contains(why, "iscsi_tcp") {
		t.Fatalf("available with no iscsi_tcp in sysfs: %v %q", ok, why)
	}
}

// TestRealISCSIAdm runs the real open-iscsi where the kernel initiator can
// work; on machines without the iscsi_tcp module it cannot.
func TestRealISCSIAdm(t *testing.T) {
	c := New()
	if ok, why := c.Available(context.Background()); !ok {
		t.Skipf("kernel iSCSI initiator unavailable here: %s", why)
	}
	if _, err := c.Sessions(context.Background()); err != nil {
		t.Fatalf("sessions: %v", err)
	}
}
