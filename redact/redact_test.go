package redact

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"strings"
	"testing"
)

func TestURL(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		// User information.
		{"http://user:S3cr3tPw@127.0.0.1:8080/t.qcow2", "http://user:REDACTED@127.0.0.1:8080/t.qcow2"},
		{"https://ghp_token@github.com/o/r", "https://REDACTED@github.com/o/r"},
		{"http://u:p@ss@h/x", "http://u:REDACTED@h/x"},
		{"http://u:p#s?s@h/x", "http://u:REDACTED@h/x"},
		{"http://u:@h", "http://u:REDACTED@h"},
		// Queries, case-insensitive names and unknown names alike.
		{"https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F1&X-Amz-Signature=SECRETSIG",
			"https://b.s3.amazonaws.com/k?X-Amz-Algorithm=REDACTED&X-Amz-Credential=REDACTED&X-Amz-Signature=REDACTED"},
		{"http://h/t?TOKEN=a&sig=b&Key=c&password=d&secret=e&access_token=f&x-amz-security-token=g",
			"http://h/t?TOKEN=REDACTED&sig=REDACTED&Key=REDACTED&password=REDACTED&secret=REDACTED&access_token=REDACTED&x-amz-security-token=REDACTED"},
		{"http://h/t?SECRET", "http://h/t?REDACTED"},
		{"http://h/t?a=&&b=1", "http://h/t?a=&&b=REDACTED"},
		{"http://h/t?", "http://h/t?"},
		// Stowage's own plain parameters stay, unless they hide a secret.
		{"s3://bucket/pre?endpoint=http://10.0.0.1:9000&region=us&token=x", "s3://bucket/pre?endpoint=http://10.0.0.1:9000&region=us&token=REDACTED"},
		{"s3://b?endpoint=http%3A%2F%2Fu%3Ap%40h", "s3://b?endpoint=REDACTED"},
		{"nbd+unix:///vol?socket=/run/n.sock", "nbd+unix:///REDACTED?socket=/run/n.sock"},
		// Fragments and export tokens.
		{"https://h/cb#access_token=x", "https://h/cb#REDACTED"},
		{"https://h/p#", "https://h/p#"},
		{"http://10.0.0.5:8471/exports/0123abcd", "http://10.0.0.5:8471/exports/REDACTED"},
		{"http://10.0.0.5:8471/exports/0123abcd/x?y=1", "http://10.0.0.5:8471/exports/REDACTED/x?y=REDACTED"},
		// Nothing to hide: unchanged, ports and paths kept byte for byte.
		{"http://127.0.0.1:8470/a%20b/c.qcow2", "http://127.0.0.1:8470/a%20b/c.qcow2"},
		{"store://s1/templates/t.qcow2", "store://s1/templates/t.qcow2"},
		{"nbd://10.0.0.5:10809/3f2a9c", "nbd://10.0.0.5:10809/REDACTED"},
		{"NBD://10.0.0.5:10809", "NBD://10.0.0.5:10809"},
		{"nbd://10.0.0.5:10809/", "nbd://10.0.0.5:10809/"},
		{"/var/lib/stowage/t.qcow2", "/var/lib/stowage/t.qcow2"},
		{"", ""},
		// Unparsable URLs are still redacted.
		{"http://u:pw@h/%zz?sig=1", "http://u:REDACTED@h/%zz?sig=REDACTED"},
	} {
		if got := URL(c.in); got != c.want {
			t.Errorf("URL(%q)\n got %q\nwant %q", c.in, got, c.want)
		}
	}
}

