package tgt_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stowage/stowage/agent/iscsi/tgt"
	"github.com/stowage/stowage/datapath/iscsi/tgttest"
	"github.com/stowage/stowage/errdefs"
)

const (
	iqn       = "iqn.2026-12.io.stowage:test"
	initiator = "iqn.2026-12.io.stowage:host1"
)

func sparseFile(t *testing.T, name string, size int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	return p
}

// readCapacity logs in as initiator (CHAP user/secret when user is set,
// the secret through libiscsi's environment, not argv) and returns the
// LUN's size from READ CAPACITY(16).
func readCapacity(ctx context.Context, portal, target string, lun int, init, user, secret string) (int64, error) {
	u := "iscsi://" + portal + "/" + target + "/" + strconv.Itoa(lun)
	if user != "" {
		u = "iscsi://" + user + "@" + portal + "/" + target + "/" + strconv.Itoa(lun)
	}
	cmd := exec.CommandContext(ctx, "iscsi-readcapacity16", "-i", init, u)
	cmd.Env = append(os.Environ(), "LIBISCSI_CHAP_PASSWORD="+secret)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("iscsi-readcapacity16 %s: %v: %s", u, err, out)
	}
	for _, l := range strings.Split(string(out), "\n") {
		if v, ok := strings.CutPrefix(l, "Total size:"); ok {
			return strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		}
	}
	return 0, fmt.Errorf("iscsi-readcapacity16: no size in %q", out)
}

