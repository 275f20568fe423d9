package s3

import (
	"bytes"
	"context"
	"crypto/md5"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/stowage/stowage/datapath/s3conn"
	"github.com/stowage/stowage/drivers/s3/s3test"
	"github.com/stowage/stowage/errdefs"
)

const prefix = "zone1/images"

func open(t *testing.T) (*Store, *s3test.Server) {
	t.Helper()
	srv := s3test.Start(t)
	st, err := Open(t.Context(), s3conn.Config{Endpoint: srv.Endpoint, Region: srv.Region, Bucket: srv.Bucket,
		Prefix: prefix, AccessKey: srv.AccessKey, SecretKey: srv.SecretKey})
	if err != nil {
		t.Fatal(err)
	}
	return st, srv
}

// serve serves files by path; a path not in files is a 404.
func serve(t *testing.T, files map[string][]byte) string {
	t.Helper()
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, ok := files[r.URL.Path]
		if !ok {
			http.NotFound(w, r)
			return
		}
		if r.URL.Query().Get("chunked") != "" {
			// No Content-Length: the length is unknown to the importer.
			w.WriteHeader(http.StatusOK)
			w.Write(b)
			return
		}
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(b))
	}))
	t.Cleanup(ts.Close)
	return ts.URL
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	r := rand.NewChaCha8([32]byte{1})
	r.Read(b)
	return b
}

// qcow2 returns a qcow2 v3 header padded to n bytes, with a backing file
// offset when backing != 0.
func qcow2(n int, backing uint64) []byte {
	b := randomBytes(n)
	clear(b[:104])
	copy(b, qcow2Magic)
	binary.BigEndian.PutUint32(b[4:], 3)
	binary.BigEndian.PutUint64(b[8:], backing)
	binary.BigEndian.PutUint32(b[20:], 16)    // cluster bits
	binary.BigEndian.PutUint64(b[24:], 1<<30) // virtual size
	binary.BigEndian.PutUint32(b[100:], 104)  // header length
	return b
}

func iso(n int) []byte {
	b := randomBytes(n)
	copy(b[isoMagicOffset:], isoMagic)
	return b
}

func sha256Hex(b []byte) string { s := sha256.Sum256(b); return hex.EncodeToString(s[:]) }

// nothingLeft fails unless the bucket holds no object and no incomplete
// upload under prefix.
func nothingLeft(t *testing.T, srv *s3test.Server) {
	t.Helper()
	c := srv.Client()
	for o := range c.ListObjects(t.Context(), srv.Bucket, minio.ListObjectsOptions{Prefix: prefix, Recursive: true}) {
		t.Errorf("object left: %s %v", o.Key, o.Err)
	}
	for u := range c.ListIncompleteUploads(t.Context(), srv.Bucket, prefix, true) {
		t.Errorf("incomplete upload left: %s %s %v", u.Key, u.UploadID, u.Err)
	}
}

