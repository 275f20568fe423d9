package s3conn

import (
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"strings"
	"syscall"
	"testing"

	"github.com/minio/minio-go/v7"

	"github.com/stowage/stowage/errdefs"
)

func TestConfig(t *testing.T) {
	c := Config{Endpoint: "http://127.0.0.1:9000", Bucket: "imgs", Prefix: "/a/b/", AccessKey: "AKIASECRETID", SecretKey: "s3cr3t"}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if got := c.Key("chunks/x"); got != "a/b/chunks/x" {
		t.Errorf("Key: %q", got)
	}
	if (Config{}).Key("x") != "x" {
		t.Error("Key without a prefix")
	}
	var sb strings.Builder
	slog.New(slog.NewTextHandler(&sb, nil)).Info("open", "store", c)
	for _, s := range []string{fmt.Sprintf("%v %+v %#v %s", c, c, c, c), sb.String()} {
		if strings.Contains(s, "s3cr3t") || strings.Contains(s, "AKIASECRETID") {
			t.Errorf("keys printed: %s", s)
		}
	}
	for _, bad := range []Config{
		{Endpoint: "ftp://h", Bucket: "imgs"},
		{Endpoint: "http://", Bucket: "imgs"},
		{Endpoint: "http://u:p@h", Bucket: "imgs"},
		{Endpoint: "http://h/path", Bucket: "imgs"},
		{Endpoint: "http://h", Bucket: "Bad_Bucket"},
		{Endpoint: "http://h", Bucket: "ab"},
		{Endpoint: "http://h", Bucket: "imgs", AccessKey: "only"},
		{Endpoint: "http://h", Bucket: "imgs", Prefix: "a/../b"},
	} {
		err := bad.Validate()
		if !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("%+v: %v, want invalid", bad, err)
		} else if strings.Contains(err.Error(), ":p@") {
			t.Errorf("error shows the URL password: %v", err)
		}
	}
}

func TestClass(t *testing.T) {
	for _, c := range []struct {
		err  error
		want error
	}{
		{minio.ErrorResponse{Code: "NoSuchKey", StatusCode: 404}, errdefs.ErrNotFound},
		{minio.ErrorResponse{Code: "AccessDenied", StatusCode: 403}, errdefs.ErrPermissionDenied},
		{minio.ErrorResponse{Code: "SlowDown", StatusCode: 503}, errdefs.ErrUnavailable},
		{minio.ErrorResponse{Code: "PreconditionFailed", StatusCode: 412}, errdefs.ErrFailedPrecondition},
		{minio.ErrorResponse{StatusCode: 404}, errdefs.ErrNotFound},
		{minio.ErrorResponse{StatusCode: 502}, errdefs.ErrUnavailable},
		{&url.Error{Op: "Get", URL: "http://h", Err: syscall.ECONNREFUSED}, errdefs.ErrUnavailable},
		{errors.New("odd"), errdefs.ErrInternal},
		{fmt.Errorf("x: %w", errdefs.ErrDataLoss), errdefs.ErrDataLoss},
	} {
		if got := errdefs.Class(Class(c.err)); got != c.want {
			t.Errorf("Class(%v) = %v, want %v", c.err, got, c.want)
		}
	}
	if Class(nil) != nil {
		t.Error("Class(nil)")
	}
}
