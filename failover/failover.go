// Package failover is the client side of several controllers: an
// http.RoundTripper that sends each request to the controller that leads.
//
// Agents and the CLI are given every controller's URL. A request goes to
// the one that answered last; a controller that cannot be dialled is
// skipped for the next one; a follower that refuses a write names the
// leader in the Stowage-Leader response header (with a Connect
// "unavailable" error), and the request is sent there instead. Requests
// are re-sent only when the previous attempt surely did not run: the dial
// failed, or a follower refused it. Any other failure is returned, so a
// write is never sent twice.
package failover

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
)

// LeaderHeader is the response header a follower names the leader's URL in.
const LeaderHeader = "Stowage-Leader"

// maxBody is the largest request body kept for re-sending (API requests
// are small; bigger ones are sent once).
const maxBody = 8 << 20

// Transport is an http.RoundTripper over a list of controller URLs.
type Transport struct {
	base http.RoundTripper
	urls []*url.URL

	mu      sync.Mutex
	current *url.URL // the controller that answered last
}

// New returns a Transport over base that sends to urls (scheme and host of
// each request are replaced; the path is kept).
func New(base http.RoundTripper, urls []string) (*Transport, error) {
	t := &Transport{base: base}
	for _, s := range urls {
		u, err := parse(s)
		if err != nil {
			return nil, err
		}
		t.urls = append(t.urls, u)
	}
	if len(t.urls) == 0 {
		return nil, errors.New("failover: no controller URL")
	}
	t.current = t.urls[0]
	return t, nil
}

// Split parses a comma-separated list of controller URLs.
func Split(list string) []string {
	var out []string
	for _, s := range strings.Split(list, ",") {
		if s = strings.TrimSpace(s); s != "" {
			out = append(out, s)
		}
	}
	return out
}

func parse(s string) (*url.URL, error) {
	u, err := url.Parse(strings.TrimRight(s, "/"))
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("failover: controller URL %q: want http(s)://host:port", s)
	}
	return u, nil
}

// BaseURL is the URL to build Connect clients with: the first controller.
func (t *Transport) BaseURL() string { return t.urls[0].String() }

// Current is the controller requests go to now.
func (t *Transport) Current() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.current.String()
}

// next returns the controller after u in the list.
func (t *Transport) next(u *url.URL) *url.URL {
	for i, c := range t.urls {
		if c.Host == u.Host && c.Scheme == u.Scheme {
			return t.urls[(i+1)%len(t.urls)]
		}
	}
	return t.urls[0]
}

func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	body, err := replayable(req)
	if err != nil {
		return nil, err
	}
	// once: a body too big to keep: the request cannot be sent again.
	once := req.Body != nil && req.Body != http.NoBody && body == nil
	t.mu.Lock()
	target := t.current
	t.mu.Unlock()
	// Each controller once, plus a hop to a named leader per controller.
	tries := 2 * len(t.urls)
	var lastErr error
	for try := 0; try < tries; try++ {
		r := req.Clone(req.Context())
		r.URL.Scheme, r.URL.Host, r.Host = target.Scheme, target.Host, ""
		if body != nil {
			r.Body, r.ContentLength = io.NopCloser(bytes.NewReader(body)), int64(len(body))
			r.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
		}
		resp, err := t.base.RoundTrip(r)
		if err != nil {
			if req.Context().Err() != nil || !dialFailed(err) || once {
				return nil, err
			}
			lastErr = err
			target = t.next(target)
			t.pause(req.Context(), try)
			continue
		}
		if refused(resp) {
			leader, perr := parse(resp.Header.Get(LeaderHeader))
			if perr != nil || leader.Host == target.Host || once {
				return resp, nil // no leader to go to: the caller sees the refusal
			}
			_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
			resp.Body.Close()
			target = leader
			continue
		}
		t.mu.Lock()
		t.current = target
		t.mu.Unlock()
		return resp, nil
	}
	if lastErr == nil {
		lastErr = errors.New("no controller leads")
	}
	return nil, fmt.Errorf("failover: no controller of %d answered: %w", len(t.urls), lastErr)
}

// refused reports a follower's refusal naming a leader: a Connect error
// (an HTTP error status) or a gRPC trailers-only error (HTTP 200 with a
// non-zero Grpc-Status header).
func refused(resp *http.Response) bool {
	if resp.Header.Get(LeaderHeader) == "" {
		return false
	}
	if resp.StatusCode != http.StatusOK {
		return true
	}
	st := resp.Header.Get("Grpc-Status")
	return st != "" && st != "0"
}

// pause waits a little between full rounds of the list, so a client
// riding out an election does not spin.
func (t *Transport) pause(ctx context.Context, try int) {
	if (try+1)%len(t.urls) != 0 {
		return
	}
	tm := time.NewTimer(200 * time.Millisecond)
	defer tm.Stop()
	select {
	case <-ctx.Done():
	case <-tm.C:
	}
}

// replayable reads a request body that can be sent again; nil when there
// is none or it is too big (then the request is sent once).
func replayable(req *http.Request) ([]byte, error) {
	if req.Body == nil || req.Body == http.NoBody {
		return nil, nil
	}
	if req.ContentLength > maxBody {
		return nil, nil
	}
	b, err := io.ReadAll(io.LimitReader(req.Body, maxBody+1))
	req.Body.Close()
	if err != nil {
		return nil, fmt.Errorf("failover: read request body: %w", err)
	}
	if len(b) > maxBody {
		return nil, fmt.Errorf("failover: request body over %d bytes", maxBody)
	}
	if b == nil {
		b = []byte{}
	}
	return b, nil
}

// dialFailed reports an error from before the request was sent: the
// connection could not be made.
func dialFailed(err error) bool {
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return true
	}
	return false
}
