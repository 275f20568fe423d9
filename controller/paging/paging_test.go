package paging

import (
	"testing"

	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

func id(s string) string { return s }

func TestTokenRoundTrip(t *testing.T) {
	req := &stowagev1.ListVolumesRequest{StoreId: "p1", PageSize: 2}
	p, err := Parse(req)
	if err != nil || p.Size != 2 || p.After != "" || p.Limit() != 3 {
		t.Fatalf("first page: %+v %v", p, err)
	}
	page, next := Cut(p, []string{"a", "b", "c"}, id)
	if len(page) != 2 || next == "" {
		t.Fatalf("cut: %v %q", page, next)
	}
	req.PageToken, req.PageSize = next, 0
	p, err = Parse(req)
	if err != nil || p.After != "b" || p.Size != DefaultSize {
		t.Fatalf("second page: %+v %v", p, err)
	}
	if page, next = Cut(p, []string{"c"}, id); len(page) != 1 || next != "" {
		t.Fatalf("last page: %v %q", page, next)
	}
	req.StoreId = "p2"
	if _, err := Parse(req); !errdefs.IsInvalid(err) {
		t.Fatalf("other filter: %v", err)
	}
}

func TestSizes(t *testing.T) {
	for in, want := range map[int32]int{0: DefaultSize, 1: 1, MaxSize: MaxSize, MaxSize + 1: MaxSize, 1 << 30: MaxSize} {
		if p, err := Parse(&stowagev1.ListHostsRequest{PageSize: in}); err != nil || p.Size != want {
			t.Errorf("page_size %d: %d %v, want %d", in, p.Size, err, want)
		}
	}
	if _, err := Parse(&stowagev1.ListHostsRequest{PageSize: -1}); !errdefs.IsInvalid(err) {
		t.Errorf("page_size -1: %v", err)
	}
	for _, tok := range []string{"%%%", "AQ", "AgAAAAAAAAAAYQ"} { // not base64, too short, wrong version
		if _, err := Parse(&stowagev1.ListHostsRequest{PageToken: tok}); !errdefs.IsInvalid(err) {
			t.Errorf("token %q: %v", tok, err)
		}
	}
}
