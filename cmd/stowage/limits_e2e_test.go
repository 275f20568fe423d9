package main

// Bounded requests, end to end: a 10 MiB RPC and gzip bombs (Connect and
// gRPC) sent to a real controller and a real agent are refused with
// resource_exhausted, and neither process's peak RSS grows past a few tens
// of MiB.

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// memKiB reads VmRSS and VmHWM (peak RSS) of pid, in KiB.
func memKiB(t *testing.T, pid int) (rss, hwm int64) {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || (k != "VmRSS" && k != "VmHWM") {
			continue
		}
		n, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		if err != nil {
			t.Fatalf("/proc/%d/status %s: %v", pid, k, err)
		}
		if k == "VmRSS" {
			rss = n
		} else {
			hwm = n
		}
	}
	if rss == 0 || hwm == 0 {
		t.Fatalf("/proc/%d/status: no VmRSS/VmHWM", pid)
	}
	return rss, hwm
}

// gzipBomb is a gzip body of a JSON message prefix+<size bytes of 'a'>+suffix:
// concatenated gzip members (one per 64 MiB, which gzip readers inflate as
// one stream), about 1/1000 of size on the wire.
func gzipBomb(t *testing.T, prefix string, size int64, suffix string) []byte {
	t.Helper()
	member := func(b []byte) []byte {
		var buf bytes.Buffer
		w, _ := gzip.NewWriterLevel(&buf, gzip.BestCompression)
		w.Write(b)
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
		return buf.Bytes()
	}
	const chunk = 64 << 20
	filler := member(bytes.Repeat([]byte{'a'}, chunk))
	out := member([]byte(prefix))
	for range size / chunk {
		out = append(out, filler...)
	}
	return append(out, member([]byte(suffix))...)
}

// refusal is what a refused call answered.
type refusal struct {
	status int
	code   string // Connect error code, or the gRPC status as a number
}

// connectCall posts body as a Connect unary JSON call; chunked hides its
// length (no Content-Length), so that the server learns it by reading.
func connectCall(t *testing.T, c *http.Client, url string, body []byte, gzipped, chunked bool) refusal {
	t.Helper()
	var r io.Reader = bytes.NewReader(body)
	if chunked {
		r = io.MultiReader(r)
	}
	req, _ := http.NewRequest(http.MethodPost, url, r)
	req.Header.Set("Content-Type", "application/json")
	if gzipped {
		req.Header.Set("Content-Encoding", "gzip")
	}
	resp, err := c.Do(req)
	if err != nil {
		// The server may close the connection on a body over its limit
		// while the client still writes; the answer is then lost, not the point.
		t.Fatalf("POST %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	var e struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	}
	_ = json.Unmarshal(b, &e)
	t.Logf("Connect %s (%d bytes%s%s): HTTP %d %s: %s", url, len(body), map[bool]string{true: ", gzip"}[gzipped], map[bool]string{true: ", chunked"}[chunked], resp.StatusCode, e.Code, e.Message)
	return refusal{resp.StatusCode, e.Code}
}

// grpcCall sends msg, gzip-compressed by the caller, as one gRPC message
// over cleartext HTTP/2 (grpc-encoding: gzip).
func grpcCall(t *testing.T, c *http.Client, url string, compressed []byte) refusal {
	t.Helper()
	var env bytes.Buffer
	env.WriteByte(1) // compressed
	binary.Write(&env, binary.BigEndian, uint32(len(compressed)))
	env.Write(compressed)
	req, _ := http.NewRequest(http.MethodPost, url, &env)
	req.Header.Set("Content-Type", "application/grpc+json")
	req.Header.Set("Grpc-Encoding", "gzip")
	req.Header.Set("Te", "trailers")
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("gRPC %s: %v", url, err)
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	st, msg := resp.Trailer.Get("Grpc-Status"), resp.Trailer.Get("Grpc-Message")
	if st == "" { // trailers-only answer
		st, msg = resp.Header.Get("Grpc-Status"), resp.Header.Get("Grpc-Message")
	}
	t.Logf("gRPC %s (%d bytes, gzip): HTTP %d grpc-status %s: %s", url, env.Len()+len(compressed), resp.StatusCode, st, msg)
	return refusal{resp.StatusCode, st}
}

func TestBoundedRequests(t *testing.T) {
	root := t.TempDir()
	addr := freePort(t)
	server := "https://" + addr
	ctl := controllerProc(t, addr, filepath.Join(root, "ctl"))
	agentAddr := freePort(t)
	ag := agentProc(t, server, "h1", "z1", "c1", filepath.Join(root, "a1"), "--listen", agentAddr)
	waitFor(t, "h1 Up", 20*time.Second, func() bool { return hostState(t, server, "h1") == "HOST_STATE_UP" })

	const tenMiB = 10 << 20
	const bombSize = 1 << 30 // inflated
	for _, target := range []struct {
		name           string
		p              *proc
		base, rpc      string
		prefix, suffix string
	}{
		{"controller", ctl, server, "/stowage.v1.VolumeService/CreateVolume", `{"name":"`, `","size":"1048576"}`},
		{"agent", ag, "https://" + agentAddr, "/stowage.v1.AgentService/RunTask", `{"task":{"id":"`, `"}}`},
	} {
		t.Run(target.name, func(t *testing.T) {
			pid, url := target.p.cmd.Process.Pid, target.base+target.rpc
			// The agent answers its controller only: call it as one.
			c := testClient(t, server)
			if target.name == "agent" {
				c = asController(t, server)
			}
			big := append(append([]byte(target.prefix), bytes.Repeat([]byte{'a'}, tenMiB)...), target.suffix...)
			bomb := gzipBomb(t, target.prefix, bombSize, target.suffix)
			rss0, hwm0 := memKiB(t, pid)

			for _, r := range []refusal{
				connectCall(t, c, url, big, false, false), // refused by its Content-Length
				connectCall(t, c, url, big, false, true),  // by connect's read limit
				connectCall(t, c, url, bomb, true, false), // by the decompression limit
			} {
				if r.status != http.StatusTooManyRequests || r.code != "resource_exhausted" {
					t.Errorf("refused with HTTP %d %q, want 429 resource_exhausted", r.status, r.code)
				}
			}
			if r := grpcCall(t, c, url, bomb); r.code != "8" {
				t.Errorf("gRPC bomb: grpc-status %q, want 8 (RESOURCE_EXHAUSTED)", r.code)
			}
			// The process still serves.
			resp, err := c.Get(target.base + "/healthz")
			if err != nil || resp.StatusCode != http.StatusOK {
				t.Fatalf("%s /healthz after the refusals: %v", target.name, err)
			}
			resp.Body.Close()

			rss1, hwm1 := memKiB(t, pid)
			t.Logf("%s pid %d: bomb %d KiB on the wire -> %d MiB inflated; VmRSS %d -> %d KiB, VmHWM %d -> %d KiB (+%d KiB)",
				target.name, pid, len(bomb)>>10, bombSize>>20, rss0, rss1, hwm0, hwm1, hwm1-hwm0)
			// A race-built process (the tests run with -race) keeps shadow
			// memory for all it touches: the same refusals cost it about
			// 110-135 MiB (about 43 without). Both bounds are far below the
			// 1 GiB an unbounded inflate would take.
			bound := int64(64 << 10)
			if raceEnabled {
				bound = 256 << 10
			}
			if grew := hwm1 - hwm0; grew >= bound {
				t.Errorf("%s peak RSS grew by %d MiB, want < %d MiB", target.name, grew>>10, bound>>10)
			}
		})
	}
}