func TestManager(t *testing.T) {
	tgttest.Require(t, "iscsi-readcapacity16")
	portal, ctl := tgttest.Start(t)
	ctx := t.Context()
	var logs bytes.Buffer // the Manager logs from the test's goroutine only
	m := tgt.New(tgt.WithControlPort(ctl), tgt.WithLogger(slog.New(slog.NewTextHandler(io.MultiWriter(t.Output(), &logs), nil))))

	if _, err := m.LUNs(ctx, iqn); !errdefs.IsNotFound(err) {
		t.Fatalf("LUNs of a missing target: %v, want not found", err)
	}
	if _, err := m.AddLUN(ctx, iqn, "/x"); !errdefs.IsNotFound(err) {
		t.Fatalf("AddLUN to a missing target: %v, want not found", err)
	}
	for range 2 {
		if err := m.EnsureTarget(ctx, iqn); err != nil {
			t.Fatal(err)
		}
	}
	if err := m.EnsureTarget(ctx, iqn+"2"); err != nil {
		t.Fatal(err)
	}
	ts, err := m.Targets(ctx)
	if err != nil || len(ts) != 2 || ts[0].TID == ts[1].TID {
		t.Fatalf("Targets = %+v, %v", ts, err)
	}
	if err := m.EnsureTarget(ctx, "iqn.bad name"); !errdefs.IsInvalid(err) {
		t.Fatalf("EnsureTarget with a blank: %v, want invalid", err)
	}

	a := sparseFile(t, "a.raw", 64<<20)
	b := sparseFile(t, "b.raw", 16<<20)
	na, err := m.AddLUN(ctx, iqn, a)
	if err != nil || na != 1 {
		t.Fatalf("AddLUN a = %d, %v", na, err)
	}
	nb, err := m.AddLUN(ctx, iqn, b)
	if err != nil || nb != 2 {
		t.Fatalf("AddLUN b = %d, %v", nb, err)
	}
	if again, err := m.AddLUN(ctx, iqn, a); err != nil || again != na {
		t.Fatalf("AddLUN a again = %d, %v; want %d", again, err, na)
	}
	if _, err := m.AddLUN(ctx, iqn, filepath.Join(t.TempDir(), "missing")); !errdefs.IsNotFound(err) {
		t.Fatalf("AddLUN of a missing backing: %v, want not found", err)
	}
	luns, err := m.LUNs(ctx, iqn)
	if err != nil || len(luns) != 2 || luns[0].Backing != a || luns[1].Backing != b || luns[0].Size != 67_000_000 || !luns[0].Thin {
		t.Fatalf("LUNs = %+v, %v", luns, err)
	}
	// The lowest free number is reused.
	if err := m.RemoveLUN(ctx, iqn, a); err != nil {
		t.Fatal(err)
	}
	if err := m.RemoveLUN(ctx, iqn, a); err != nil {
		t.Fatalf("RemoveLUN again: %v", err)
	}
	if n, err := m.AddLUN(ctx, iqn, a); err != nil || n != 1 {
		t.Fatalf("AddLUN a after remove = %d, %v; want 1", n, err)
	}

	// Nobody is allowed yet: tgt answers "target not found".
	if _, err := readCapacity(ctx, portal, iqn, na, initiator, "", ""); err == nil {
		t.Fatal("login without an ACL succeeded")
	}
	for range 2 {
		if err := m.Allow(ctx, iqn, initiator); err != nil {
			t.Fatal(err)
		}
	}
	if size, err := readCapacity(ctx, portal, iqn, na, initiator, "", ""); err != nil || size != 64<<20 {
		t.Fatalf("allowed initiator: size %d, %v", size, err)
	}
	if _, err := readCapacity(ctx, portal, iqn, na, "iqn.2026-12.io.stowage:other", "", ""); err == nil {
		t.Fatal("an initiator that is not allowed logged in")
	}

	// Refresh after growing the backing.
	if err := os.Truncate(a, 96<<20); err != nil {
		t.Fatal(err)
	}
	if size, _ := readCapacity(ctx, portal, iqn, na, initiator, "", ""); size != 64<<20 {
		t.Fatalf("before Refresh tgt serves %d, want the old 64 MiB", size)
	}
	if err := m.Refresh(ctx, iqn, a); err != nil {
		t.Fatal(err)
	}
	if size, err := readCapacity(ctx, portal, iqn, na, initiator, "", ""); err != nil || size != 96<<20 {
		t.Fatalf("after Refresh: size %d, %v; want 96 MiB", size, err)
	}
	if luns, _ := m.LUNs(ctx, iqn); len(luns) != 2 || luns[0].Number != na || !luns[0].Thin || luns[0].Size != 101_000_000 {
		t.Fatalf("LUNs after Refresh = %+v", luns)
	}
	if err := m.Refresh(ctx, iqn, "/nope"); !errdefs.IsNotFound(err) {
		t.Fatalf("Refresh of an unknown backing: %v, want not found", err)
	}

	// CHAP: required once bound; the right secret reads, a wrong one fails.
	const user, secret = "host1", "s3cret-0123456789"
	for range 2 {
		if err := m.SetCHAP(ctx, iqn, user, secret); err != nil {
			t.Fatal(err)
		}
	}
	// The second call, with the secret it set, changes nothing in tgtd.
	if n := strings.Count(logs.String(), `msg="iscsi chap set"`); n != 1 {
		t.Errorf("the same secret set twice changed the account %d times, want once:\n%s", n, logs.String())
	}
	if _, err := readCapacity(ctx, portal, iqn, na, initiator, "", ""); err == nil {
		t.Fatal("login without CHAP succeeded on a target with an account")
	}
	if _, err := readCapacity(ctx, portal, iqn, na, initiator, user, secret); err != nil {
		t.Fatalf("right secret: %v", err)
	}
	if _, err := readCapacity(ctx, portal, iqn, na, initiator, user, "wrong-secret-000"); err == nil || !strings.Contains(err.Error(), "Authentication failure") {
		t.Fatalf("wrong secret: %v, want an authentication failure", err)
	}
	// Rotation: the old secret stops working, the new one works.
	const secret2 = "s3cret-rotated-42"
	if err := m.SetCHAP(ctx, iqn, user, secret2); err != nil {
		t.Fatal(err)
	}
	if _, err := readCapacity(ctx, portal, iqn, na, initiator, user, secret); err == nil {
		t.Fatal("old secret still works after rotation")
	}
	if _, err := readCapacity(ctx, portal, iqn, na, initiator, user, secret2); err != nil {
		t.Fatalf("rotated secret: %v", err)
	}
	if ts, _ := m.Targets(ctx); len(ts[0].Accounts) != 1 || ts[0].Accounts[0] != user {
		t.Fatalf("accounts after rotation: %+v (placeholder left behind?)", ts[0].Accounts)
	}
	for range 2 {
		if err := m.RemoveCHAP(ctx, iqn, user); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := readCapacity(ctx, portal, iqn, na, initiator, "", ""); err != nil {
		t.Fatalf("after RemoveCHAP: %v", err)
	}

	// Disallow, then delete the target.
	for range 2 {
		if err := m.Disallow(ctx, iqn, initiator); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := readCapacity(ctx, portal, iqn, na, initiator, "", ""); err == nil {
		t.Fatal("login succeeded after Disallow")
	}
	// By address: anyone from 127.0.0.1.
	if err := m.Allow(ctx, iqn, "127.0.0.1"); err != nil {
		t.Fatal(err)
	}
	if _, err := readCapacity(ctx, portal, iqn, na, "iqn.2026-12.io.stowage:other", "", ""); err != nil {
		t.Fatalf("address ACL: %v", err)
	}
	if ts, _ := m.Targets(ctx); len(ts[0].ACLs) != 1 || ts[0].ACLs[0] != "127.0.0.1" {
		t.Fatalf("ACLs = %q", ts[0].ACLs)
	}
	for range 2 {
		if err := m.DeleteTarget(ctx, iqn); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := m.LUNs(ctx, iqn); !errdefs.IsNotFound(err) {
		t.Fatalf("LUNs after DeleteTarget: %v", err)
	}
	if err := m.RemoveLUN(ctx, iqn, a); err != nil {
		t.Fatalf("RemoveLUN on a deleted target: %v", err)
	}
}

func TestSecretNotInErrors(t *testing.T) {
	_, ctl := tgttest.Start(t)
	ctx := t.Context()
	m := tgt.New(tgt.WithControlPort(ctl), tgt.WithLogger(slog.New(slog.NewTextHandler(t.Output(), nil))))
	const secret = "do-not-print-me-1"
	// A user name tgtadm rejects would echo argv in some versions; the
	// target is missing, so SetCHAP fails before or at tgtadm.
	err := m.SetCHAP(ctx, iqn, "u", secret)
	if !errdefs.IsNotFound(err) || strings.Contains(err.Error(), secret) {
		t.Fatalf("SetCHAP on a missing target: %v", err)
	}
}

func TestUnavailable(t *testing.T) {
	tgttest.Require(t, "tgtadm")
	m := tgt.New(tgt.WithControlPort(32001))
	err := m.EnsureTarget(t.Context(), iqn)
	if !errdefs.IsUnavailable(err) || !strings.Contains(err.Error(), "control port 32001") {
		t.Fatalf("no tgtd: %v, want unavailable naming the control port", err)
	}
	m = tgt.New(tgt.WithBinary(filepath.Join(t.TempDir(), "tgtadm")))
	if err := m.EnsureTarget(t.Context(), iqn); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("no tgtadm: %v, want unavailable", err)
	}
}

// holdSession keeps a session of init open on LUN lun (qemu-nbd reading
// it through libiscsi, on a unix socket nobody connects to) until the
// test ends; the process is killed by its PID.
func holdSession(t *testing.T, portal, target string, lun int, init string) *exec.Cmd {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	cmd := exec.Command("qemu-nbd", "--persistent", "--read-only", "-k", sock, "--image-opts",
		fmt.Sprintf("driver=raw,file.driver=iscsi,file.transport=tcp,file.portal=%s,file.target=%s,file.lun=%d,file.initiator-name=%s", portal, target, lun, init))
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-done
		if t.Failed() {
			t.Logf("qemu-nbd: %s", out.String())
		}
	})
	return cmd
}

