package connector

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stowage/stowage/errdefs"
)

const (
	portal = "10.0.0.5:3260"
	iqn    = "iqn.2026-01.org.stowage:store1"
	secret = "Sup3rS3cretChap!"
)

func chapTarget(lun int) Target {
	return Target{Portal: portal, IQN: iqn, LUN: lun, CHAPUser: "host1", CHAPSecret: secret}
}

func node(extra ...string) string {
	return strings.Join(append([]string{"-m node -T", iqn, "-p", portal}, extra...), " ")
}

func assertCalls(t *testing.T, got []string, want ...string) {
	t.Helper()
	if !slices.Equal(got, want) {
		t.Fatalf("iscsiadm calls:\n got  %q\n want %q", got, want)
	}
}

func TestConnectCHAPSequenceAndReuse(t *testing.T) {
	s := newStandin(t)
	s.lun(portal, iqn, 1, "sdb", 1<<30)
	s.write("chap", "host1 "+secret+"\n")
	var logs bytes.Buffer
	c := s.connector(WithLogger(slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))))
	ctx := context.Background()
	defer func() {
		if strings.Contains(logs.String(), secret) || !strings.Contains(logs.String(), "REDACTED") {
			t.Errorf("logs show the CHAP secret or no redacted argv:\n%s", logs.String())
		}
	}()

	dev, err := c.Connect(ctx, chapTarget(1))
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(s.dir, "dev", "sdb"); dev.Path != want || dev.Disk != want || dev.Multipath || dev.SessionID != 1 {
		t.Fatalf("device %+v, want %s in session 1", dev, want)
	}
	assertCalls(t, s.calls(),
		"-m discovery -t sendtargets -p "+portal,
		node(),
		node("--op update -n node.session.auth.authmethod -v CHAP"),
		node("--op update -n node.session.auth.username -v host1"),
		node("--op update -n node.session.auth.password -v "+secret),
		node("--op update -n node.startup -v manual"),
		"-m session",
		node("--login"),
		"-m session",
	)

	// Again: the session is reused, no second login.
	dev2, err := c.Connect(ctx, chapTarget(1))
	if err != nil || dev2 != dev {
		t.Fatalf("second connect: %+v, %v; want %+v", dev2, err, dev)
	}
	calls := s.calls()
	if slices.Contains(calls, node("--login")) {
		t.Fatalf("second connect logged in again: %q", calls)
	}
	if calls[len(calls)-1] != "-m session" {
		t.Fatalf("second connect did not look up the session last: %q", calls)
	}
}

func TestConnectNodeNewWhenDiscoveryMadeNone(t *testing.T) {
	s := newStandin(t)
	s.lun(portal, iqn, 0, "sdc", 1<<20)
	s.write("discovery_no_record", "") // as with -o nonpersistent, or a record deleted since
	c := s.connector()
	ctx := context.Background()
	if _, err := c.Connect(ctx, Target{Portal: portal, IQN: iqn, LUN: 0}); err != nil {
		t.Fatal(err)
	}
	assertCalls(t, s.calls(),
		"-m discovery -t sendtargets -p "+portal,
		node(),
		node("--op new"),
		node("--op update -n node.startup -v manual"),
		"-m session",
		node("--login"),
		"-m session",
	)

	s.write("targets", "") // the target is gone from the portal
	_, err := c.Connect(ctx, Target{Portal: portal, IQN: iqn, LUN: 0})
	if !errdefs.IsNotFound(err) || !strings.Contains(err.Error(), "offers no targets") {
		t.Fatalf("target gone from discovery: %v, want not found", err)
	}
}

func TestConnectSessionExistsIsSuccess(t *testing.T) {
	s := newStandin(t)
	s.lun(portal, iqn, 1, "sdb", 1<<30)
	c := s.connector()
	ctx := context.Background()
	tg := Target{Portal: portal, IQN: iqn, LUN: 1}
	// Another initiator tool logged in between our session list and our
	// login: exit 15 counts as success.
	if err := c.login(ctx, tg); err == nil {
		t.Fatal("login without a node record succeeded")
	} else if !errdefs.IsNotFound(err) {
		t.Fatalf("login without a node record: %v, want not found (exit 21)", err)
	}
	if _, err := c.Connect(ctx, tg); err != nil {
		t.Fatal(err)
	}
	s.calls()
	if err := c.login(ctx, tg); err != nil {
		t.Fatalf("login to a logged-in target (exit 15): %v", err)
	}
	assertCalls(t, s.calls(), node("--login"))
}

