package iscsi

import (
	"context"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/stowage/stowage/errdefs"
)

func TestParseURL(t *testing.T) {
	for in, want := range map[string]Target{
		"iscsi://10.0.0.5/iqn.2026-12.io.stowage:s1/3":                 {Portal: "10.0.0.5:3260", IQN: "iqn.2026-12.io.stowage:s1", LUN: 3},
		"iscsi://host1@10.0.0.5:13260/iqn.2026-12.io.stowage:s1/0":     {Portal: "10.0.0.5:13260", IQN: "iqn.2026-12.io.stowage:s1", User: "host1"},
		"iscsi://host1%s3cr%t@[::1]:3261/iqn.2026-12.io.stowage:s1/12": {Portal: "[::1]:3261", IQN: "iqn.2026-12.io.stowage:s1", LUN: 12, User: "host1", Secret: "s3cr%t"},
		"iscsi://[fe80::1]/iqn.2026-12.io.stowage:s1/1":                {Portal: "[fe80::1]:3260", IQN: "iqn.2026-12.io.stowage:s1", LUN: 1},
	} {
		got, err := ParseURL(in)
		if err != nil || got != want {
			t.Errorf("ParseURL(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, in := range []string{
		"nbd://h/x", "iscsi://h", "iscsi://h/iqn.a:b", "iscsi://h/iqn.a:b/x", "iscsi://h/iqn.a:b/-1",
		"iscsi://h:0/iqn.a:b/1", "iscsi://%pw@h/iqn.a:b/1", "iscsi://h/iqn.a:b/1?x=y", "iscsi://u%topsecret@h/iqn.a:b/x",
	} {
		_, err := ParseURL(in)
		if !errdefs.IsInvalid(err) {
			t.Errorf("ParseURL(%q): %v, want invalid", in, err)
		}
		if err != nil && strings.Contains(err.Error(), "topsecret") {
			t.Errorf("ParseURL(%q): the secret is in the error: %v", in, err)
		}
	}
}

func TestStringAndImageOpts(t *testing.T) {
	tg := Target{Portal: "127.0.0.1:3260", IQN: "iqn.2026-12.io.stowage:s1", LUN: 2, User: "u,1", Secret: "topsecret", Initiator: "iqn.2026-12.io.stowage:h1"}
	if s := tg.String(); s != "iscsi://u,1%REDACTED@127.0.0.1:3260/iqn.2026-12.io.stowage:s1/2" {
		t.Errorf("String = %s", s)
	}
	want := "driver=raw,file.driver=iscsi,file.transport=tcp,file.portal=127.0.0.1:3260,file.target=iqn.2026-12.io.stowage:s1,file.lun=2,file.user=u,,1,file.password-secret=sec0,file.initiator-name=iqn.2026-12.io.stowage:h1"
	if got := tg.ImageOpts("sec0"); got != want {
		t.Errorf("ImageOpts =\n%s\nwant\n%s", got, want)
	}
}

func TestSecretArgs(t *testing.T) {
	tg := Target{Portal: "127.0.0.1:3260", IQN: "iqn.a:b", User: "u", Secret: "topsecret"}
	args, cleanup, err := tg.SecretArgs("sec0")
	if err != nil {
		t.Fatal(err)
	}
	if len(args) != 2 || args[0] != "--object" || !strings.HasPrefix(args[1], "secret,id=sec0,format=raw,file=") {
		t.Fatalf("args = %q", args)
	}
	path := strings.TrimPrefix(args[1], "secret,id=sec0,format=raw,file=")
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("secret file %s: %v, %v; want mode 0600", path, fi, err)
	}
	if b, _ := os.ReadFile(path); string(b) != "topsecret" {
		t.Fatalf("secret file holds %q", b)
	}
	cleanup()
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("secret file left after cleanup: %v", err)
	}
	if args, cleanup, err := (Target{}).SecretArgs("x"); args != nil || err != nil {
		t.Fatalf("no secret: %q %v", args, err)
	} else {
		cleanup()
	}
}

// The secret must not be in qemu-img's argv (/proc/<pid>/cmdline) nor in
// its environment; only the file the secret object names holds it.
func TestSecretNotInArgv(t *testing.T) {
	tg := Target{Portal: "127.0.0.1:3260", IQN: "iqn.a:b", LUN: 1, User: "u", Secret: "topsecret", Initiator: "iqn.c:d"}
	cmd, cleanup, err := writeCmd(context.Background(), "/src.qcow2", "qcow2", tg, true, TargetIsZero())
	if err != nil {
		t.Fatal(err)
	}
	defer cleanup()
	for _, a := range append(slices.Clone(cmd.Args), cmd.Env...) {
		if strings.Contains(a, "topsecret") {
			t.Fatalf("secret in argv or env: %q", a)
		}
	}
	argv := strings.Join(cmd.Args, " ")
	for _, want := range []string{" convert -n -f qcow2 -S 4k -W -m 8 ", "--target-is-zero", " -p ", "--target-image-opts /src.qcow2 driver=raw,file.driver=iscsi,", "file.password-secret=" + secretID, "--object secret,id=" + secretID} {
		if !strings.Contains(argv, want) {
			t.Errorf("argv %q lacks %q", argv, want)
		}
	}
	cmd, cleanup2, err := writeCmd(context.Background(), "rel.raw", "raw", tg, false)
	if err != nil {
		t.Fatal(err)
	}
	defer cleanup2()
	if argv := strings.Join(cmd.Args, " "); strings.Contains(argv, "--target-is-zero") || !strings.Contains(argv, " ./rel.raw ") {
		t.Errorf("argv without TargetIsZero: %q", argv)
	}
}
