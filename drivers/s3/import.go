package s3

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"net/url"

	"github.com/minio/minio-go/v7"

	"github.com/stowage/stowage/datapath/checksum"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/redact"
)

// Format is an image format, spelled as drivers.Format spells it.
type Format string

// The formats Import accepts.
const (
	FormatRaw   Format = "raw"
	FormatQCOW2 Format = "qcow2"
	FormatISO   Format = "iso"
)

// DefaultPartSize is Import's multipart part size: the memory one import
// holds, and with S3's 10,000 parts a limit of 640 GiB per template.
const DefaultPartSize = 64 << 20

// ImportRequest says what to import where.
type ImportRequest struct {
	// URL is an http:// or https:// URL of the template.
	URL string
	// Key is the destination, relative to the store's prefix.
	Key string
	// Format is the declared format; the content must be of it.
	Format Format
	// Checksum is "sha256:HEX", "sha512:HEX", "md5:HEX" (also CloudStack's
	// "{SHA-256}HEX" and a bare HEX told apart by its length) or "".
	Checksum string
	// Progress, when set, is called with the bytes read so far and the
	// source's length (-1 when it did not say).
	Progress func(done, total int64)
	// HTTPClient fetches URL (http.DefaultClient when nil).
	HTTPClient *http.Client
	// PartSize is the multipart part size (DefaultPartSize when 0, at
	// least 5 MiB).
	PartSize uint64
}

// ImportResult describes an imported object.
type ImportResult struct {
	Size   int64
	SHA256 string // lower-case hex of the whole object
	ETag   string
	// Existing is set when the object was already there with the same
	// SHA-256 and format (a retried import) and nothing was fetched.
	Existing bool
}

// Import streams req.URL into the object req.Key as a multipart upload of
// unknown length, computing the SHA-256 (always) and the checksum's digest
// and sniffing the format as the bytes pass:
//
//   - qcow2: magic "QFI\xfb", version 2 or 3, no backing file (a zero
//     backing_file_offset, bytes 8-16), not encrypted, no external data
//     file, not marked corrupt;
//   - iso: "CD001" at byte 32769 (the ISO 9660 primary volume descriptor);
//   - raw: anything that does not start with a qcow2, VMDK, VHDX or VDI
//     header (a raw image a guest wrote such a header into is refused);
//   - the declared format must be what is sniffed.
//
// A failure is reported by the reader minio-go consumes before it reaches
// the end, so minio-go aborts the multipart upload and no object, part or
// incomplete upload is left; after a failure Import also removes any
// incomplete upload of req.Key (a crashed earlier attempt's too). Classes:
// a checksum mismatch is errdefs.ErrDataLoss, a wrong or refused format
// errdefs.ErrInvalid, a 404/410 from the source errdefs.ErrNotFound.
//
// An object already at req.Key that Import wrote with the same SHA-256 (when
// the checksum is a sha256) and format is accepted as it is
// (ImportResult.Existing); another one is errdefs.ErrAlreadyExists.
func (s *Store) Import(ctx context.Context, req ImportRequest) (ImportResult, error) {
	res, err := s.importObject(ctx, req)
	if err != nil {
		return ImportResult{}, fmt.Errorf("import %s into %s key %s: %w", redact.URL(req.URL), s, req.Key, err)
	}
	return res, nil
}