func TestImport(t *testing.T) {
	ctx := t.Context()
	st, srv := open(t)
	big := qcow2(12<<20+12345, 0) // three 5 MiB parts
	small := randomBytes(100 << 10)
	isoImg := iso(1 << 20)
	base := serve(t, map[string][]byte{"/t.qcow2": big, "/t.raw": small, "/t.iso": isoImg})

	var last atomic.Int64
	res, err := st.Import(ctx, ImportRequest{URL: base + "/t.qcow2", Key: "templates/t1.qcow2", Format: FormatQCOW2,
		Checksum: "sha256:" + sha256Hex(big), PartSize: 5 << 20, Progress: func(done, total int64) {
			if total != int64(len(big)) {
				t.Errorf("progress total %d", total)
			}
			last.Store(done)
		}})
	if err != nil {
		t.Fatal(err)
	}
	if res.Size != int64(len(big)) || res.SHA256 != sha256Hex(big) || res.Existing {
		t.Errorf("result %+v", res)
	}
	if last.Load() != int64(len(big)) {
		t.Errorf("last progress %d, want %d", last.Load(), len(big))
	}
	if n := srv.CountRequests("UploadPart", prefix+"/templates/t1.qcow2"); n != 3 {
		t.Errorf("the server saw %d parts, want 3", n)
	}
	info, err := st.Stat(ctx, "templates/t1.qcow2")
	if err != nil {
		t.Fatal(err)
	}
	if info.Size != int64(len(big)) || info.SHA256 != res.SHA256 || info.Format != FormatQCOW2 || info.ETag == "" || info.ModTime.IsZero() || info.Key != "templates/t1.qcow2" {
		t.Errorf("stat %+v", info)
	}
	got := download(t, srv, "templates/t1.qcow2")
	if !bytes.Equal(got, big) {
		t.Fatal("the object is not the template")
	}

	// md5 and sha512, length unknown (no Content-Length).
	m := md5.Sum(small)
	if _, err := st.Import(ctx, ImportRequest{URL: base + "/t.raw?chunked=1", Key: "templates/t2.raw", Format: FormatRaw, Checksum: "md5:" + hex.EncodeToString(m[:])}); err != nil {
		t.Fatal(err)
	}
	s5 := sha512.Sum512(isoImg)
	if _, err := st.Import(ctx, ImportRequest{URL: base + "/t.iso", Key: "templates/t3.iso", Format: FormatISO, Checksum: "sha512:" + hex.EncodeToString(s5[:])}); err != nil {
		t.Fatal(err)
	}
	// No checksum.
	if _, err := st.Import(ctx, ImportRequest{URL: base + "/t.raw", Key: "templates/t4.raw", Format: FormatRaw}); err != nil {
		t.Fatal(err)
	}

	// A retried import is accepted without fetching; another one is refused.
	before := srv.CountRequests("CreateMultipartUpload", "")
	again, err := st.Import(ctx, ImportRequest{URL: base + "/t.qcow2", Key: "templates/t1.qcow2", Format: FormatQCOW2, Checksum: "sha256:" + sha256Hex(big)})
	if err != nil || !again.Existing || again.SHA256 != res.SHA256 {
		t.Errorf("retried import: %+v %v", again, err)
	}
	if srv.CountRequests("CreateMultipartUpload", "") != before {
		t.Error("a retried import uploaded again")
	}
	if _, err := st.Import(ctx, ImportRequest{URL: base + "/t.raw", Key: "templates/t1.qcow2", Format: FormatRaw}); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("import over another template: %v", err)
	}

	objs, err := st.List(ctx, "templates/")
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, o := range objs {
		keys = append(keys, o.Key)
	}
	if strings.Join(keys, " ") != "templates/t1.qcow2 templates/t2.raw templates/t3.iso templates/t4.raw" {
		t.Errorf("list: %v", keys)
	}
}

