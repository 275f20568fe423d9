package main

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// handedOut holds every port freeAddr returned in this test binary: a port
// is never handed out twice, even after its first listener closed (two
// controllers given one port made the second test's probe reach the first
// controller).
var handedOut struct {
	mu    sync.Mutex
	ports map[int]bool
}

// freeAddr is a free loopback address for a listener that must get the
// same port back at every restart of its process: a port below the
// kernel's ephemeral range, which no outgoing connection and no listener
// on port 0 takes while the process is down (one in the range was taken
// by an agent's outgoing NBD connection, and the restarted process could
// not serve its failpoints).
func freeAddr(t *testing.T) string {
	t.Helper()
	low := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if n, err := strconv.Atoi(f[0]); err == nil && n > 12000 {
				low = n
			}
		}
	}
	handedOut.mu.Lock()
	defer handedOut.mu.Unlock()
	if handedOut.ports == nil {
		handedOut.ports = make(map[int]bool)
	}
	for range 1000 {
		port := 10000 + rand.IntN(low-10000)
		if handedOut.ports[port] {
			continue
		}
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			continue
		}
		addr := l.Addr().String()
		l.Close()
		handedOut.ports[port] = true
		return addr
	}
	t.Fatal("no free port below the ephemeral range")
	return ""
}

// freePort is freeAddr: every listener a test starts gets a port nobody
// else in this binary was given.
func freePort(t *testing.T) string {
	t.Helper()
	return freeAddr(t)
}