func TestConnectWrongCHAP(t *testing.T) {
	s := newStandin(t)
	s.lun(portal, iqn, 1, "sdb", 1<<30)
	s.write("chap", "host1 theRightOne\n")
	c := s.connector()
	_, err := c.Connect(context.Background(), chapTarget(1))
	if !errors.Is(err, errdefs.ErrUnauthenticated) {
		t.Fatalf("wrong CHAP: %v, want unauthenticated", err)
	}
	want := "iSCSI CHAP authentication to " + iqn + " at " + portal + " failed: check the store's CHAP secret"
	if !strings.HasPrefix(err.Error(), want) || !strings.Contains(err.Error(), "exit 24") {
		t.Fatalf("wrong CHAP message: %q", err)
	}
	if strings.Contains(err.Error(), secret) {
		t.Fatalf("error shows the CHAP secret: %q", err)
	}
	if s.read("sessions") != "" {
		t.Fatalf("sessions after a failed login: %q", s.read("sessions"))
	}
	if ents, _ := os.ReadDir(s.bypath); len(ents) != 0 {
		t.Fatalf("devices after a failed login: %v", ents)
	}
}

func TestSecretRedactedFromErrors(t *testing.T) {
	s := newStandin(t)
	s.lun(portal, iqn, 1, "sdb", 1<<30)
	// The stand-in rejects an unknown option and echoes it on stderr
	// (exit 7): both the argv and the stderr in the error are redacted.
	r := &runner{bin: s.bin, timeout: 5 * time.Second, log: s.connector().log}
	_, err := r.run(context.Background(), []string{secret}, "-m", "node", "--bogus="+secret)
	if err == nil || strings.Contains(err.Error(), secret) || strings.Count(err.Error(), "REDACTED") != 2 {
		t.Fatalf("error %q: want the secret redacted", err)
	}
	if !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("exit 7: %v, want invalid", err)
	}
}

func TestDisconnectKeepsSessionForOtherLUN(t *testing.T) {
	s := newStandin(t)
	s.lun(portal, iqn, 1, "sdb", 1<<30)
	s.lun(portal, iqn, 2, "sdc", 1<<30)
	c := s.connector()
	ctx := context.Background()
	t1, t2 := chapTarget(1), chapTarget(2)
	for _, tg := range []Target{t1, t2} {
		if _, err := c.Connect(ctx, tg); err != nil {
			t.Fatal(err)
		}
	}
	s.calls()

	inUse := func(context.Context) ([]Target, error) { return []Target{t2}, nil }
	if err := c.Disconnect(ctx, t1, inUse); err != nil {
		t.Fatal(err)
	}
	assertCalls(t, s.calls()) // no logout, no node delete
	if b, _ := os.ReadFile(filepath.Join(s.sys, "block", "sdb", "device", "delete")); string(b) != "1" {
		t.Fatalf("sdb not deleted through sysfs: %q", b)
	}
	if b, _ := os.ReadFile(filepath.Join(s.sys, "block", "sdc", "device", "delete")); string(b) != "" {
		t.Fatalf("sdc touched: %q", b)
	}

	// The last LUN: logout and node delete.
	none := func(context.Context) ([]Target, error) { return nil, nil }
	if err := c.Disconnect(ctx, t2, none); err != nil {
		t.Fatal(err)
	}
	assertCalls(t, s.calls(), node("--logout"), node("--op delete"))
	if s.read("sessions") != "" {
		t.Fatalf("session left: %q", s.read("sessions"))
	}

	// Idempotent: again is success (logout and delete answer 21).
	if err := c.Disconnect(ctx, t2, none); err != nil {
		t.Fatalf("second disconnect: %v", err)
	}
	assertCalls(t, s.calls(), node("--logout"), node("--op delete"))
}

func TestDisconnectDefaultInUseFromByPath(t *testing.T) {
	s := newStandin(t)
	s.lun(portal, iqn, 1, "sdb", 1<<30)
	s.lun(portal, iqn, 2, "sdc", 1<<30)
	c := s.connector()
	ctx := context.Background()
	if _, err := c.Connect(ctx, chapTarget(1)); err != nil {
		t.Fatal(err)
	}
	s.calls()
	// udev would remove lun-1's link after the delete; lun-2's remains.
	if err := c.Disconnect(ctx, chapTarget(1), nil); err != nil {
		t.Fatal(err)
	}
	assertCalls(t, s.calls())
}