func download(t *testing.T, srv *s3test.Server, key string) []byte {
	t.Helper()
	o, err := srv.Client().GetObject(t.Context(), srv.Bucket, prefix+"/"+key, minio.GetObjectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	b, err := io.ReadAll(o)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestImportFailuresLeaveNothing(t *testing.T) {
	ctx := t.Context()
	st, srv := open(t)
	big := randomBytes(12 << 20)
	files := map[string][]byte{
		"/big.raw":       big,
		"/backing.qcow2": qcow2(12<<20, 4096),
		"/ok.qcow2":      qcow2(1<<20, 0),
		"/notiso":        randomBytes(64 << 10),
		"/tiny":          []byte("x"),
	}
	base := serve(t, files)

	// The check sees an incomplete upload when there is one.
	core := minio.Core{Client: srv.Client()}
	id, err := core.NewMultipartUpload(ctx, srv.Bucket, prefix+"/probe", minio.PutObjectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for range core.ListIncompleteUploads(ctx, srv.Bucket, prefix, true) {
		n++
	}
	if n != 1 {
		t.Fatalf("ListIncompleteUploads found %d uploads, want the probe", n)
	}
	if err := core.AbortMultipartUpload(ctx, srv.Bucket, prefix+"/probe", id); err != nil {
		t.Fatal(err)
	}

	wrongSHA := "sha256:" + strings.Repeat("0", 64)
	wrongMD5 := "md5:" + strings.Repeat("0", 32)
	wrongSHA512 := "sha512:" + strings.Repeat("0", 128)
	for _, c := range []struct {
		name string
		req  ImportRequest
		want error
	}{
		{"sha256 mismatch after several parts", ImportRequest{URL: base + "/big.raw", Format: FormatRaw, Checksum: wrongSHA}, errdefs.ErrDataLoss},
		{"md5 mismatch, unknown length", ImportRequest{URL: base + "/big.raw?chunked=1", Format: FormatRaw, Checksum: wrongMD5}, errdefs.ErrDataLoss},
		{"sha512 mismatch", ImportRequest{URL: base + "/big.raw", Format: FormatRaw, Checksum: wrongSHA512}, errdefs.ErrDataLoss},
		{"qcow2 with a backing file", ImportRequest{URL: base + "/backing.qcow2", Format: FormatQCOW2}, errdefs.ErrInvalid},
		{"qcow2 declared raw", ImportRequest{URL: base + "/ok.qcow2", Format: FormatRaw}, errdefs.ErrInvalid},
		{"qcow2 declared iso", ImportRequest{URL: base + "/ok.qcow2", Format: FormatISO}, errdefs.ErrInvalid},
		{"raw declared qcow2", ImportRequest{URL: base + "/big.raw", Format: FormatQCOW2}, errdefs.ErrInvalid},
		{"raw declared iso", ImportRequest{URL: base + "/notiso", Format: FormatISO}, errdefs.ErrInvalid},
		{"short file declared iso", ImportRequest{URL: base + "/tiny", Format: FormatISO}, errdefs.ErrInvalid},
		{"404", ImportRequest{URL: base + "/missing", Format: FormatRaw}, errdefs.ErrNotFound},
		{"bad checksum syntax", ImportRequest{URL: base + "/tiny", Format: FormatRaw, Checksum: "crc32:00"}, errdefs.ErrInvalid},
		{"bad format", ImportRequest{URL: base + "/tiny", Format: "vmdk"}, errdefs.ErrInvalid},
		{"bad scheme", ImportRequest{URL: "ftp://h/x", Format: FormatRaw}, errdefs.ErrInvalid},
		{"source down", ImportRequest{URL: "http://127.0.0.1:1/x", Format: FormatRaw}, errdefs.ErrUnavailable},
	} {
		t.Run(c.name, func(t *testing.T) {
			c.req.Key = "templates/x"
			c.req.PartSize = 5 << 20
			_, err := st.Import(ctx, c.req)
			if errdefs.Class(err) != c.want {
				t.Fatalf("%v (class %v), want %v", err, errdefs.Class(err), c.want)
			}
			nothingLeft(t, srv)
		})
	}
	// The checksum failures really did upload parts before they were
	// refused: the abort, not luck, left nothing.
	if n := srv.CountRequests("UploadPart", prefix+"/templates/x"); n < 2 {
		t.Errorf("only %d parts were uploaded by the failing imports; the test does not exercise the abort", n)
	}
	if n := srv.CountRequests("AbortMultipartUpload", prefix+"/templates/x"); n == 0 {
		t.Error("no multipart upload was aborted")
	}

	// A cancelled import leaves nothing either.
	cctx, cancel := context.WithCancel(ctx)
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusOK)
		w.Write(big[:6<<20])
		w.(http.Flusher).Flush()
		cancel()
		<-r.Context().Done()
	}))
	defer slow.Close()
	if _, err := st.Import(cctx, ImportRequest{URL: slow.URL, Key: "templates/y", Format: FormatRaw, PartSize: 5 << 20}); err == nil {
		t.Fatal("a cancelled import succeeded")
	}
	nothingLeft(t, srv)
}

