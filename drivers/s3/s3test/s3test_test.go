package s3test

import (
	"bytes"
	"context"
	"errors"
	"syscall"
	"testing"

	"github.com/minio/minio-go/v7"
)

func TestServerCountsRequests(t *testing.T) {
	ctx := context.Background()
	var pid int
	t.Run("serve", func(t *testing.T) {
		s := Start(t)
		pid = s.PID()
		c := s.Client()
		for _, k := range []string{"a/1", "a/2", "b/1", "a/with space/3"} {
			if _, err := c.PutObject(ctx, s.Bucket, k, bytes.NewReader([]byte(k)), int64(len(k)), minio.PutObjectOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := c.StatObject(ctx, s.Bucket, "a/missing", minio.StatObjectOptions{}); err == nil {
			t.Fatal("stat of a missing key succeeded")
		}
		// Counted right after the calls returned: the server logs before answering.
		if n := s.CountRequests("PutObject", "a/"); n != 3 {
			t.Errorf("PutObject a/: %d, want 3", n)
		}
		if n := s.CountRequests("s3_PutObject", ""); n != 4 {
			t.Errorf("PutObject: %d, want 4", n)
		}
		if n := s.CountRequests("HeadObject", "a/"); n != 1 {
			t.Errorf("HeadObject a/: %d, want 1", n)
		}
		reqs, err := s.Requests()
		if err != nil {
			t.Fatal(err)
		}
		var sawSpace, saw404 bool
		for _, r := range reqs {
			if r.Key == "a/with space/3" && r.Bucket == s.Bucket && r.Status == 200 {
				sawSpace = true
			}
			if r.Operation == "HeadObject" && r.Status == 404 && r.ErrorCode == "NoSuchKey" {
				saw404 = true
			}
		}
		if !sawSpace || !saw404 {
			t.Errorf("requests %+v: want the key with a space and the 404", reqs)
		}
	})
	if pid == 0 {
		t.Skip("no server was started")
	}
	// The cleanup killed the process.
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("versitygw pid %d still exists after cleanup (kill 0: %v)", pid, err)
	}
}

func TestParseLogLine(t *testing.T) {
	line := `AK bkt1 [04/December/2026:12:22:39 +0000] 127.0.0.1 AK NM3M s3_CreateMultipartUpload big obj /bkt1/big%20obj?uploads= 200 - 207 0 0 0 - MinIO (linux; amd64) minio-go/v7.4.1 - X SigV4 - AuthHeader s3.us-east-1.amazonaws.com - arn:aws:s3:::/bkt1/big obj Yes`
	r, ok := parseLogLine(line)
	if !ok || r != (Request{Operation: "CreateMultipartUpload", Bucket: "bkt1", Key: "big obj", Status: 200}) {
		t.Errorf("got %+v %v", r, ok)
	}
	if _, ok := parseLogLine("log starts 2026-12-04 12:22:13.5 +0000 UTC m=+0.018"); ok {
		t.Error("header line parsed as a request")
	}
}