func TestAdopt(t *testing.T) {
	s := newStandin(t)
	c := s.connector()
	ctx := context.Background()
	ss, err := c.Adopt(ctx)
	if err != nil || len(ss) != 0 {
		t.Fatalf("no sessions (exit 21): %v, %v", ss, err)
	}
	s.write("sessions", "3 10.0.0.5:3260,1 iqn.a:x\n7 10.0.0.6:3261,2 iqn.b:y\n")
	ss, err = c.Adopt(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := []Session{{ID: 3, Transport: "tcp", Portal: "10.0.0.5:3260", TPGT: 1, IQN: "iqn.a:x"},
		{ID: 7, Transport: "tcp", Portal: "10.0.0.6:3261", TPGT: 2, IQN: "iqn.b:y"}}
	if !slices.Equal(ss, want) {
		t.Fatalf("adopted %+v, want %+v", ss, want)
	}
	// An adopted session is reused by Connect: no login.
	s.lun("10.0.0.6:3261", "iqn.b:y", 0, "sdd", 1<<20)
	if err := os.Symlink(filepath.Join(s.dir, "dev", "sdd"), filepath.Join(s.bypath, "ip-10.0.0.6:3261-iscsi-iqn.b:y-lun-0")); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(s.dir, "dev", "sdd"), nil, 0o644)
	s.calls()
	dev, err := c.Connect(ctx, Target{Portal: "10.0.0.6:3261", IQN: "iqn.b:y"})
	if err != nil || dev.SessionID != 7 {
		t.Fatalf("connect over an adopted session: %+v, %v", dev, err)
	}
	if calls := s.calls(); slices.ContainsFunc(calls, func(c string) bool { return strings.HasSuffix(c, "--login") }) {
		t.Fatalf("logged in over an adopted session: %q", calls)
	}
}

func TestRescan(t *testing.T) {
	s := newStandin(t)
	s.lun(portal, iqn, 1, "sdb", 1<<30)
	c := s.connector()
	ctx := context.Background()
	if _, err := c.Rescan(ctx, chapTarget(1)); !errdefs.IsNotFound(err) {
		t.Fatalf("rescan without a session: %v, want not found", err)
	}
	if _, err := c.Connect(ctx, chapTarget(1)); err != nil {
		t.Fatal(err)
	}
	s.calls()
	s.setSize("sdb", 2<<30) // the target grew the LUN
	size, err := c.Rescan(ctx, chapTarget(1))
	if err != nil || size != 2<<30 {
		t.Fatalf("rescan: %d, %v; want %d", size, err, 2<<30)
	}
	assertCalls(t, s.calls(), node("-R"))
	if b, _ := os.ReadFile(filepath.Join(s.sys, "block", "sdb", "device", "rescan")); string(b) != "1" {
		t.Fatalf("SCSI device not rescanned: %q", b)
	}
}

func TestDeviceAppearsAfterMidwayRescan(t *testing.T) {
	s := newStandin(t)
	s.lun(portal, iqn, 1, "sdb", 1<<30)
	s.write("appear_on_rescan", "")
	c := s.connector(WithDeviceTimeout(400*time.Millisecond, 5*time.Millisecond))
	dev, err := c.Connect(context.Background(), chapTarget(1))
	if err != nil {
		t.Fatal(err)
	}
	calls := s.calls()
	if calls[len(calls)-1] != "-m session -r 1 --rescan" || dev.SessionID != 1 {
		t.Fatalf("calls %q device %+v: want the device after one session rescan", calls, dev)
	}
}

