package rpclimit

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// echo serves /test.Echo/Echo, answering the size of the bytes it got.
func echo(t *testing.T, l Limits) *httptest.Server {
	t.Helper()
	mux := http.NewServeMux()
	mux.Handle("/test.Echo/Echo", connect.NewUnaryHandler("/test.Echo/Echo",
		func(_ context.Context, r *connect.Request[wrapperspb.BytesValue]) (*connect.Response[wrapperspb.Int64Value], error) {
			return connect.NewResponse(wrapperspb.Int64(int64(len(r.Msg.GetValue())))), nil
		}, l.HandlerOptions()))
	srv := httptest.NewUnstartedServer(l.Wrap(mux))
	srv.Config = NewServer(srv.Config.Handler, nil)
	srv.Start()
	t.Cleanup(srv.Close)
	return srv
}

// post sends body as a Connect unary call and returns the HTTP status and
// the Connect error code ("" on success).
func post(t *testing.T, url string, body []byte, encoding string, chunked bool) (int, string) {
	t.Helper()
	var r io.Reader = bytes.NewReader(body)
	if chunked {
		r = io.MultiReader(r) // no Content-Length
	}
	req, _ := http.NewRequest(http.MethodPost, url+"/test.Echo/Echo", r)
	req.Header.Set("Content-Type", "application/proto")
	if encoding != "" {
		req.Header.Set("Content-Encoding", encoding)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode == http.StatusOK {
		return resp.StatusCode, ""
	}
	code, _, _ := strings.Cut(strings.TrimPrefix(string(b), `{"code":"`), `"`)
	return resp.StatusCode, code
}

func message(t *testing.T, n int) []byte {
	b, err := proto.Marshal(wrapperspb.Bytes(bytes.Repeat([]byte{'a'}, n)))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func gz(t *testing.T, b []byte) []byte {
	var buf bytes.Buffer
	w, _ := gzip.NewWriterLevel(&buf, gzip.BestCompression)
	w.Write(b)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestLimits(t *testing.T) {
	const limit = 1 << 20
	srv := echo(t, Limits{MaxRequestBytes: limit})
	for _, tc := range []struct {
		name     string
		body     []byte
		encoding string
		code     string
	}{
		{"small", message(t, 1000), "", ""},
		{"small gzip", gz(t, message(t, limit-100)), "gzip", ""},
		{"too large", message(t, 2*limit), "", "resource_exhausted"},
		{"too large once inflated", gz(t, message(t, 64*limit)), "gzip", "resource_exhausted"},
		{"compressed body over the limit", gz(t, randomish(3*limit)), "gzip", "resource_exhausted"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, chunked := range []bool{false, true} {
				status, code := post(t, srv.URL, tc.body, tc.encoding, chunked)
				if code != tc.code {
					t.Fatalf("chunked %v: HTTP %d, code %q, want %q", chunked, status, code, tc.code)
				}
				if tc.code == "resource_exhausted" && status != http.StatusTooManyRequests {
					t.Fatalf("chunked %v: HTTP %d, want 429", chunked, status)
				}
			}
		})
	}
}

// randomish is incompressible filler.
func randomish(n int) []byte {
	b := make([]byte, n)
	x := uint64(0x9e3779b97f4a7c15)
	for i := range b {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		b[i] = byte(x)
	}
	return b
}

// TestCappedGzipStopsInflating: past its limit the decompressor fails
// instead of inflating the rest of a bomb (what connect-go would drain).
func TestCappedGzipStopsInflating(t *testing.T) {
	bomb := gz(t, make([]byte, 256<<20))
	c := &cappedGzip{limit: 1<<20 + 1}
	if err := c.Reset(bytes.NewReader(bomb)); err != nil {
		t.Fatal(err)
	}
	n, err := io.Copy(io.Discard, c)
	if !errors.Is(err, errTooLarge) || n != 1<<20+1 {
		t.Fatalf("inflated %d bytes, err %v; want %d and errTooLarge", n, err, 1<<20+1)
	}
	// Reused from the pool for a small message, it reads it whole.
	if err := c.Reset(bytes.NewReader(gz(t, []byte("hello")))); err != nil {
		t.Fatal(err)
	}
	if b, err := io.ReadAll(c); err != nil || string(b) != "hello" {
		t.Fatalf("got %q, %v", b, err)
	}
}

// TestSlowBody: a body that stalls past BodyTimeout ends the request; a
// handler that runs long after reading its body is not cut.
func TestSlowBody(t *testing.T) {
	l := Limits{MaxRequestBytes: 1 << 20, BodyTimeout: 200 * time.Millisecond}
	mux := http.NewServeMux()
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		if _, err := io.ReadAll(r.Body); err != nil {
			http.Error(w, err.Error(), http.StatusRequestTimeout)
			return
		}
		select {
		case <-time.After(500 * time.Millisecond):
			io.WriteString(w, "done")
		case <-r.Context().Done():
			http.Error(w, "cancelled", http.StatusInternalServerError)
		}
	})
	srv := httptest.NewUnstartedServer(l.Wrap(mux))
	srv.Config = NewServer(srv.Config.Handler, nil)
	srv.Start()
	defer srv.Close()

	resp, err := http.Post(srv.URL+"/slow", "text/plain", strings.NewReader("quick"))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(b) != "done" {
		t.Fatalf("long handler after a quick body: %d %q", resp.StatusCode, b)
	}

	pr, pw := io.Pipe()
	go func() {
		pw.Write([]byte("a"))
		time.Sleep(2 * time.Second)
		pw.Close()
	}()
	start := time.Now()
	resp, err = http.Post(srv.URL+"/slow", "text/plain", pr)
	if err == nil {
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			t.Fatalf("a stalled body was read to the end")
		}
	}
	if d := time.Since(start); d > 1500*time.Millisecond {
		t.Fatalf("a stalled body held the request %s", d)
	}
}
