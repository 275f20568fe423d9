package api

import (
	"fmt"
	"testing"

	"connectrpc.com/connect"

	"github.com/stowage/stowage/controller/meta"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/rpclimit"
)

// Paging through ListVolumes sees every volume that existed when it began
// exactly once and in id order, even while volumes are added between
// pages; the last page has no token.
func TestListVolumesPagesWhileAdding(t *testing.T) {
	e := newEdge(t, false, rpclimit.Limits{})
	want := map[string]bool{}
	for i := range 7 {
		want[e.volume(fmt.Sprintf("v%d", i)).GetId()] = true
	}
	seen := map[string]int{}
	last, token, pages := "", "", 0
	for ; pages < 20; pages++ {
		resp, err := e.volumes.ListVolumes(e.ctx, connect.NewRequest(&stowagev1.ListVolumesRequest{PageSize: 3, PageToken: token}))
		if err != nil {
			t.Fatalf("page %d: %v", pages, err)
		}
		if n := len(resp.Msg.GetVolumes()); n > 3 || (n == 0 && resp.Msg.GetNextPageToken() != "") {
			t.Fatalf("page %d: %d volumes, token %q", pages, n, resp.Msg.GetNextPageToken())
		}
		for _, v := range resp.Msg.GetVolumes() {
			if v.GetId() <= last {
				t.Fatalf("page %d: %s after %s: out of order", pages, v.GetId(), last)
			}
			last = v.GetId()
			seen[v.GetId()]++
		}
		if pages < 2 { // two more volumes arrive after each of the first two pages
			e.volume(fmt.Sprintf("late%da", pages))
			e.volume(fmt.Sprintf("late%db", pages))
		}
		if token = resp.Msg.GetNextPageToken(); token == "" {
			break
		}
	}
	if token != "" {
		t.Fatalf("no last page after %d pages", pages)
	}
	for id := range want {
		if seen[id] != 1 {
			t.Errorf("volume %s seen %d times", id, seen[id])
		}
	}
	for id, n := range seen {
		if n != 1 {
			t.Errorf("volume %s seen %d times", id, n)
		}
	}
	if len(seen) != 11 { // the 7, and the 4 added behind the pages read
		t.Errorf("saw %d volumes, want 11", len(seen))
	}

	// A page that holds exactly the rest has no token.
	all, err := e.volumes.ListVolumes(e.ctx, connect.NewRequest(&stowagev1.ListVolumesRequest{PageSize: 11}))
	if err != nil || len(all.Msg.GetVolumes()) != 11 || all.Msg.GetNextPageToken() != "" {
		t.Fatalf("a page of exactly 11: %d volumes, token %q, %v", len(all.Msg.GetVolumes()), all.Msg.GetNextPageToken(), err)
	}
}

// A token is bound to the filters it was issued with; a malformed one, a
// negative page size or a token from another list are invalid_argument.
func TestListPageTokenRefused(t *testing.T) {
	e := newEdge(t, false, rpclimit.Limits{})
	for i := range 3 {
		e.volume(fmt.Sprintf("v%d", i))
	}
	first, err := e.volumes.ListVolumes(e.ctx, connect.NewRequest(&stowagev1.ListVolumesRequest{PageSize: 1}))
	if err != nil || first.Msg.GetNextPageToken() == "" {
		t.Fatalf("first page: %v %v", first, err)
	}
	tok := first.Msg.GetNextPageToken()
	for name, call := range map[string]func() error{
		"other filter": func() error {
			_, err := e.volumes.ListVolumes(e.ctx, connect.NewRequest(&stowagev1.ListVolumesRequest{PageSize: 1, PageToken: tok, StoreId: e.primary.GetId()}))
			return err
		},
		"other list": func() error {
			_, err := e.snapshots.ListSnapshots(e.ctx, connect.NewRequest(&stowagev1.ListSnapshotsRequest{PageToken: tok}))
			return err
		},
		"garbage": func() error {
			_, err := e.volumes.ListVolumes(e.ctx, connect.NewRequest(&stowagev1.ListVolumesRequest{PageToken: "not-a-token!"}))
			return err
		},
		"negative size": func() error {
			_, err := e.volumes.ListVolumes(e.ctx, connect.NewRequest(&stowagev1.ListVolumesRequest{PageSize: -1}))
			return err
		},
	} {
		if connect.CodeOf(call()) != connect.CodeInvalidArgument {
			t.Errorf("%s: want invalid_argument, got %v", name, call())
		}
	}
	// The same filters with another page size keep the token good.
	if _, err := e.volumes.ListVolumes(e.ctx, connect.NewRequest(&stowagev1.ListVolumesRequest{PageSize: 2, PageToken: tok})); err != nil {
		t.Fatalf("same filters, other page size: %v", err)
	}
}