func (s *Store) importObject(ctx context.Context, req ImportRequest) (ImportResult, error) {
	if err := checkKey(req.Key); err != nil {
		return ImportResult{}, err
	}
	switch req.Format {
	case FormatRaw, FormatQCOW2, FormatISO:
	default:
		return ImportResult{}, fmt.Errorf("format %q is not raw, qcow2 or iso: %w", req.Format, errdefs.ErrInvalid)
	}
	sum, err := checksum.Parse(req.Checksum)
	if err != nil {
		return ImportResult{}, err
	}
	u, err := url.Parse(req.URL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return ImportResult{}, fmt.Errorf("source: want an http:// or https:// URL: %w", errdefs.ErrInvalid)
	}
	partSize := req.PartSize
	if partSize == 0 {
		partSize = DefaultPartSize
	}
	if partSize < 5<<20 {
		return ImportResult{}, fmt.Errorf("part size %d: S3 wants at least 5 MiB: %w", partSize, errdefs.ErrInvalid)
	}

	key := s.cfg.Key(req.Key)
	have, err := s.Stat(ctx, req.Key)
	switch {
	case err == nil && have.SHA256 == "" && have.Size <= maxCopyObject:
		// Under the store's prefix only Import writes templates: an object
		// without its record is one whose import crashed between the
		// upload and the metadata copy. Import it again.
		if err := s.Delete(ctx, req.Key); err != nil {
			return ImportResult{}, err
		}
	case err == nil:
		return s.existingImport(have, req, sum)
	case !errors.Is(err, errdefs.ErrNotFound):
		return ImportResult{}, err
	}
	// An upload a crashed attempt left incomplete is dropped first.
	s.abandon(ctx, key)

	body, total, err := fetch(ctx, req.HTTPClient, u)
	if err != nil {
		return ImportResult{}, err
	}
	defer body.Close()
	v := newVerifier(body, req.Format, sum, total, req.Progress)
	// Length -1: minio-go reads to the end (where the verifier gives its
	// verdict) before it completes the upload.
	info, err := s.c.PutObject(ctx, s.cfg.Bucket, key, v, -1, minio.PutObjectOptions{
		PartSize: partSize, ContentType: contentType(req.Format)})
	if err != nil {
		s.abandon(ctx, key)
		if v.err != nil { // the verifier's own verdict, classed
			return ImportResult{}, v.err
		}
		return ImportResult{}, s.wrap("upload", err)
	}
	// Record the digest and format, known only now, with a metadata-
	// replacing copy onto itself (objects over the 5 GiB copy limit go
	// without; a retried import of one is then ErrAlreadyExists).
	etag := info.ETag
	if info.Size <= maxCopyObject {
		src := minio.CopySrcOptions{Bucket: s.cfg.Bucket, Object: key, MatchETag: info.ETag}
		dst := minio.CopyDestOptions{Bucket: s.cfg.Bucket, Object: key, ReplaceMetadata: true, ContentType: contentType(req.Format),
			UserMetadata: map[string]string{metaSHA256: v.sha256(), metaFormat: string(req.Format)}}
		up, err := s.c.CopyObject(ctx, dst, src)
		if err != nil {
			_ = s.c.RemoveObject(context.WithoutCancel(ctx), s.cfg.Bucket, key, minio.RemoveObjectOptions{})
			return ImportResult{}, s.wrap("record checksum", err)
		}
		etag = up.ETag
	}
	if v.progress != nil {
		v.progress(v.n, total)
	}
	return ImportResult{Size: v.n, SHA256: v.sha256(), ETag: etag}, nil
}

// existingImport decides about an object already at the key.
func (s *Store) existingImport(have ObjectInfo, req ImportRequest, sum checksum.Sum) (ImportResult, error) {
	same := have.SHA256 != "" && have.Format == req.Format && (sum.Algo != "sha256" || subtle.ConstantTimeCompare([]byte(have.SHA256), []byte(sum.Hex)) == 1)
	if !same || sum.Algo == "sha512" || sum.Algo == "md5" {
		// A sha512 or md5 cannot be checked against the recorded SHA-256
		// without reading the object: refuse rather than guess.
		return ImportResult{}, fmt.Errorf("%s exists (sha256 %q, format %q) and is not known to be this import: %w", req.Key, have.SHA256, have.Format, errdefs.ErrAlreadyExists)
	}
	return ImportResult{Size: have.Size, SHA256: have.SHA256, ETag: have.ETag, Existing: true}, nil
}