func TestText(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{`fetch http://user:S3cr3tPw@127.0.0.1:8080/t.qcow2?X-Amz-Signature=SECRETSIG into t1: checksum mismatch`,
			`fetch http://user:REDACTED@127.0.0.1:8080/t.qcow2?X-Amz-Signature=REDACTED into t1: checksum mismatch`},
		{`Get "https://u:p@h/x?token=SECRETTOK": dial tcp 10.0.0.1:443: connection refused`,
			`Get "https://u:REDACTED@h/x?token=REDACTED": dial tcp 10.0.0.1:443: connection refused`},
		{`copy source 'http://h/a?sig=1', then (s3://b/p?token=2) and <nbd://h/e?x=3>`,
			`copy source 'http://h/a?sig=REDACTED', then (s3://b/p?token=REDACTED) and <nbd://h/REDACTED?x=REDACTED>`},
		{`{"url":"http://h/a?sig=1\"x"}`, `{"url":"http://h/a?sig=REDACTED\"x"}`},
		{"two: http://a:1@h1/ and https://h2/p?k=v.", "two: http://a:REDACTED@h1/ and https://h2/p?k=REDACTED."},
		// Non-URLs untouched.
		{"volume v1: 3/4 done at 10.0.0.5:8471; ratio a:b", "volume v1: 3/4 done at 10.0.0.5:8471; ratio a:b"},
		{"user@example.org wrote ?q=1", "user@example.org wrote ?q=1"},
		{"", ""},
	} {
		if got := Text(c.in); got != c.want {
			t.Errorf("Text(%q)\n got %q\nwant %q", c.in, got, c.want)
		}
	}
}

func TestTextTrailingPunctuation(t *testing.T) {
	// Punctuation after a URL is the sentence's.
	if got := Text("see https://h2/p?k=v.; fetch http://h/t?sig=x: refused"); got != "see https://h2/p?k=REDACTED.; fetch http://h/t?sig=REDACTED: refused" {
		t.Errorf("got %q", got)
	}
	if got := Text("at http://h:80/t.qcow2: gone"); got != "at http://h:80/t.qcow2: gone" {
		t.Errorf("got %q", got)
	}
}

func TestError(t *testing.T) {
	if Error(nil) != nil {
		t.Fatal("Error(nil) != nil")
	}
	plainErr := fmt.Errorf("store s1: %w", fs.ErrNotExist)
	if Error(plainErr) != plainErr {
		t.Error("an error with nothing to hide is not returned as is")
	}
	err := fmt.Errorf("fetch http://u:pw@h/t?sig=SECRETSIG: %w", fs.ErrNotExist)
	red := Error(err)
	if strings.Contains(red.Error(), "pw") || strings.Contains(red.Error(), "SECRETSIG") {
		t.Errorf("leaks: %v", red)
	}
	if !errors.Is(red, fs.ErrNotExist) {
		t.Error("the chain is lost")
	}
	if got := fmt.Sprintf("job: %v", red); got != "job: fetch http://u:REDACTED@h/t?sig=REDACTED: file does not exist" {
		t.Errorf("got %q", got)
	}
}

type stringer string

func (s stringer) String() string { return string(s) }

func TestHandler(t *testing.T) {
	for _, json := range []bool{false, true} {
		var buf bytes.Buffer
		var h slog.Handler = slog.NewTextHandler(&buf, nil)
		if json {
			h = slog.NewJSONHandler(&buf, nil)
		}
		log := slog.New(Handler(h)).With("source", "http://u:PW1@h/x?sig=SIG1")
		log.WithGroup("g").Info("fetching http://u:PW2@h/t?token=TOK2",
			"err", fmt.Errorf("get http://h/t?X-Amz-Signature=SIG3: %w", errors.New("eof")),
			"url", stringer("https://h/t?sig=SIG4"),
			"urls", []string{"https://h/t?sig=SIG5"},
			slog.Group("inner", "u", "http://u:PW6@h/"),
			"n", 42, "plain", "http://127.0.0.1:8470/healthz")
		out := buf.String()
		for _, s := range []string{"PW1", "PW2", "TOK2", "SIG3", "SIG4", "SIG5", "PW6"} {
			if strings.Contains(out, s) {
				t.Errorf("json=%v: %s leaked: %s", json, s, out)
			}
		}
		for _, s := range []string{"42", "http://127.0.0.1:8470/healthz", "eof", "REDACTED"} {
			if !strings.Contains(out, s) {
				t.Errorf("json=%v: %q lost: %s", json, s, out)
			}
		}
	}
	if !slog.New(Handler(slog.NewTextHandler(&bytes.Buffer{}, nil))).Enabled(context.Background(), slog.LevelInfo) {
		t.Error("Enabled not passed through")
	}
}
