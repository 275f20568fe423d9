package failover

import (
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
)

// TestFollowsTheLeader: a dead controller is skipped, a follower's refusal
// is re-sent to the leader it names with the same body, and the next
// request goes straight to the leader.
func TestFollowsTheLeader(t *testing.T) {
	var leaderHits, followerHits atomic.Int32
	leader := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		leaderHits.Add(1)
		b, _ := io.ReadAll(r.Body)
		io.WriteString(w, "leader got "+string(b)+" at "+r.URL.Path)
	}))
	defer leader.Close()
	follower := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		followerHits.Add(1)
		w.Header().Set(LeaderHeader, leader.URL)
		http.Error(w, `{"code":"unavailable"}`, http.StatusServiceUnavailable)
	}))
	defer follower.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "http://" + ln.Addr().String()
	ln.Close()

	tr, err := New(http.DefaultTransport, []string{dead, follower.URL})
	if err != nil {
		t.Fatal(err)
	}
	c := &http.Client{Transport: tr}
	for i := range 2 {
		resp, err := c.Post(tr.BaseURL()+"/svc/Create", "text/plain", strings.NewReader("body"))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(b) != "leader got body at /svc/Create" {
			t.Fatalf("request %d: %q", i, b)
		}
	}
	if leaderHits.Load() != 2 || followerHits.Load() != 1 || tr.Current() != leader.URL {
		t.Fatalf("leader %d, follower %d hits, current %s", leaderHits.Load(), followerHits.Load(), tr.Current())
	}
}

// TestNoLeader: when every controller is down the error says so; a
// follower naming itself is returned as it is.
func TestNoLeader(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "http://" + ln.Addr().String()
	ln.Close()
	tr, err := New(http.DefaultTransport, []string{dead})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := (&http.Client{Transport: tr}).Get(tr.BaseURL() + "/x"); err == nil || !strings.Contains(err.Error(), "no controller of 1 answered") {
		t.Fatalf("all down: %v", err)
	}
	var self *httptest.Server
	self = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set(LeaderHeader, self.URL)
		http.Error(w, "no leader", http.StatusServiceUnavailable)
	}))
	defer self.Close()
	tr, _ = New(http.DefaultTransport, []string{self.URL})
	resp, err := (&http.Client{Transport: tr}).Get(tr.BaseURL() + "/x")
	if err != nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("self-named leader: %v %v", resp, err)
	}
	resp.Body.Close()
	if _, err := New(nil, Split(" , ")); err == nil {
		t.Fatal("an empty list was accepted")
	}
}