func TestObjectOps(t *testing.T) {
	ctx := t.Context()
	st, srv := open(t)
	data := qcow2(12<<20, 0)
	base := serve(t, map[string][]byte{"/t": data})
	if _, err := st.Import(ctx, ImportRequest{URL: base + "/t", Key: "a/t.qcow2", Format: FormatQCOW2, PartSize: 5 << 20}); err != nil {
		t.Fatal(err)
	}

	// Copy: small (CopyObject) and, with the limit lowered, part by part.
	gets := srv.CountRequests("GetObject", "")
	small, err := st.Copy(ctx, "a/t.qcow2", "b/small.qcow2")
	if err != nil {
		t.Fatal(err)
	}
	defer func(old int64) { maxCopyObject = old }(maxCopyObject)
	maxCopyObject = 5 << 20
	large, err := st.Copy(ctx, "a/t.qcow2", "b/large.qcow2")
	if err != nil {
		t.Fatal(err)
	}
	if n := srv.CountRequests("UploadPartCopy", prefix+"/b/large.qcow2"); n != 3 {
		t.Errorf("large copy: %d UploadPartCopy, want 3", n)
	}
	if srv.CountRequests("GetObject", "") != gets {
		t.Error("a copy read the object through this process")
	}
	for _, c := range []ObjectInfo{small, large} {
		if c.Size != int64(len(data)) || c.SHA256 != sha256Hex(data) || c.Format != FormatQCOW2 {
			t.Errorf("copy %+v", c)
		}
		if !bytes.Equal(download(t, srv, c.Key), data) {
			t.Errorf("copy %s differs", c.Key)
		}
	}
	if _, err := st.Copy(ctx, "a/missing", "b/x"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("copy of a missing object: %v", err)
	}

	// Presigned GET: works without keys, then expires.
	u, err := st.PresignGet(ctx, "a/t.qcow2", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Get(u.String())
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !bytes.Equal(got, data) {
		t.Fatalf("presigned GET: %s, %d bytes", resp.Status, len(got))
	}
	u, err = st.PresignGet(ctx, "a/t.qcow2", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(2100 * time.Millisecond)
	resp, err = http.Get(u.String())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Errorf("expired presigned GET: %s", resp.Status)
	}
	for _, e := range []time.Duration{0, 8 * 24 * time.Hour} {
		if _, err := st.PresignGet(ctx, "a/t.qcow2", e); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("presign for %s: %v", e, err)
		}
	}
	if _, err := st.PresignGet(ctx, "a/missing", time.Hour); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("presign of a missing object: %v", err)
	}

	// Delete is idempotent; Stat says not found after.
	for range 2 {
		if err := st.Delete(ctx, "b/small.qcow2"); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := st.Stat(ctx, "b/small.qcow2"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("stat after delete: %v", err)
	}
	if objs, err := st.List(ctx, "b/"); err != nil || len(objs) != 1 || objs[0].Key != "b/large.qcow2" || objs[0].Size != int64(len(data)) {
		t.Errorf("list b/: %+v %v", objs, err)
	}
	for _, bad := range []string{"", "/a", "a//b", "a/../b", "..", "a/./b", "a\\b", "a\x00b"} {
		if _, err := st.Stat(ctx, bad); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("stat %q: %v", bad, err)
		}
	}
}

func TestLoadConfigAndRedact(t *testing.T) {
	srv := s3test.Start(t)
	dir := t.TempDir()
	two := filepath.Join(dir, "two")
	os.WriteFile(two, []byte(srv.AccessKey+"\n"+srv.SecretKey+"\n"), 0o600)
	kv := filepath.Join(dir, "kv")
	os.WriteFile(kv, []byte("# keys\naccess_key = "+srv.AccessKey+"\nsecret_key="+srv.SecretKey+"\n"), 0o640)
	t.Setenv("TESTS3_ACCESS_KEY", srv.AccessKey)
	t.Setenv("TESTS3_SECRET_KEY", srv.SecretKey)
	url := "s3://" + srv.Bucket + "/" + prefix
	for _, d := range []map[string]string{
		{"endpoint": srv.Endpoint, "credentials_file": two},
		{"endpoint": srv.Endpoint, "credentials_file": kv, "region": "us-east-1"},
		{"endpoint": srv.Endpoint, "credentials_env": "TESTS3"},
	} {
		cfg, err := LoadConfig(url, d)
		if err != nil {
			t.Fatal(err)
		}
		if cfg.Bucket != srv.Bucket || cfg.Prefix != prefix || cfg.AccessKey != srv.AccessKey || cfg.SecretKey != srv.SecretKey {
			t.Fatalf("config from %v: %v", d, cfg)
		}
		if _, err := Open(t.Context(), cfg); err != nil {
			t.Fatalf("open with %v: %v", d, err)
		}
	}

	world := filepath.Join(dir, "world")
	os.WriteFile(world, []byte("a\nb\n"), 0o644)
	garbled := filepath.Join(dir, "garbled")
	os.WriteFile(garbled, []byte("only-one-line-"+srv.SecretKey+"\n"), 0o600)
	for _, c := range []struct {
		url  string
		d    map[string]string
		want error
	}{
		{"s3://Bad_Bucket/x", nil, errdefs.ErrInvalid},
		{"http://bucket/x", nil, errdefs.ErrInvalid},
		{"s3:///x", nil, errdefs.ErrInvalid},
		{"s3://bucket/a/../b", nil, errdefs.ErrInvalid},
		{url, map[string]string{"secret_key": srv.SecretKey}, errdefs.ErrInvalid},
		{url, map[string]string{"endpoint": srv.Endpoint, "colour": "blue"}, errdefs.ErrInvalid},
		{url, map[string]string{"credentials_file": two, "credentials_env": "TESTS3"}, errdefs.ErrInvalid},
		{url, map[string]string{"credentials_file": world}, errdefs.ErrFailedPrecondition},
		{url, map[string]string{"credentials_file": garbled}, errdefs.ErrInvalid},
		{url, map[string]string{"credentials_file": filepath.Join(dir, "none")}, errdefs.ErrNotFound},
		{url, map[string]string{"credentials_env": "NOPE_NOT_SET"}, errdefs.ErrFailedPrecondition},
		{url, map[string]string{"credentials_env": "bad-name"}, errdefs.ErrInvalid},
		{url, map[string]string{"endpoint": "http://u:pw@h:9000"}, errdefs.ErrInvalid},
		{url, map[string]string{"insecure_skip_verify": "maybe"}, errdefs.ErrInvalid},
	} {
		_, err := LoadConfig(c.url, c.d)
		if errdefs.Class(err) != c.want {
			t.Errorf("LoadConfig(%s, %v): %v, want %v", c.url, RedactDetails(c.d), err, c.want)
		}
		if err != nil && (strings.Contains(err.Error(), srv.SecretKey) || strings.Contains(err.Error(), "pw@")) {
			t.Errorf("error shows a secret: %v", err)
		}
	}
	if cfg, err := LoadConfig("s3://bucket", map[string]string{"region": "eu-west-1"}); err != nil || cfg.Endpoint != "https://s3.eu-west-1.amazonaws.com" || cfg.Prefix != "" {
		t.Errorf("default endpoint: %v %v", cfg, err)
	}

	red := RedactDetails(map[string]string{"secret_key": "s", "SessionToken": "t", "password": "p",
		"endpoint": "https://u:pw@h/x?X-Amz-Signature=abc", "credentials_file": "/etc/k", "region": "r"})
	for k, v := range red {
		if strings.ContainsAny(v, "stp") && (v == "s" || v == "t" || v == "p") || strings.Contains(v, "pw") || strings.Contains(v, "abc") {
			t.Errorf("redacted %s=%q", k, v)
		}
	}
	if red["credentials_file"] != "/etc/k" || red["region"] != "r" || red["secret_key"] != Redacted {
		t.Errorf("redacted: %v", red)
	}
}