// Volume and snapshot filters are applied on the controller, page by page.
func TestListFilters(t *testing.T) {
	e := newEdge(t, false, rpclimit.Limits{})
	a := e.volume("a")
	e.volume("b")
	e.volume("a") // names are not unique
	if _, err := e.db.Volumes().Create(e.ctx, &stowagev1.Volume{Id: meta.NewID(), Name: "new", Size: 1, StoreId: e.primary.GetId()}); err != nil {
		t.Fatal(err)
	}
	count := func(req *stowagev1.ListVolumesRequest) int {
		t.Helper()
		n := 0
		for i := 0; i < 10; i++ {
			resp, err := e.volumes.ListVolumes(e.ctx, connect.NewRequest(req))
			if err != nil {
				t.Fatal(err)
			}
			n += len(resp.Msg.GetVolumes())
			if req.PageToken = resp.Msg.GetNextPageToken(); req.PageToken == "" {
				return n
			}
		}
		t.Fatal("too many pages")
		return 0
	}
	for _, c := range []struct {
		req  *stowagev1.ListVolumesRequest
		want int
	}{
		{&stowagev1.ListVolumesRequest{PageSize: 1}, 4},
		{&stowagev1.ListVolumesRequest{PageSize: 1, Name: "a"}, 2},
		{&stowagev1.ListVolumesRequest{PageSize: 1, State: stowagev1.VolumeState_VOLUME_STATE_READY}, 3},
		{&stowagev1.ListVolumesRequest{PageSize: 1, State: stowagev1.VolumeState_VOLUME_STATE_ALLOCATED}, 1},
		{&stowagev1.ListVolumesRequest{StoreId: e.primary.GetId(), Name: "b"}, 1},
		{&stowagev1.ListVolumesRequest{StoreId: "elsewhere"}, 0},
		{&stowagev1.ListVolumesRequest{TemplateId: "none"}, 0},
	} {
		if got := count(c.req); got != c.want {
			t.Errorf("%v: %d volumes, want %d", c.req, got, c.want)
		}
	}

	for i := range 3 {
		if _, err := e.db.Snapshots().Create(e.ctx, &stowagev1.Snapshot{Id: meta.NewID(), VolumeId: a.GetId(), Name: fmt.Sprint("s", i), Method: "qcow2-external"}); err != nil {
			t.Fatal(err)
		}
	}
	var got []string
	tok := ""
	for i := 0; i < 10; i++ {
		resp, err := e.snapshots.ListSnapshots(e.ctx, connect.NewRequest(&stowagev1.ListSnapshotsRequest{VolumeId: a.GetId(), PageSize: 2, PageToken: tok,
			State: stowagev1.SnapshotState_SNAPSHOT_STATE_ALLOCATED}))
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range resp.Msg.GetSnapshots() {
			got = append(got, s.GetName())
		}
		if tok = resp.Msg.GetNextPageToken(); tok == "" {
			break
		}
	}
	if fmt.Sprint(got) != "[s0 s1 s2]" {
		t.Errorf("snapshots of a, Allocated, two a page: %v", got)
	}
	none, err := e.snapshots.ListSnapshots(e.ctx, connect.NewRequest(&stowagev1.ListSnapshotsRequest{State: stowagev1.SnapshotState_SNAPSHOT_STATE_BACKED_UP}))
	if err != nil || len(none.Msg.GetSnapshots()) != 0 {
		t.Errorf("BackedUp snapshots: %v %v", none, err)
	}
}

