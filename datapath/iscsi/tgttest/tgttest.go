// Package tgttest starts a real tgtd (the Linux SCSI target framework's
// userspace iSCSI target) for tests: one daemon per test, on loopback,
// with its own control port, killed by PID when the test ends.
//
//	portal, ctl := tgttest.Start(t) // "127.0.0.1:<port>", the tgtadm -C number
//	m := tgt.New(tgt.WithControlPort(ctl))
//	... initiators reach iscsi://<portal>/<iqn>/<lun> ...
//
// Start skips the test (t.Skip) when tgtd is missing or the test does not
// run as root, unless CI is set in the environment: then it fails.
// scripts/test.sh installs tgt, libiscsi-bin and qemu-block-extra.
package tgttest

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"testing"
	"time"
)

// Start runs tgtd -f -C <ctl> --iscsi portal=127.0.0.1:<port> until the
// test ends and returns the portal and the control port once tgtadm gets
// an answer from it.
func Start(t testing.TB) (portal string, ctl int) {
	t.Helper()
	Require(t, "tgtd", "tgtadm")
	if os.Geteuid() != 0 {
		skip(t, "tgtd needs root")
	}
	var lastErr error
	for range 5 {
		portal, ctl, err := start(t)
		if err == nil {
			return portal, ctl
		}
		lastErr = err
	}
	t.Fatalf("tgttest: tgtd did not start: %v", lastErr)
	return "", 0
}

// Require skips the test (fails it when CI is set) unless every named
// binary is on PATH.
func Require(t testing.TB, bins ...string) {
	t.Helper()
	for _, b := range bins {
		if _, err := exec.LookPath(b); err != nil {
			skip(t, fmt.Sprintf("%s is not installed (Debian: tgt, libiscsi-bin, qemu-utils, qemu-block-extra)", b))
		}
	}
}

func skip(t testing.TB, why string) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatalf("tgttest: %s (CI is set: not skipping)", why)
	}
	t.Skip("tgttest: " + why)
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func start(t testing.TB) (string, int, error) {
	t.Helper()
	ctl := 0
	for ctl == 0 {
		n := 1000 + rand.IntN(31000) // tgtadm takes -C 0..32767
		if _, err := os.Stat(socketPath(n)); os.IsNotExist(err) {
			ctl = n
		}
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", 0, err
	}
	portal := l.Addr().String()
	l.Close()

	var logs syncBuffer
	cmd := exec.Command("tgtd", "-f", "-C", strconv.Itoa(ctl), "--iscsi", "portal="+portal)
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		return "", 0, err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stop := func() {
		_ = cmd.Process.Kill() // by PID: the process this test started
		<-exited
		os.Remove(socketPath(ctl))
		os.Remove(socketPath(ctl) + ".lock")
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for {
		select {
		case err := <-exited:
			exited <- err
			stop()
			return "", 0, fmt.Errorf("tgtd -C %d on %s exited: %v: %s", ctl, portal, err, logs.String())
		case <-ctx.Done():
			stop()
			return "", 0, fmt.Errorf("tgtd -C %d on %s did not answer tgtadm within 10s: %s", ctl, portal, logs.String())
		case <-time.After(50 * time.Millisecond):
		}
		if exec.CommandContext(ctx, "tgtadm", "-C", strconv.Itoa(ctl), "--op", "show", "--mode", "sys").Run() != nil {
			continue
		}
		if c, err := net.DialTimeout("tcp", portal, time.Second); err == nil {
			c.Close()
			break
		}
	}
	t.Cleanup(func() {
		select {
		case err := <-exited:
			// tgtd ended before the test did: a crash of tgtd, not of
			// what the test drives.
			exited <- err
			t.Errorf("tgtd -C %d exited during the test: %v", ctl, err)
		default:
		}
		stop()
		if t.Failed() {
			t.Logf("tgtd -C %d log:\n%s", ctl, logs.String())
		}
	})
	return portal, ctl, nil
}

func socketPath(ctl int) string { return "/var/run/tgtd/socket." + strconv.Itoa(ctl) }