func TestDeviceNeverAppears(t *testing.T) {
	s := newStandin(t)
	s.lun(portal, iqn, 1, "sdb", 1<<30)
	s.write("never_appear", "")
	c := s.connector(WithDeviceTimeout(100*time.Millisecond, 5*time.Millisecond))
	start := time.Now()
	_, err := c.Connect(context.Background(), chapTarget(1))
	if !errdefs.IsUnavailable(err) || !strings.Contains(err.Error(), "did not appear within 100ms") {
		t.Fatalf("device never appears: %v, want unavailable naming the timeout", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("timeout took %s", d)
	}
	var rescans int
	for _, c := range s.calls() {
		if strings.HasSuffix(c, "--rescan") {
			rescans++
		}
	}
	if rescans != 1 {
		t.Fatalf("%d session rescans during the wait, want 1", rescans)
	}
}

func TestMultipathHolder(t *testing.T) {
	s := newStandin(t)
	s.lun(portal, iqn, 1, "sdb", 1<<30)
	holders := filepath.Join(s.sys, "block", "sdb", "holders", "dm-3")
	if err := os.MkdirAll(holders, 0o755); err != nil {
		t.Fatal(err)
	}
	dmDir := filepath.Join(s.sys, "block", "dm-3", "dm")
	if err := os.MkdirAll(dmDir, 0o755); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dmDir, "name"), []byte("mpatha\n"), 0o644)

	dev, err := s.connector(WithMultipath(true)).Connect(context.Background(), chapTarget(1))
	if err != nil {
		t.Fatal(err)
	}
	if dev.Path != filepath.Join(s.dev, "mapper", "mpatha") || !dev.Multipath || dev.Disk != filepath.Join(s.dir, "dev", "sdb") {
		t.Fatalf("multipath device %+v", dev)
	}
	// Disconnect flushes the map first; where that fails (no multipath
	// tool here, or the map is busy) the disk and the session stay.
	if _, err := exec.LookPath("multipath"); err != nil {
		s.calls()
		err := s.connector(WithMultipath(true)).Disconnect(context.Background(), chapTarget(1), nil)
		if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "multipath -f mpatha") {
			t.Fatalf("disconnect under an unflushable map: %v", err)
		}
		if b, _ := os.ReadFile(filepath.Join(s.sys, "block", "sdb", "device", "delete")); len(b) != 0 {
			t.Fatalf("sdb deleted under a live map")
		}
		assertCalls(t, s.calls())
	}
	// Without multipathd the disk itself.
	dev, err = s.connector(WithMultipath(false)).Connect(context.Background(), chapTarget(1))
	if err != nil || dev.Multipath || dev.Path != dev.Disk {
		t.Fatalf("no multipathd: %+v, %v", dev, err)
	}
	// A dm device without a name: /dev/dm-N.
	os.Remove(filepath.Join(dmDir, "name"))
	dev, err = s.connector(WithMultipath(true)).Connect(context.Background(), chapTarget(1))
	if err != nil || dev.Path != filepath.Join(s.dev, "dm-3") {
		t.Fatalf("unnamed dm: %+v, %v", dev, err)
	}
}

func TestErrorClasses(t *testing.T) {
	ctx := context.Background()
	t.Run("target not offered", func(t *testing.T) {
		s := newStandin(t)
		s.lun(portal, "iqn.2026-01.org.stowage:other", 0, "sdb", 1<<20)
		_, err := s.connector().Connect(ctx, chapTarget(1))
		if !errdefs.IsNotFound(err) || !strings.Contains(err.Error(), "does not offer target "+iqn) {
			t.Fatalf("%v", err)
		}
	})
	t.Run("connection refused", func(t *testing.T) {
		s := newStandin(t)
		s.write("refuse", "")
		_, err := s.connector().Connect(ctx, chapTarget(1))
		if !errdefs.IsUnavailable(err) || !strings.Contains(err.Error(), "exit 4") {
			t.Fatalf("%v", err)
		}
	})
	t.Run("no kernel initiator", func(t *testing.T) {
		s := newStandin(t)
		s.lun(portal, iqn, 1, "sdb", 1<<20)
		s.write("iscsid_down", "")
		_, err := s.connector().Connect(ctx, chapTarget(1))
		if !errdefs.IsUnavailable(err) || !strings.Contains(err.Error(), "kernel iSCSI initiator is not usable") {
			t.Fatalf("%v", err)
		}
	})
	t.Run("iscsid down at login", func(t *testing.T) {
		s := newStandin(t)
		s.lun(portal, iqn, 1, "sdb", 1<<20)
		c := s.connector()
		if _, err := c.Connect(ctx, chapTarget(1)); err != nil {
			t.Fatal(err)
		}
		s.write("sessions", "")
		s.write("iscsid_down", "")
		// discovery now fails first (exit 12); a bare login shows exit 20.
		err := c.login(ctx, chapTarget(1))
		if !errdefs.IsUnavailable(err) || !strings.Contains(err.Error(), "exit 20") {
			t.Fatalf("%v", err)
		}
	})
	t.Run("iscsiadm missing", func(t *testing.T) {
		c := New(WithIscsiadm(filepath.Join(t.TempDir(), "iscsiadm")))
		_, err := c.Adopt(ctx)
		if !errdefs.IsUnavailable(err) || !strings.Contains(err.Error(), "install open-iscsi") {
			t.Fatalf("%v", err)
		}
	})
	t.Run("invalid target", func(t *testing.T) {
		for _, tg := range []Target{{Portal: "10.0.0.5", IQN: iqn}, {Portal: portal}, {Portal: portal, IQN: iqn, LUN: -1},
			{Portal: portal, IQN: iqn, CHAPUser: "u"}} {
			if _, err := New().Connect(ctx, tg); !errdefs.IsInvalid(err) {
				t.Errorf("%+v: %v", tg, err)
			}
		}
	})
	for code, want := range map[int]error{2: errdefs.ErrNotFound, 4: errdefs.ErrUnavailable, 8: errdefs.ErrUnavailable,
		12: errdefs.ErrUnavailable, 13: errdefs.ErrPermissionDenied, 15: errdefs.ErrAlreadyExists, 19: errdefs.ErrFailedPrecondition,
		20: errdefs.ErrUnavailable, 21: errdefs.ErrNotFound, 24: errdefs.ErrUnauthenticated, 6: errdefs.ErrInternal} {
		if got, _ := classify(code, ""); got != want {
			t.Errorf("exit %d: %v, want %v", code, got, want)
		}
	}
	if got, _ := classify(1, "iscsid: can not create NETLINK_ISCSI socket [Protocol not supported]"); got != errdefs.ErrUnavailable {
		t.Errorf("NETLINK_ISCSI: %v", got)
	}
}