// abandon removes incomplete uploads of key (minio-go aborts its own on a
// failed PutObject; this also catches one a crash left), best effort.
func (s *Store) abandon(ctx context.Context, key string) {
	_ = s.c.RemoveIncompleteUpload(context.WithoutCancel(ctx), s.cfg.Bucket, key)
}

func contentType(f Format) string {
	if f == FormatISO {
		return "application/x-iso9660-image"
	}
	return "application/octet-stream"
}

// fetch GETs u and returns its body and length (-1 when unknown).
func fetch(ctx context.Context, client *http.Client, u *url.URL) (io.ReadCloser, int64, error) {
	if client == nil {
		client = http.DefaultClient
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, 0, fmt.Errorf("source: %v: %w", err, errdefs.ErrInvalid)
	}
	resp, err := client.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil, 0, ctx.Err()
		}
		if errors.Is(err, errdefs.ErrPermissionDenied) {
			// The address policy refused it (netguard): say so, final.
			return nil, 0, fmt.Errorf("source: %w", err)
		}
		var uerr *url.Error
		if errors.As(err, &uerr) {
			err = uerr.Err // its message repeats the URL, query included
		}
		return nil, 0, fmt.Errorf("source: %v: %w", err, errdefs.ErrUnavailable)
	}
	if resp.StatusCode == http.StatusOK {
		return resp.Body, resp.ContentLength, nil
	}
	resp.Body.Close()
	var class error
	switch {
	case resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusGone:
		class = errdefs.ErrNotFound
	case resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden:
		class = errdefs.ErrPermissionDenied
	case resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500:
		class = errdefs.ErrUnavailable
	default:
		class = errdefs.ErrInvalid
	}
	return nil, 0, fmt.Errorf("source answered %s: %w", resp.Status, class)
}

// Where the sniffer looks.
const (
	isoMagic       = "CD001"
	isoMagicOffset = 16*2048 + 1
	sniffLen       = isoMagicOffset + len(isoMagic) // enough for every check
	qcow2Magic     = "QFI\xfb"
)

// verifier is the reader minio-go uploads from: it hashes and sniffs what
// passes and, instead of the source's EOF, returns an error when the
// checksum or format is wrong, so that the upload is aborted before it
// completes. An error found early (a qcow2 with a backing file) stops the
// upload at once.
type verifier struct {
	r        io.Reader
	format   Format
	want     checksum.Sum
	total    int64
	progress func(done, total int64)

	sha      hash.Hash
	other    hash.Hash // the checksum's digest when it is not sha256
	head     []byte    // the first sniffLen bytes
	sniffed  bool
	n        int64
	reported int64
	err      error // the verdict, once failed
}

func newVerifier(r io.Reader, format Format, want checksum.Sum, total int64, progress func(done, total int64)) *verifier {
	v := &verifier{r: r, format: format, want: want, total: total, progress: progress, sha: sha256.New()}
	if want.Algo != "" && want.Algo != "sha256" {
		v.other = checksum.New(want.Algo)
	}
	return v
}

func (v *verifier) sha256() string { return hex.EncodeToString(v.sha.Sum(nil)) }

func (v *verifier) Read(p []byte) (int, error) {
	if v.err != nil {
		return 0, v.err
	}
	n, err := v.r.Read(p)
	if n > 0 {
		v.sha.Write(p[:n])
		if v.other != nil {
			v.other.Write(p[:n])
		}
		if len(v.head) < sniffLen {
			v.head = append(v.head, p[:min(n, sniffLen-len(v.head))]...)
		}
		v.n += int64(n)
		if v.progress != nil && v.n-v.reported >= 1<<20 {
			v.reported = v.n
			v.progress(v.n, v.total)
		}
	}
	if !v.sniffed && (len(v.head) >= sniffLen || err == io.EOF) {
		v.sniffed = true
		if ferr := sniff(v.head, v.format); ferr != nil {
			v.err = ferr
			return 0, ferr
		}
	}
	switch {
	case err == io.EOF:
		if v.total >= 0 && v.n != v.total {
			v.err = fmt.Errorf("source sent %d bytes of %d: %w", v.n, v.total, errdefs.ErrUnavailable)
		} else {
			v.err = v.check()
		}
		if v.err != nil {
			return 0, v.err
		}
	case err != nil:
		v.err = fmt.Errorf("read source at %d: %v: %w", v.n, err, errdefs.ErrUnavailable)
		return 0, v.err
	}
	return n, err
}

