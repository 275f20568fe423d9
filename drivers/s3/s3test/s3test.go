// Package s3test starts a real S3 server for tests: versitygw
// (github.com/versity/versitygw) with its posix backend, as a separate
// process on 127.0.0.1, one per test.
//
//	s := s3test.Start(t)            // skipped (t.Skip) when versitygw is missing, unless CI is set
//	c := s.Client()                 // a minio-go client for s.Bucket
//	... exercise code against s.Endpoint, s.Bucket, s.AccessKey, s.SecretKey ...
//	n := s.CountRequests("PutObject", "backups/chunks/")
//
// The server writes an S3 access log; Requests and CountRequests read it,
// so a test can count what reached the server rather than trusting the
// client's own bookkeeping. versitygw writes a request's log line before
// it sends the response, so once a client call has returned, its request
// is in the log.
//
// scripts/test.sh installs the pinned versitygw into $(go env GOPATH)/bin.
package s3test

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"go/build"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// Binary is the name of the versitygw executable.
const Binary = "versitygw"

// Server is a running versitygw serving one bucket.
type Server struct {
	Endpoint  string // http://127.0.0.1:PORT
	Bucket    string // created by Start
	AccessKey string // root access key, random per server
	SecretKey string // root secret key, random per server
	Region    string // "us-east-1"
	// Root is the posix backend's directory: object KEY of the bucket is
	// the file Root/Bucket/KEY. Tests may damage objects there.
	Root string

	accessLog string
	cmd       *exec.Cmd
	stop      func()
}