func TestAvailableStandin(t *testing.T) {
	s := newStandin(t)
	ctx := context.Background()
	if ok, why := s.connector().Available(ctx); ok || !strings.Contains(why, "iscsi_tcp") {
		t.Fatalf("no iscsi_tcp in sysfs: %v %q", ok, why)
	}
	os.MkdirAll(filepath.Join(s.sys, "module", "iscsi_tcp"), 0o755)
	if ok, why := s.connector().Available(ctx); !ok {
		t.Fatalf("iscsi_tcp loaded, stand-in iscsiadm: %v %q", ok, why)
	}
	if ok, why := New(WithIscsiadm(filepath.Join(t.TempDir(), "nope"))).Available(ctx); ok || !strings.Contains(why, "install open-iscsi") {
		t.Fatalf("no iscsiadm: %v %q", ok, why)
	}
}

// TestAvailableThisHost: where the kernel cannot load iscsi_tcp,
// Available says no and why.
func TestAvailableThisHost(t *testing.T) {
	ok, why := New().Available(context.Background())
	t.Logf("kernel iSCSI initiator available: %v (%s)", ok, why)
	if kernelInitiator() == "" && (ok || why == "") {
		t.Fatalf("no iscsi_tcp here, yet Available = %v %q", ok, why)
	}
}

// kernelInitiator returns "" when iscsi_tcp is neither loaded nor
// loadable, else how it is there.
func kernelInitiator() string {
	if _, err := os.Stat("/sys/module/iscsi_tcp"); err == nil {
		return "loaded"
	}
	if err := exec.Command("modprobe", "-n", "iscsi_tcp").Run(); err == nil {
		return "loadable"
	}
	return ""
}

// TestRealIscsiadm runs the real iscsiadm where the kernel initiator can
// work: no sessions or an existing list parses, and a target at a closed
// port is unavailable.
func TestRealIscsiadm(t *testing.T) {
	if kernelInitiator() == "" {
		t.Skip("kernel iSCSI initiator unusable here: /sys/module/iscsi_tcp is missing and modprobe -n iscsi_tcp fails (no iscsi_tcp module); the stand-in tests cover the sequence")
	}
	if _, err := exec.LookPath("iscsiadm"); err != nil {
		t.Skip("iscsiadm not installed (apt-get install open-iscsi)")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	c := New(WithCommandTimeout(30 * time.Second))
	ctx := context.Background()
	if ok, why := c.Available(ctx); !ok {
		t.Skip("kernel path unavailable: " + why)
	}
	if _, err := c.Adopt(ctx); err != nil {
		t.Fatal(err)
	}
	_, err := c.Connect(ctx, Target{Portal: "127.0.0.1:1", IQN: "iqn.2026-01.org.stowage:nobody"})
	if !errdefs.IsUnavailable(err) {
		t.Fatalf("closed port: %v, want unavailable", err)
	}
}

// The node logs in with the initiator name the target's ACL names for the
// host (iface.initiatorname), when the grant gives one.
func TestConnectSetsTheACLsInitiatorName(t *testing.T) {
	s := newStandin(t)
	s.lun(portal, iqn, 1, "sdb", 1<<30)
	s.write("chap", "host1 "+secret+"\n")
	tg := chapTarget(1)
	tg.Initiator = "iqn.2026-12.org.stowage:host.h1"
	if _, err := s.connector().Connect(context.Background(), tg); err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(s.calls(), node("--op update -n iface.initiatorname -v iqn.2026-12.org.stowage:host.h1")) {
		t.Fatalf("no iface.initiatorname update: %q", s.calls())
	}
}
