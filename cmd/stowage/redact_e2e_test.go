package main

// Secrets never leak (issue 12): templates registered from URLs that carry a
// password and presigned query values, as real processes; every API reply,
// CLI output, process log and agent journal is searched for those secrets.

import (
	"context"
	"crypto/subtle"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// The secrets of the test: none may appear anywhere but in the requests
// that carry them to the template server.
var urlSecrets = []string{"S3cr3tPw", "SECRETSIG", "SECRETTOK"}

func TestSecretsNeverLeakEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	needTools(t, "qemu-img", "qemu-io")
	root := t.TempDir()
	ctx := context.Background()
	_, qcow := patternedQcow2(t, root, "write -P 0x33 10M 2M")

	// The template server wants basic auth and a presigned signature, like
	// a private bucket behind a presigned URL; /go redirects to the file
	// with the signature (the token rides on the first request only).
	var served, refused atomic.Int32
	mux := http.NewServeMux()
	mux.HandleFunc("/t.qcow2", func(w http.ResponseWriter, r *http.Request) {
		user, pw, ok := r.BasicAuth()
		if !ok || user != "user" || subtle.ConstantTimeCompare([]byte(pw), []byte("S3cr3tPw")) != 1 ||
			r.URL.Query().Get("X-Amz-Signature") != "SECRETSIG" {
			refused.Add(1)
			http.Error(w, "SignatureDoesNotMatch", http.StatusForbidden)
			return
		}
		served.Add(1)
		http.ServeFile(w, r, qcow)
	})
	mux.HandleFunc("/go", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("token") != "SECRETTOK" {
			http.Error(w, "no token", http.StatusForbidden)
			return
		}
		http.Redirect(w, r, "/t.qcow2?X-Amz-Signature=SECRETSIG", http.StatusFound)
	})
	web := httptest.NewServer(mux) // loopback
	defer web.Close()
	hostPort := strings.TrimPrefix(web.URL, "http://")
	secretURL := "http://user:S3cr3tPw@" + hostPort + "/t.qcow2?X-Amz-Signature=SECRETSIG"
	noSigURL := "http://user:S3cr3tPw@" + hostPort + "/t.qcow2?token=SECRETTOK"
	redirURL := "http://user:S3cr3tPw@" + hostPort + "/go?token=SECRETTOK"
	sum := "sha256:" + sha256File(t, qcow)

	addr := freePort(t)
	server := "https://" + addr
	procs := []*proc{controllerProc(t, addr, filepath.Join(root, "controller"), "--log-level", "debug")}
	var h1Extra []string
	if os.Geteuid() == 0 {
		if _, err := os.Stat("/dev/fuse"); err == nil {
			c := startCache(t, "cache h1", filepath.Join(root, "c1"), "--log-level", "debug", "--pki-dir", filepath.Join(root, "a1", "pki"))
			procs = append(procs, c.proc)
			h1Extra = []string{"--image-cache-socket", c.socket}
		}
	}
	procs = append(procs,
		agentProc(t, server, "h1", "z1", "c1", filepath.Join(root, "a1"), append(h1Extra, "--log-level", "debug")...),
		agentProc(t, server, "h2", "z1", "c1", filepath.Join(root, "a2"), "--log-level", "debug"))
	waitFor(t, "both hosts Up", 20*time.Second, func() bool {
		return hostState(t, server, "h1") == "HOST_STATE_UP" && hostState(t, server, "h2") == "HOST_STATE_UP"
	})
	a := newAPI(server)
	addStore(t, a, "img", stowagev1.StoreRole_STORE_ROLE_IMAGE, filepath.Join(root, "img"), &stowagev1.Scope{Zone: "z1"})

	// Every reply and output the test sees, by what it is.
	seen := map[string]string{}
	keep := func(what string, m proto.Message) {
		seen[what] = protojson.Format(m)
	}
	register := func(name, url, checksum string, dryRun bool) *stowagev1.RegisterTemplateResponse {
		t.Helper()
		resp, err := a.images.RegisterTemplate(ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{
			Name: name, Url: url, Format: stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2, Checksum: checksum, DryRun: dryRun}))
		if err != nil {
			t.Fatalf("register %s: %v", name, err)
		}
		keep("RegisterTemplate "+name, resp.Msg)
		return resp.Msg
	}

	// 1. A dry run plans the download and says from where, redacted.
	plan := register("dry", secretURL, sum, true)
	if reasons := seen["RegisterTemplate dry"]; !strings.Contains(reasons, "stream http://user:REDACTED@"+hostPort+"/t.qcow2?X-Amz-Signature=REDACTED") {
		t.Fatalf("dry-run plan does not name the redacted source: %s", reasons)
	}
	if plan.GetJob() != nil {
		t.Fatal("a dry run started a job")
	}

	// 2. The real URLs still work: the records keep them whole for the
	// download, the password and the signature reach the server.
	good := register("good", secretURL, sum, false)
	redir := register("redirected", redirURL, sum, false)
	mustSucceed(t, a, good.GetJob())
	mustSucceed(t, a, redir.GetJob())
	if served.Load() < 2 {
		t.Fatalf("the template server served %d authorised downloads, want 2", served.Load())
	}

	// 3. Failures whose messages quote the URL: a wrong checksum, and a
	// URL the server refuses (403).
	badSum := register("bad-sum", secretURL, "sha256:"+strings.Repeat("0", 64), false)
	refusedReg := register("refused", noSigURL, sum, false)
	var failed []*stowagev1.Job
	for _, j := range []*stowagev1.Job{badSum.GetJob(), refusedReg.GetJob()} {
		end := waitJob(t, a, j)
		if end.GetState() != stowagev1.JobState_JOB_STATE_FAILED {
			t.Fatalf("job %s: %s, want failed", j.GetId(), end.GetState())
		}
		failed = append(failed, end)
	}
	if e := failed[0].GetError(); !strings.Contains(strings.ToLower(e), "checksum") || !strings.Contains(e, "REDACTED") {
		t.Fatalf("wrong checksum: job error %q should say checksum and quote the redacted URL", e)
	}
	if e := failed[1].GetError(); !strings.Contains(e, "403") && !strings.Contains(strings.ToLower(e), "forbidden") {
		t.Fatalf("refused download: job error %q", e)
	}
	if refused.Load() == 0 {
		t.Fatal("the template server refused nothing")
	}
	t.Logf("job errors: %q, %q", failed[0].GetError(), failed[1].GetError())

	// 4. A URL refused by validation: the API error quotes it, redacted.
	_, err := a.images.RegisterTemplate(ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{
		Name: "ftp", Url: "ftp://user:S3cr3tPw@" + hostPort + "/t.qcow2?token=SECRETTOK", Format: stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2}))
	if code(err) != connect.CodeInvalidArgument {
		t.Fatalf("ftp URL: %v, want invalid_argument", err)
	}
	seen["RegisterTemplate ftp error"] = err.Error()

	// 5. Every read of the API.
	lt, err := a.images.ListTemplates(ctx, connect.NewRequest(&stowagev1.ListTemplatesRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	keep("ListTemplates", lt.Msg)
	if len(lt.Msg.GetTemplates()) != 4 {
		t.Fatalf("%d templates, want 4", len(lt.Msg.GetTemplates()))
	}
	for _, tm := range lt.Msg.GetTemplates() {
		g, err := a.images.GetTemplate(ctx, connect.NewRequest(&stowagev1.GetTemplateRequest{Id: tm.GetId()}))
		if err != nil {
			t.Fatal(err)
		}
		keep("GetTemplate "+tm.GetName(), g.Msg)
		if !strings.HasPrefix(g.Msg.GetTemplate().GetUrl(), "http://user:REDACTED@"+hostPort+"/") {
			t.Errorf("template %s url %q: want it shown redacted", tm.GetName(), g.Msg.GetTemplate().GetUrl())
		}
	}
	lj, err := a.jobs.ListJobs(ctx, connect.NewRequest(&stowagev1.ListJobsRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	keep("ListJobs", lj.Msg)
	var jobIDs []string
	for _, j := range lj.Msg.GetJobs() {
		g, err := a.jobs.GetJob(ctx, connect.NewRequest(&stowagev1.GetJobRequest{Id: j.GetId()}))
		if err != nil {
			t.Fatal(err)
		}
		keep("GetJob "+j.GetId(), g.Msg)
		keep("WatchJob "+j.GetId(), waitJob(t, a, j))
		jobIDs = append(jobIDs, j.GetId())
	}
	if len(jobIDs) != 4 {
		t.Fatalf("%d jobs, want 4", len(jobIDs))
	}

	// 6. The CLI: what a person sees, in every output form.
	cliOut := func(args ...string) {
		t.Helper()
		out, errOut, _ := cli(t, server, args...)
		seen["stowage "+strings.Join(args, " ")] = out + errOut
	}
	cliOut("template", "register", "--name", "cli-dry", "--url", secretURL, "--format", "qcow2", "--checksum", sum, "--dry-run", "-o", "json")
	cliOut("template", "register", "--name", "cli-dry-text", "--url", redirURL, "--format", "qcow2", "--checksum", sum, "--dry-run")
	cliOut("template", "register", "--name", "cli-ftp", "--url", "ftp://user:S3cr3tPw@h/t?token=SECRETTOK", "--format", "qcow2")
	cliOut("template", "list", "-o", "json")
	cliOut("template", "list")
	cliOut("job", "list", "-o", "json")
	for _, id := range jobIDs {
		cliOut("job", "get", id, "-o", "json")
		cliOut("job", "get", id)
	}
	for _, name := range []string{"good", "bad-sum", "refused", "redirected"} {
		cliOut("template", "get", name, "-o", "json")
		cliOut("template", "get", name)
	}
	if !strings.Contains(seen["stowage job get "+failed[0].GetId()+" -o json"], "REDACTED") {
		t.Fatalf("job get -o json of the failed job: %s", seen["stowage job get "+failed[0].GetId()+" -o json"])
	}

	// 7. The logs of every process, and what the agents keep on disk
	// (the task journal).
	for _, p := range procs {
		seen["log of "+p.name] = p.log.String()
	}
	for _, dir := range []string{"a1", "a2"} {
		_ = filepath.WalkDir(filepath.Join(root, dir), func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.Type().IsRegular() {
				if b, err := os.ReadFile(p); err == nil {
					seen["file "+p] = string(b)
				}
			}
			return nil
		})
	}

	for what, text := range seen {
		for _, s := range urlSecrets {
			if strings.Contains(text, s) {
				t.Errorf("%s leaks %s:\n%s", what, s, text)
			}
		}
	}
	if !strings.Contains(seen["log of controller"], "job failed") || !strings.Contains(seen["log of controller"], "REDACTED") {
		t.Errorf("the controller did not log the failed jobs with the redacted URL")
	}
	t.Logf("searched %d replies, outputs, logs and files for %v", len(seen), urlSecrets)
}
