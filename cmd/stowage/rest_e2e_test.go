package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"connectrpc.com/connect"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// curlREST runs the real curl against a REST path of the controller at
// server with token ("" for none) and returns the HTTP status and body.
func curlREST(t *testing.T, server, method, path, token string) (int, string) {
	t.Helper()
	args := []string{"-s", "-o", "-", "-w", "\n%{http_code}", "--cacert", caFile(server), "-X", method}
	if token != "" {
		args = append(args, "-H", "Authorization: Bearer "+token)
	}
	out, err := exec.Command("curl", append(args, server+path)...).Output()
	if err != nil {
		t.Fatalf("curl %s %s: %v", method, path, err)
	}
	s := strings.TrimRight(string(out), "\n")
	i := strings.LastIndex(s, "\n")
	var code int
	fmt.Sscan(s[i+1:], &code)
	return code, s[:i]
}

// TestRESTReadPaths: the read side as plain REST (GET /v1/...), through
// vanguard onto the same handlers, with the real curl: paging through the
// volumes, a job by id, filters, and the same authentication and error
// codes as the RPCs; writes are not exposed.
func TestRESTReadPaths(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	needTools(t, "curl")
	ctx := context.Background()
	root, server, _ := oneHost(t, nil, nil)
	a := newAPI(server)
	addStore(t, a, "p1", stowagev1.StoreRole_STORE_ROLE_PRIMARY, filepath.Join(root, "p1"), &stowagev1.Scope{Zone: "z1"})
	var jobID string
	for _, name := range []string{"v1", "v2", "v3"} {
		resp, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: name, Size: 8 << 20}))
		if err != nil {
			t.Fatal(err)
		}
		jobID = mustSucceed(t, a, resp.Msg.GetJob()).GetId()
	}
	var reader struct {
		Secret string `json:"secret"`
	}
	cliJSON(t, server, &reader, "token", "create", "--name", "rest", "--role", "reader")
	tok := reader.Secret

	// Paging through the volumes, two to a page.
	var names []string
	pageToken := ""
	pages := 0
	for {
		path := "/v1/volumes?page_size=2"
		if pageToken != "" {
			path += "&page_token=" + pageToken
		}
		code, body := curlREST(t, server, "GET", path, tok)
		if code != 200 {
			t.Fatalf("GET %s: %d %s", path, code, body)
		}
		var page struct {
			Volumes []struct {
				Name  string `json:"name"`
				State string `json:"state"`
			} `json:"volumes"`
			NextPageToken string `json:"nextPageToken"`
		}
		if err := json.Unmarshal([]byte(body), &page); err != nil {
			t.Fatalf("GET %s: %v: %s", path, err, body)
		}
		pages++
		for _, v := range page.Volumes {
			if v.State != "VOLUME_STATE_READY" {
				t.Errorf("volume %s: %s", v.Name, v.State)
			}
			names = append(names, v.Name)
		}
		if pageToken = page.NextPageToken; pageToken == "" || pages > 5 {
			break
		}
	}
	if strings.Join(names, ",") != "v1,v2,v3" || pages != 2 {
		t.Errorf("paged volumes: %v in %d pages, want the three in two", names, pages)
	}
	// A filter, by query parameter.
	if code, body := curlREST(t, server, "GET", "/v1/volumes?name=v2", tok); code != 200 || strings.Count(body, `"name"`) != 1 || !strings.Contains(body, `"v2"`) {
		t.Errorf("GET /v1/volumes?name=v2: %d %s", code, body)
	}
	// A job by id.
	code, body := curlREST(t, server, "GET", "/v1/jobs/"+jobID, tok)
	var job struct {
		Job struct {
			ID    string `json:"id"`
			State string `json:"state"`
			Kind  string `json:"kind"`
		} `json:"job"`
	}
	if err := json.Unmarshal([]byte(body), &job); code != 200 || err != nil || job.Job.ID != jobID || job.Job.State != "JOB_STATE_SUCCEEDED" || job.Job.Kind != "volume.create" {
		t.Errorf("GET /v1/jobs/%s: %d %v %s", jobID, code, err, body)
	}
	if code, body := curlREST(t, server, "GET", "/v1/stores/p1", tok); code != 200 || !strings.Contains(body, `"STORE_STATE_UP"`) {
		t.Errorf("GET /v1/stores/p1: %d %s", code, body)
	}

	// The RPCs' errors, as HTTP statuses with a google.rpc.Status JSON body
	// (the HTTP/JSON transcoding convention: the numeric gRPC code).
	for _, tc := range []struct {
		method, path, token string
		code                int
		want                string
	}{
		{"GET", "/v1/volumes", "", 401, `"code":16`},                                   // unauthenticated
		{"GET", "/v1/volumes", "stw_wrong", 401, `"code":16`},                          // unauthenticated
		{"GET", "/v1/jobs/01a00000-0000-7000-8000-000000000000", tok, 404, `"code":5`}, // not found
		{"GET", "/v1/volumes?page_size=-1", tok, 400, `"code":3`},                      // invalid argument
		{"GET", "/v1/volumes?state=VOLUME_STATE_NONSENSE", tok, 400, `"code":3`},
		{"DELETE", "/v1/volumes/v1", tok, 405, "Method Not Allowed"}, // writes are RPCs only
		{"POST", "/v1/volumes", tok, 405, "Method Not Allowed"},
		{"GET", "/v1/nothing", tok, 404, `"not_found"`},
	} {
		code, body := curlREST(t, server, tc.method, tc.path, tc.token)
		if code != tc.code || !strings.Contains(strings.ReplaceAll(body, " ", ""), strings.ReplaceAll(tc.want, " ", "")) {
			t.Errorf("%s %s: %d %s, want %d %s", tc.method, tc.path, code, body, tc.code, tc.want)
		}
	}
	// Nothing was deleted.
	if code, body := curlREST(t, server, "GET", "/v1/volumes/v1", tok); code != 200 {
		t.Errorf("GET /v1/volumes/v1 after the refused DELETE: %d %s", code, body)
	}
}
