package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// TestTemplateURLPolicy: with real processes that allow no extra CIDRs, a
// template URL pointing at loopback (the controller's own API) is refused
// at dial time with the rule named, and a file:// URL is refused at
// registration (no --import-dir); nothing is written to the image store.
func TestTemplateURLPolicy(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	root := t.TempDir()
	addr := freePort(t)
	server := "https://" + addr
	controllers.Store(server, filepath.Join(root, "controller"))
	startProc(t, "controller", "controller", "--listen", addr, "--data-dir", filepath.Join(root, "controller"),
		"--heartbeat-interval", "200ms", "--host-timeout", "1500ms", "--log-level", "info")
	waitFor(t, "controller /healthz", 20*time.Second, func() bool {
		if _, err := os.Stat(caFile(server)); err != nil {
			return false
		}
		resp, err := httpGet(t, server, server+"/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
	token, pin := joinToken(t, server, "h1", time.Minute)
	startProc(t, "agent h1", "agent", "--controller", server, "--host-id", "h1", "--join-token", token, "--ca-pin", pin, "--listen", freePort(t), "--nbd-listen", "",
		"--zone", "z1", "--state-dir", filepath.Join(root, "a1"), "--store-roots", root, "--log-level", "info")
	waitFor(t, "h1 Up", 20*time.Second, func() bool { return hostState(t, server, "h1") == "HOST_STATE_UP" })
	a := newAPI(server)
	ctx := context.Background()
	img := addStore(t, a, "img", stowagev1.StoreRole_STORE_ROLE_IMAGE, filepath.Join(root, "img"), &stowagev1.Scope{Zone: "z1"})

	r, err := a.images.RegisterTemplate(ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{Name: "metadata",
		Url: server + "/healthz", Format: stowagev1.ImageFormat_IMAGE_FORMAT_RAW, Checksum: "sha256:" + strings.Repeat("0", 64)}))
	if err != nil {
		t.Fatalf("register: %v", err)
	}
	j := waitJob(t, a, r.Msg.GetJob())
	if j.GetState() != stowagev1.JobState_JOB_STATE_FAILED || !strings.Contains(j.GetError(), "loopback") || !strings.Contains(j.GetError(), "--fetch-allow-cidrs") {
		t.Fatalf("a template URL on loopback: job %s %q, want failed naming the rule", j.GetState(), j.GetError())
	}
	_, err = a.images.RegisterTemplate(ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{Name: "shadow",
		Url: "file:///etc/shadow", Format: stowagev1.ImageFormat_IMAGE_FORMAT_RAW}))
	if code(err) != connect.CodePermissionDenied || !strings.Contains(err.Error(), "--import-dir") || !strings.Contains(err.Error(), "none is configured") {
		t.Fatalf("file:///etc/shadow: %v, want permission_denied naming the rule (no --import-dir)", err)
	}
	if entries, _ := os.ReadDir(filepath.Join(img.GetDetails()["path"], "templates")); len(entries) != 0 {
		t.Fatalf("refused templates left %d files on the image store", len(entries))
	}
}