// check compares the digest with the expected checksum.
func (v *verifier) check() error {
	var got string
	switch v.want.Algo {
	case "":
		return nil
	case "sha256":
		got = v.sha256()
	default:
		got = hex.EncodeToString(v.other.Sum(nil))
	}
	return v.want.Check(got)
}

// sniff checks the head of an image (its first sniffLen bytes, fewer when
// it is shorter) against the declared format.
func sniff(head []byte, declared Format) error {
	isQCOW2 := len(head) >= 4 && string(head[:4]) == qcow2Magic
	if other := foreignFormat(head); other != "" && declared != FormatQCOW2 {
		return fmt.Errorf("declared %s, but the content is a %s image; refusing it (an image declared %s must not start with another format's header): %w", declared, other, declared, errdefs.ErrInvalid)
	}
	switch declared {
	case FormatQCOW2:
		if !isQCOW2 {
			return fmt.Errorf("declared qcow2, but the content has no qcow2 header: %w", errdefs.ErrInvalid)
		}
		return checkQCOW2Header(head)
	case FormatISO:
		if len(head) < sniffLen || string(head[isoMagicOffset:sniffLen]) != isoMagic {
			return fmt.Errorf("declared iso, but there is no ISO 9660 signature %q at byte %d: %w", isoMagic, isoMagicOffset, errdefs.ErrInvalid)
		}
	}
	return nil
}

// foreignFormat names the image format whose header head starts with, or "".
func foreignFormat(head []byte) string {
	switch {
	case len(head) >= 4 && string(head[:4]) == qcow2Magic:
		return "qcow2"
	case len(head) >= 4 && string(head[:4]) == "KDMV":
		return "vmdk"
	case len(head) >= 8 && string(head[:8]) == "vhdxfile":
		return "vhdx"
	case len(head) >= 68 && binary.LittleEndian.Uint32(head[64:68]) == 0xbeda107f:
		return "vdi"
	}
	return ""
}

// checkQCOW2Header refuses what a template must not be: a qcow2 with a
// backing file, encrypted, with an external data file, or marked corrupt.
func checkQCOW2Header(h []byte) error {
	if len(h) < 72 {
		return fmt.Errorf("qcow2 header is truncated (%d bytes): %w", len(h), errdefs.ErrInvalid)
	}
	version := binary.BigEndian.Uint32(h[4:8])
	if version != 2 && version != 3 {
		return fmt.Errorf("qcow2 version %d: want 2 or 3: %w", version, errdefs.ErrInvalid)
	}
	if off := binary.BigEndian.Uint64(h[8:16]); off != 0 {
		return fmt.Errorf("qcow2 template has a backing file (backing_file_offset %d); templates must be standalone: %w", off, errdefs.ErrInvalid)
	}
	if crypt := binary.BigEndian.Uint32(h[32:36]); crypt != 0 {
		return fmt.Errorf("qcow2 image is encrypted (method %d): %w", crypt, errdefs.ErrInvalid)
	}
	if version == 3 {
		if len(h) < 104 {
			return fmt.Errorf("qcow2 v3 header is truncated (%d bytes): %w", len(h), errdefs.ErrInvalid)
		}
		incompat := binary.BigEndian.Uint64(h[72:80])
		if incompat&(1<<1) != 0 {
			return fmt.Errorf("qcow2 image is marked corrupt: %w", errdefs.ErrInvalid)
		}
		if incompat&(1<<2) != 0 {
			return fmt.Errorf("qcow2 image has an external data file; images must hold their own data: %w", errdefs.ErrInvalid)
		}
	}
	return nil
}