// sessionsOf counts the sessions of init on target.
func sessionsOf(t *testing.T, ctx context.Context, m *tgt.Manager, target, init string) int {
	t.Helper()
	tg, err := m.Target(ctx, target)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, nx := range tg.Nexuses {
		if nx.Initiator == init {
			n++
		}
	}
	return n
}

// TestLogout: a logged-in initiator whose ACL entry is removed keeps its
// session until Logout closes it; it cannot log in again, another
// initiator's session stays.
func TestLogout(t *testing.T) {
	tgttest.Require(t, "iscsi-readcapacity16", "qemu-nbd")
	portal, ctl := tgttest.Start(t)
	ctx := t.Context()
	m := tgt.New(tgt.WithControlPort(ctl), tgt.WithLogger(slog.New(slog.NewTextHandler(t.Output(), nil))))
	if err := m.EnsureTarget(ctx, iqn); err != nil {
		t.Fatal(err)
	}
	n, err := m.AddLUN(ctx, iqn, sparseFile(t, "a.img", 8<<20))
	if err != nil {
		t.Fatal(err)
	}
	const other = "iqn.2026-12.io.stowage:host2"
	for _, i := range []string{initiator, other} {
		if err := m.Allow(ctx, iqn, i); err != nil {
			t.Fatal(err)
		}
		holdSession(t, portal, iqn, n, i)
	}
	deadline := time.Now().Add(10 * time.Second)
	for sessionsOf(t, ctx, m, iqn, initiator) == 0 || sessionsOf(t, ctx, m, iqn, other) == 0 {
		if time.Now().After(deadline) {
			tg, _ := m.Target(ctx, iqn)
			t.Fatalf("no sessions of both initiators after 10 s: %+v", tg.Nexuses)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := m.Disallow(ctx, iqn, initiator); err != nil {
		t.Fatal(err)
	}
	if s := sessionsOf(t, ctx, m, iqn, initiator); s != 1 {
		t.Fatalf("%d sessions of %s after Disallow alone, want the 1 it had (tgt keeps sessions)", s, initiator)
	}
	closed, err := m.Logout(ctx, iqn, initiator)
	if err != nil || closed != 1 {
		t.Fatalf("Logout: %d connections closed, %v; want 1", closed, err)
	}
	// libiscsi reconnects at once, and is refused: no session comes back.
	time.Sleep(time.Second)
	if s := sessionsOf(t, ctx, m, iqn, initiator); s != 0 {
		t.Fatalf("%d sessions of %s after Logout", s, initiator)
	}
	if s := sessionsOf(t, ctx, m, iqn, other); s != 1 {
		t.Fatalf("%d sessions of %s after the other's Logout, want 1", s, other)
	}
	if _, err := readCapacity(ctx, portal, iqn, n, initiator, "", ""); err == nil {
		t.Fatal("the logged-out initiator logged in again")
	}
	if closed, err := m.Logout(ctx, iqn, initiator); err != nil || closed != 0 {
		t.Fatalf("Logout again: %d, %v", closed, err)
	}
}

// TestCHAPChurnLeavesNoHole: tgt keeps a target's bound accounts in an
// array it walks up to their count. Unbinding one that is not the last
// (a host leaving a store's scope, a secret rotated: tgtadm's account
// delete unbinds it everywhere) left a zero in the middle: the next
// "show target" dereferenced it and tgtd died (segfault, seen in CI), and
// the account past the end could no longer log in. Every change below is
// followed by a show and by a login of every account still bound.
func TestCHAPChurnLeavesNoHole(t *testing.T) {
	tgttest.Require(t, "iscsi-readcapacity16")
	portal, ctl := tgttest.Start(t)
	ctx := t.Context()
	m := tgt.New(tgt.WithControlPort(ctl), tgt.WithLogger(slog.New(slog.NewTextHandler(t.Output(), nil))))
	const other = iqn + "2"
	var n int
	for _, target := range []string{iqn, other} {
		if err := m.EnsureTarget(ctx, target); err != nil {
			t.Fatal(err)
		}
		var err error
		if n, err = m.AddLUN(ctx, target, sparseFile(t, "a.img", 4<<20)); err != nil {
			t.Fatal(err)
		}
	}
	secrets := map[string]string{}
	host := func(i int) (init, user string) {
		return fmt.Sprintf("iqn.2026-12.io.stowage:host%d", i), fmt.Sprintf("user%d", i)
	}
	bind := func(target string, i int) {
		t.Helper()
		init, user := host(i)
		if err := m.Allow(ctx, target, init); err != nil {
			t.Fatal(err)
		}
		if _, ok := secrets[user]; !ok {
			secrets[user] = fmt.Sprintf("secret-%d-0123456789", i)
		}
		if err := m.SetCHAP(ctx, target, user, secrets[user]); err != nil {
			t.Fatal(err)
		}
	}
	// check shows the targets (what crashed tgtd) and logs in with every
	// host of want: each must get in with its secret, and no other.
	check := func(step, target string, want ...int) {
		t.Helper()
		tg, err := m.Target(ctx, target)
		if err != nil {
			t.Fatalf("%s: %v", step, err)
		}
		var users []string
		for _, i := range want {
			_, u := host(i)
			users = append(users, u)
		}
		if !slices.Equal(slices.Sorted(slices.Values(tg.Accounts)), users) {
			t.Fatalf("%s: %s has accounts %q, want %q", step, target, tg.Accounts, users)
		}
		for _, i := range want {
			init, user := host(i)
			if _, err := readCapacity(ctx, portal, target, n, init, user, secrets[user]); err != nil {
				t.Fatalf("%s: %s cannot log in to %s: %v", step, user, target, err)
			}
			if _, err := readCapacity(ctx, portal, target, n, init, "", ""); err == nil {
				t.Fatalf("%s: %s logged in to %s without CHAP", step, init, target)
			}
		}
	}
	for i := 1; i <= 4; i++ {
		bind(iqn, i)
	}
	bind(other, 2)
	bind(other, 3)
	check("four bound", iqn, 1, 2, 3, 4)

	// A middle account leaves one target, stays on the other.
	if err := m.RemoveCHAP(ctx, iqn, "user2"); err != nil {
		t.Fatal(err)
	}
	check("user2 unbound", iqn, 1, 3, 4)
	check("user2 unbound elsewhere", other, 2, 3)
	// The first account goes (deleted: bound nowhere else).
	if err := m.RemoveCHAP(ctx, iqn, "user1"); err != nil {
		t.Fatal(err)
	}
	check("user1 removed", iqn, 3, 4)
	// A secret bound to both targets is rotated (the account is replaced
	// in tgt, which unbinds it everywhere).
	secrets["user3"] = "secret-3-rotated-000"
	if err := m.SetCHAP(ctx, iqn, "user3", secrets["user3"]); err != nil {
		t.Fatal(err)
	}
	check("user3 rotated", iqn, 3, 4)
	check("user3 rotated elsewhere", other, 2, 3)
	if _, err := readCapacity(ctx, portal, iqn, n, "iqn.2026-12.io.stowage:host3", "user3", "secret-3-0123456789"); err == nil {
		t.Fatal("the old secret of user3 still logs in")
	}
	bind(iqn, 5)
	check("user5 added", iqn, 3, 4, 5)
	for _, u := range []string{"user3", "user4", "user5"} {
		if err := m.RemoveCHAP(ctx, iqn, u); err != nil {
			t.Fatal(err)
		}
	}
	// No account left: the target asks for no CHAP again.
	if tg, err := m.Target(ctx, iqn); err != nil || len(tg.Accounts) != 0 {
		t.Fatalf("all removed: %+v, %v", tg.Accounts, err)
	}
	if _, err := readCapacity(ctx, portal, iqn, n, "iqn.2026-12.io.stowage:host3", "", ""); err != nil {
		t.Fatalf("no account left, login without CHAP: %v", err)
	}
	check("the other target at the end", other, 2, 3)
}

// TestCHAPGuardAddedToOldTarget: a target whose accounts were bound
// without the guard in front (by an older agent, or by hand) gets it
// before its first account is pulled; the others still log in.
func TestCHAPGuardAddedToOldTarget(t *testing.T) {
	tgttest.Require(t, "iscsi-readcapacity16")
	portal, ctl := tgttest.Start(t)
	ctx := t.Context()
	m := tgt.New(tgt.WithControlPort(ctl), tgt.WithLogger(slog.New(slog.NewTextHandler(t.Output(), nil))))
	if err := m.EnsureTarget(ctx, iqn); err != nil {
		t.Fatal(err)
	}
	n, err := m.AddLUN(ctx, iqn, sparseFile(t, "a.img", 4<<20))
	if err != nil {
		t.Fatal(err)
	}
	tgtadm := func(args ...string) string {
		t.Helper()
		out, err := exec.CommandContext(ctx, "tgtadm", append([]string{"-C", strconv.Itoa(ctl), "--lld", "iscsi"}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("tgtadm %q: %v: %s", args, err, out)
		}
		return string(out)
	}
	for _, u := range []string{"old1", "old2", "old3"} {
		tgtadm("--op", "new", "--mode", "account", "--user", u, "--password", u+"-secret-0123")
		tgtadm("--op", "bind", "--mode", "account", "--tid", "1", "--user", u)
	}
	if err := m.Allow(ctx, iqn, initiator); err != nil {
		t.Fatal(err)
	}
	if err := m.RemoveCHAP(ctx, iqn, "old1"); err != nil {
		t.Fatal(err)
	}
	out := tgtadm("--op", "show", "--mode", "target")
	_, accounts, _ := strings.Cut(out, "Account information:\n")
	accounts, _, _ = strings.Cut(accounts, "ACL information:")
	if got := strings.Fields(accounts); !slices.Equal(got, []string{"stowage-guard", "old2", "old3"}) {
		t.Fatalf("tgt's accounts in slot order: %q, want the guard first, then old2, old3", got)
	}
	if tg, err := m.Target(ctx, iqn); err != nil || !slices.Equal(tg.Accounts, []string{"old2", "old3"}) {
		t.Fatalf("Target: %+v, %v; want old2, old3 (the guard left out)", tg.Accounts, err)
	}
	for _, u := range []string{"old2", "old3"} {
		if _, err := readCapacity(ctx, portal, iqn, n, initiator, u, u+"-secret-0123"); err != nil {
			t.Fatalf("%s after old1 was pulled: %v", u, err)
		}
	}
	if _, err := readCapacity(ctx, portal, iqn, n, initiator, "old1", "old1-secret-0123"); err == nil {
		t.Fatal("old1 still logs in")
	}
	if err := m.SetCHAP(ctx, iqn, "stowage-guard", "x-secret-0123456"); !errdefs.IsInvalid(err) {
		t.Fatalf("SetCHAP of the guard's name: %v, want invalid", err)
	}
}