func TestSourceURLSecretsStayOutOfErrors(t *testing.T) {
	st, _ := open(t)
	base := serve(t, map[string][]byte{})
	_, err := st.Import(t.Context(), ImportRequest{URL: base + "/x?token=hunter2", Key: "k", Format: FormatRaw})
	if !errors.Is(err, errdefs.ErrNotFound) || strings.Contains(err.Error(), "hunter2") {
		t.Errorf("error: %v", err)
	}
	_, err = st.Import(t.Context(), ImportRequest{URL: "http://user:hunter2@127.0.0.1:1/x?token=hunter2", Key: "k", Format: FormatRaw})
	if err == nil || strings.Contains(err.Error(), "hunter2") {
		t.Errorf("error: %v", err)
	}
}

func TestSniff(t *testing.T) {
	v2 := qcow2(4096, 0)
	binary.BigEndian.PutUint32(v2[4:], 2)
	enc := qcow2(4096, 0)
	binary.BigEndian.PutUint32(enc[32:], 1)
	ext := qcow2(4096, 0)
	binary.BigEndian.PutUint64(ext[72:], 1<<2)
	vdi := randomBytes(4096)
	binary.LittleEndian.PutUint32(vdi[64:], 0xbeda107f)
	for _, c := range []struct {
		head []byte
		f    Format
		ok   bool
	}{
		{v2, FormatQCOW2, true},
		{enc, FormatQCOW2, false},
		{ext, FormatQCOW2, false},
		{[]byte("QFI\xfb"), FormatQCOW2, false},
		{append([]byte("KDMV"), make([]byte, 100)...), FormatRaw, false},
		{append([]byte("vhdxfile"), make([]byte, 100)...), FormatRaw, false},
		{vdi, FormatRaw, false},
		{nil, FormatRaw, true},
		{iso(sniffLen), FormatISO, true},
	} {
		if err := sniff(c.head, c.f); (err == nil) != c.ok {
			t.Errorf("sniff %q as %s: %v", c.head[:min(8, len(c.head))], c.f, err)
		}
	}
}
