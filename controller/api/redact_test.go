package api

import (
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/protojson"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

func TestRedactReply(t *testing.T) {
	const src = "http://user:S3cr3tPw@127.0.0.1:8080/t.qcow2?X-Amz-Signature=SECRETSIG&token=SECRETTOK"
	tmpl := &stowagev1.Template{Id: "t1", Url: src}
	job := &stowagev1.Job{Id: "j1", Error: "fetch " + src + ": data loss", Result: "from " + src,
		Plan: &stowagev1.Plan{Reasons: []string{"reason " + src}, Steps: []*stowagev1.PlanStep{{Name: "s", Reason: "stream " + src, Error: src}}}}
	for _, m := range []interface{ String() string }{
		redactReply(&stowagev1.GetTemplateResponse{Template: tmpl, Stores: []*stowagev1.TemplateOnStore{{Error: "fetch " + src}}}),
		redactReply(&stowagev1.ListTemplatesResponse{Templates: []*stowagev1.Template{tmpl}}),
		redactReply(&stowagev1.RegisterTemplateResponse{Template: tmpl, Job: job, Plan: job.GetPlan()}),
		redactReply(&stowagev1.ListJobsResponse{Jobs: []*stowagev1.Job{job}}),
		redactReply(&stowagev1.WatchJobResponse{Job: job}),
	} {
		s := m.String()
		for _, secret := range []string{"S3cr3tPw", "SECRETSIG", "SECRETTOK"} {
			if strings.Contains(s, secret) {
				t.Errorf("%s leaks: %s", secret, s)
			}
		}
		if !strings.Contains(s, "127.0.0.1:8080/t.qcow2") {
			t.Errorf("URL lost: %s", s)
		}
	}
	// The records the replies were made from keep their URL for the download.
	if tmpl.GetUrl() != src || !strings.Contains(job.GetError(), "S3cr3tPw") || !strings.Contains(job.GetPlan().GetReasons()[0], "SECRETSIG") {
		t.Errorf("a record was changed: %v %v", tmpl, job)
	}
	// A reply with nothing to hide is not copied; other fields stay.
	plain := &stowagev1.GetTemplateResponse{Template: &stowagev1.Template{Id: "t2", Url: "https://h/t.qcow2"}}
	if redactReply(plain) != plain {
		t.Error("a reply without secrets was copied")
	}
	grant := &stowagev1.GrantAccessResponse{Uri: "nbd://10.0.0.5:10809/3f2a"}
	if got := redactReply(grant); got.GetUri() != grant.GetUri() {
		t.Errorf("a granted URI was redacted: %s", protojson.Format(got))
	}
}

func TestReplyNeverCarriesAPassword(t *testing.T) {
	grant := &stowagev1.GrantAccessResponse{Uri: "iscsi://stw-1:s3cretCHAPsecret@10.0.0.5:3260/iqn.2026-12.org.x:s1/3?initiator=iqn.2026-12.org.stowage%3Ahost.h1"}
	got := redactReply(grant).GetUri()
	if strings.Contains(got, "s3cretCHAPsecret") || !strings.Contains(got, "stw-1:") || !strings.Contains(got, "/iqn.2026-12.org.x:s1/3") {
		t.Fatalf("redacted grant: %q", got)
	}
	if grant.GetUri() == got {
		t.Fatal("the record was changed in place or not redacted")
	}
	nbd := &stowagev1.GrantAccessResponse{Uri: "nbds://10.0.0.5:10809/3f2a9c"}
	if redactReply(nbd).GetUri() != nbd.GetUri() {
		t.Fatalf("an NBD grant (no password) was changed: %q", redactReply(nbd).GetUri())
	}
}