// Hosts, stores, templates and jobs page the same way; ListJobs's limit
// keeps its meaning (the newest jobs, newest first).
func TestListOtherKindsPage(t *testing.T) {
	e := newEdge(t, false, rpclimit.Limits{})
	for i := range 3 {
		if _, err := e.images.RegisterTemplate(e.ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{Name: fmt.Sprint("t", i),
			Url: "https://example.com/t.qcow2", Format: stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2, Zone: "z1"})); err != nil {
			t.Fatal(err)
		}
	}
	type page struct {
		n     int
		token string
	}
	for name, list := range map[string]func(token string) (page, error){
		"stores": func(tok string) (page, error) {
			r, err := e.stores.ListStores(e.ctx, connect.NewRequest(&stowagev1.ListStoresRequest{PageSize: 1, PageToken: tok}))
			if err != nil {
				return page{}, err
			}
			return page{len(r.Msg.GetStores()), r.Msg.GetNextPageToken()}, nil
		},
		"hosts": func(tok string) (page, error) {
			r, err := e.hosts.ListHosts(e.ctx, connect.NewRequest(&stowagev1.ListHostsRequest{PageSize: 1, PageToken: tok, State: stowagev1.HostState_HOST_STATE_UP}))
			if err != nil {
				return page{}, err
			}
			return page{len(r.Msg.GetHosts()), r.Msg.GetNextPageToken()}, nil
		},
		"templates": func(tok string) (page, error) {
			r, err := e.images.ListTemplates(e.ctx, connect.NewRequest(&stowagev1.ListTemplatesRequest{PageSize: 1, PageToken: tok}))
			if err != nil {
				return page{}, err
			}
			return page{len(r.Msg.GetTemplates()), r.Msg.GetNextPageToken()}, nil
		},
		"jobs": func(tok string) (page, error) {
			r, err := e.jobs.ListJobs(e.ctx, connect.NewRequest(&stowagev1.ListJobsRequest{PageSize: 1, PageToken: tok}))
			if err != nil {
				return page{}, err
			}
			return page{len(r.Msg.GetJobs()), r.Msg.GetNextPageToken()}, nil
		},
	} {
		want := map[string]int{"stores": 2, "hosts": 1, "templates": 3, "jobs": 3}[name]
		total, tok := 0, ""
		for i := 0; i < 10; i++ {
			p, err := list(tok)
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			total += p.n
			if tok = p.token; tok == "" {
				break
			}
		}
		if total != want || tok != "" {
			t.Errorf("%s: %d records in pages of one (token %q), want %d", name, total, tok, want)
		}
	}

	all, err := e.jobs.ListJobs(e.ctx, connect.NewRequest(&stowagev1.ListJobsRequest{}))
	if err != nil || len(all.Msg.GetJobs()) != 3 {
		t.Fatalf("jobs: %v %v", all, err)
	}
	newest, err := e.jobs.ListJobs(e.ctx, connect.NewRequest(&stowagev1.ListJobsRequest{Limit: 2}))
	if err != nil || len(newest.Msg.GetJobs()) != 2 || newest.Msg.GetNextPageToken() != "" {
		t.Fatalf("jobs, limit 2: %v %v", newest, err)
	}
	if newest.Msg.GetJobs()[0].GetId() != all.Msg.GetJobs()[2].GetId() {
		t.Errorf("limit 2 starts with %s, want the newest %s", newest.Msg.GetJobs()[0].GetId(), all.Msg.GetJobs()[2].GetId())
	}
}