// FindBinary returns the path of versitygw: on PATH, else in
// $(go env GOPATH)/bin.
func FindBinary() (string, error) {
	if p, err := exec.LookPath(Binary); err == nil {
		return p, nil
	}
	for _, dir := range filepath.SplitList(build.Default.GOPATH) {
		p := filepath.Join(dir, "bin", Binary)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s is neither on PATH nor in GOPATH/bin (scripts/test.sh installs it)", Binary)
}

// Start starts versitygw on a free loopback port with a fresh posix root
// and random root keys, waits until it answers, creates the bucket and
// registers a cleanup that kills the process. Without versitygw the test
// is skipped, or fails when the environment variable CI is set.
func Start(t testing.TB) *Server {
	t.Helper()
	bin, err := FindBinary()
	if err != nil {
		if os.Getenv("CI") == "" {
			t.Skipf("s3test: %v", err)
		}
		t.Fatalf("s3test: %v", err)
	}
	dir := t.TempDir()
	s := &Server{
		Bucket:    "stowage-test",
		AccessKey: "AK" + strings.ToUpper(randomHex(9)),
		SecretKey: randomHex(20),
		Region:    "us-east-1",
		Root:      filepath.Join(dir, "root"),
		accessLog: filepath.Join(dir, "access.log"),
	}
	if err := os.Mkdir(s.Root, 0o755); err != nil {
		t.Fatalf("s3test: %v", err)
	}
	// The port is picked by binding :0 and closing; another process may
	// take it before versitygw binds, so try a few times.
	var lastErr error
	for range 5 {
		if lastErr = s.start(t, bin, dir); lastErr == nil {
			break
		}
	}
	if lastErr != nil {
		t.Fatalf("s3test: start %s: %v", bin, lastErr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s.Client().MakeBucket(ctx, s.Bucket, minio.MakeBucketOptions{Region: s.Region}); err != nil {
		t.Fatalf("s3test: create bucket %s: %v", s.Bucket, err)
	}
	return s
}

// start runs one attempt: launch, wait for /health, register the kill.
func (s *Server) start(t testing.TB, bin, dir string) error {
	port, err := freePort()
	if err != nil {
		return err
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	out, err := os.Create(filepath.Join(dir, "versitygw.out"))
	if err != nil {
		return err
	}
	defer out.Close()
	cmd := exec.Command(bin,
		"--port", addr, "--region", s.Region, "--health", "/health",
		"--access-log", s.accessLog, "--quiet",
		"posix", s.Root)
	// Keys go in the environment, not on the command line (ps). The
	// environment is otherwise empty so that no VGW_* setting of the
	// machine leaks in.
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + dir,
		"ROOT_ACCESS_KEY=" + s.AccessKey, "ROOT_SECRET_KEY=" + s.SecretKey}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	kill := sync.OnceFunc(func() {
		_ = cmd.Process.Kill() // by PID, this process only
		<-exited
	})

	endpoint := "http://" + addr
	deadline := time.Now().Add(20 * time.Second)
	client := &http.Client{Timeout: time.Second}
	for {
		resp, err := client.Get(endpoint + "/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		select {
		case err := <-exited:
			exited <- err
			b, _ := os.ReadFile(out.Name())
			return fmt.Errorf("versitygw exited (%v): %s", err, tail(b, 2000))
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			kill()
			return errors.New("versitygw did not answer within 20s")
		}
	}
	s.Endpoint, s.cmd, s.stop = endpoint, cmd, kill
	t.Cleanup(kill)
	return nil
}

// HostPort is the endpoint without its scheme, as minio.New wants it.
func (s *Server) HostPort() string { return strings.TrimPrefix(s.Endpoint, "http://") }

// Client returns a new minio-go client for the server, signed with the
// root keys.
func (s *Server) Client() *minio.Client {
	c, err := minio.New(s.HostPort(), &minio.Options{
		Creds:  credentials.NewStaticV4(s.AccessKey, s.SecretKey, ""),
		Region: s.Region,
	})
	if err != nil {
		panic(fmt.Sprintf("s3test: minio client: %v", err)) // only a malformed endpoint fails
	}
	return c
}

// Stop kills the server now (tests of a server that goes away); the
// cleanup then has nothing left to do.
func (s *Server) Stop() { s.stop() }

// PID is the versitygw process id.
func (s *Server) PID() int { return s.cmd.Process.Pid }

// Request is one line of the server's access log.
type Request struct {
	Operation string // S3 operation without the "s3_" prefix: PutObject, HeadObject, UploadPart, ...
	Bucket    string // "" for service-level requests
	Key       string // object key, "" when none
	Status    int    // HTTP status
	ErrorCode string // S3 error code, "" on success
}

// Requests returns every request the server has logged so far, in order.
func (s *Server) Requests() ([]Request, error) {
	f, err := os.Open(s.accessLog)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []Request
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if r, ok := parseLogLine(sc.Text()); ok {
			out = append(out, r)
		}
	}
	return out, sc.Err()
}

// CountRequests counts the logged requests of S3 operation op
// ("PutObject", "HeadObject", "UploadPart", "DeleteObject", ...; a leading
// "s3_" is accepted) whose key starts with keyPrefix, whatever their
// status. The access log has no HTTP method; the operation names it more
// precisely (a PUT may be a PutObject, UploadPart or CopyObject).
func (s *Server) CountRequests(op, keyPrefix string) int {
	reqs, err := s.Requests()
	if err != nil {
		panic(fmt.Sprintf("s3test: read access log: %v", err))
	}
	op = strings.TrimPrefix(op, "s3_")
	n := 0
	for _, r := range reqs {
		if r.Operation == op && strings.HasPrefix(r.Key, keyPrefix) {
			n++
		}
	}
	return n
}

// parseLogLine parses versitygw's access log line, the AWS server access
// log format:
//
//	OWNER BUCKET [TIME ZONE] IP REQUESTER REQID s3_OP KEY URI STATUS ERR ...
//
// KEY is decoded and may hold spaces, so the key is taken from the URI
// (path style, percent-encoded, no spaces): the first token after the
// operation that starts with "/" and is followed by a status.
func parseLogLine(line string) (Request, bool) {
	f := strings.Fields(line)
	if len(f) < 12 || !strings.HasPrefix(f[2], "[") || !strings.HasPrefix(f[7], "s3_") {
		return Request{}, false
	}
	r := Request{Operation: strings.TrimPrefix(f[7], "s3_")}
	for i := 8; i+2 < len(f); i++ {
		if !strings.HasPrefix(f[i], "/") {
			continue
		}
		st, err := strconv.Atoi(f[i+1])
		if err != nil || len(f[i+1]) != 3 {
			continue
		}
		u, err := url.ParseRequestURI(f[i])
		if err != nil {
			continue
		}
		r.Status = st
		if f[i+2] != "-" {
			r.ErrorCode = f[i+2]
		}
		r.Bucket, r.Key, _ = strings.Cut(strings.TrimPrefix(u.Path, "/"), "/")
		return r, true
	}
	return Request{}, false
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}
