// Package s3conn holds what every Stowage user of S3 shares: the settings
// of one bucket and key prefix (Config), a minio-go client built from them,
// object keys under the prefix, and the mapping of S3 and transport errors
// to errdefs classes (Class).
//
// Secrets never leave a Config: String, GoString and LogValue print the
// endpoint, bucket and prefix only, and errors built here name endpoint,
// bucket and key, never a key pair.
//
//	cfg := s3conn.Config{Endpoint: "http://127.0.0.1:9000", Bucket: "images",
//		Prefix: "stowage/s1", AccessKey: ak, SecretKey: sk}
//	c, err := cfg.NewClient()
//	_, err = c.StatObject(ctx, cfg.Bucket, cfg.Key("manifests/a.json"), minio.StatObjectOptions{})
//	if errors.Is(s3conn.Class(err), errdefs.ErrNotFound) { ... }
package s3conn

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"syscall"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/redact"
)

// DefaultRegion is the region when Config.Region is empty.
const DefaultRegion = "us-east-1"

// Config says where objects live and how to reach them.
type Config struct {
	// Endpoint is the server's base URL: "http://127.0.0.1:9000",
	// "https://s3.eu-west-1.amazonaws.com". The scheme picks TLS; no path.
	Endpoint string
	// Region is the bucket's region (DefaultRegion when empty).
	Region string
	// Bucket is the bucket name.
	Bucket string
	// Prefix is put before every key ("" or "a/b"; slashes at either end
	// are ignored).
	Prefix string
	// AccessKey and SecretKey sign requests. Both empty means anonymous.
	AccessKey, SecretKey string
	// InsecureSkipVerify turns off TLS certificate verification (https
	// endpoints with a self-signed certificate, in tests).
	InsecureSkipVerify bool
}

// String describes c without its keys.
func (c Config) String() string {
	s := fmt.Sprintf("s3 %s bucket %s", c.endpointForHumans(), c.Bucket)
	if p := c.prefix(); p != "" {
		s += " prefix " + p
	}
	return s
}

// GoString is String, so that %#v cannot print the keys either.
func (c Config) GoString() string { return c.String() }

// LogValue logs c without its keys.
func (c Config) LogValue() slog.Value {
	return slog.GroupValue(slog.String("endpoint", c.endpointForHumans()),
		slog.String("bucket", c.Bucket), slog.String("prefix", c.prefix()))
}

func (c Config) endpointForHumans() string { return redact.URL(c.Endpoint) }

func (c Config) prefix() string { return strings.Trim(c.Prefix, "/") }

// Key returns the object key for rel under the prefix.
func (c Config) Key(rel string) string {
	if p := c.prefix(); p != "" {
		return p + "/" + rel
	}
	return rel
}

// RegionOrDefault is Region, or DefaultRegion when it is empty.
func (c Config) RegionOrDefault() string {
	if c.Region == "" {
		return DefaultRegion
	}
	return c.Region
}

// endpoint splits Endpoint into host:port and whether it is TLS.
func (c Config) endpoint() (host string, secure bool, err error) {
	u, err := url.Parse(c.Endpoint)
	if err != nil {
		return "", false, fmt.Errorf("s3 endpoint: not a URL: %w", errdefs.ErrInvalid)
	}
	switch {
	case u.Scheme != "http" && u.Scheme != "https":
		return "", false, fmt.Errorf("s3 endpoint %s: want an http:// or https:// URL: %w", redact.URL(u.String()), errdefs.ErrInvalid)
	case u.Host == "":
		return "", false, fmt.Errorf("s3 endpoint %s: no host: %w", redact.URL(u.String()), errdefs.ErrInvalid)
	case u.User != nil:
		return "", false, fmt.Errorf("s3 endpoint %s: credentials do not belong in the URL: %w", redact.URL(u.String()), errdefs.ErrInvalid)
	case strings.Trim(u.Path, "/") != "" || u.RawQuery != "" || u.Fragment != "":
		return "", false, fmt.Errorf("s3 endpoint %s: want no path or query (the bucket and prefix are separate): %w", redact.URL(u.String()), errdefs.ErrInvalid)
	}
	return u.Host, u.Scheme == "https", nil
}

// Validate checks the settings without contacting the server.
func (c Config) Validate() error {
	if _, _, err := c.endpoint(); err != nil {
		return err
	}
	if err := ValidateBucket(c.Bucket); err != nil {
		return err
	}
	if (c.AccessKey == "") != (c.SecretKey == "") {
		return fmt.Errorf("%s: give both an access key and a secret key, or neither: %w", c, errdefs.ErrInvalid)
	}
	p := c.prefix()
	if strings.Contains(p, "//") || strings.Contains("/"+p+"/", "/../") || strings.Contains("/"+p+"/", "/./") {
		return fmt.Errorf("s3 prefix %q: empty, . or .. segment: %w", c.Prefix, errdefs.ErrInvalid)
	}
	return nil
}

// ValidateBucket checks a bucket name against the S3 naming rules (3-63
// characters: lower-case letters, digits, dots and hyphens, starting and
// ending with a letter or digit).
func ValidateBucket(b string) error {
	ok := len(b) >= 3 && len(b) <= 63
	for i := 0; ok && i < len(b); i++ {
		c := b[i]
		alnum := c >= 'a' && c <= 'z' || c >= '0' && c <= '9'
		ok = alnum || (c == '.' || c == '-') && i > 0 && i < len(b)-1
	}
	if !ok || strings.Contains(b, "..") {
		return fmt.Errorf("s3 bucket %q: want 3-63 lower-case letters, digits, dots or hyphens: %w", b, errdefs.ErrInvalid)
	}
	return nil
}

// NewClient returns a minio-go client for c. It does not contact the
// server.
func (c Config) NewClient() (*minio.Client, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	host, secure, _ := c.endpoint()
	tr, err := minio.DefaultTransport(secure)
	if err != nil {
		return nil, fmt.Errorf("%s: transport: %w", c, errdefs.ErrInternal)
	}
	if secure && c.InsecureSkipVerify {
		if tr.TLSClientConfig == nil {
			tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
		}
		tr.TLSClientConfig.InsecureSkipVerify = true
	}
	creds := credentials.NewStaticV4(c.AccessKey, c.SecretKey, "") // empty keys sign anonymously
	cl, err := minio.New(host, &minio.Options{Creds: creds, Secure: secure, Region: c.RegionOrDefault(),
		Transport: tr, BucketLookup: minio.BucketLookupPath})
	if err != nil {
		return nil, fmt.Errorf("%s: client: %v: %w", c, err, errdefs.ErrInvalid)
	}
	return cl, nil
}

// Class returns err with an errdefs class added (errors.Join) when it has
// none: S3 error codes first (NoSuchKey is ErrNotFound, AccessDenied
// ErrPermissionDenied, SlowDown ErrUnavailable, ...), then the HTTP status,
// then transport failures (ErrUnavailable). Context errors are left as
// they are; anything else is ErrInternal.
func Class(err error) error {
	if err == nil || errdefs.Class(err) != nil {
		return err
	}
	var class error
	if resp := minio.ToErrorResponse(err); resp.Code != "" || resp.StatusCode != 0 {
		class = codeClass(resp.Code, resp.StatusCode)
	}
	if class == nil {
		var nerr net.Error
		var uerr *url.Error
		switch {
		case errors.As(err, &nerr), errors.As(err, &uerr), errors.Is(err, syscall.ECONNREFUSED),
			errors.Is(err, syscall.ECONNRESET), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, syscall.EPIPE):
			class = errdefs.ErrUnavailable
		default:
			class = errdefs.ErrInternal
		}
	}
	return errors.Join(err, class)
}

// codeClass maps an S3 error code or HTTP status to a class, nil if neither says.
func codeClass(code string, status int) error {
	switch code {
	case "NoSuchKey", "NoSuchBucket", "NoSuchUpload", "NotFound", "NoSuchVersion":
		return errdefs.ErrNotFound
	case "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled", "AccountProblem", "ExpiredToken", "InvalidToken":
		return errdefs.ErrPermissionDenied
	case "PreconditionFailed":
		return errdefs.ErrFailedPrecondition
	case "BucketAlreadyExists", "BucketAlreadyOwnedByYou":
		return errdefs.ErrAlreadyExists
	case "InvalidBucketName", "InvalidArgument", "KeyTooLongError", "InvalidObjectName", "InvalidRange", "MalformedXML", "InvalidRequest", "AuthorizationHeaderMalformed":
		return errdefs.ErrInvalid
	case "EntityTooLarge", "QuotaExceeded", "TooManyBuckets":
		return errdefs.ErrResourceExhausted
	case "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeTooSkewed", "OperationAborted":
		return errdefs.ErrUnavailable
	case "BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch":
		return errdefs.ErrDataLoss
	case "NotImplemented":
		return errdefs.ErrNotImplemented
	}
	switch {
	case status == http.StatusNotFound:
		return errdefs.ErrNotFound
	case status == http.StatusForbidden || status == http.StatusUnauthorized:
		return errdefs.ErrPermissionDenied
	case status == http.StatusPreconditionFailed:
		return errdefs.ErrFailedPrecondition
	case status == http.StatusConflict:
		return errdefs.ErrConflict
	case status == http.StatusTooManyRequests || status >= 500:
		return errdefs.ErrUnavailable
	case status >= 400:
		return errdefs.ErrInvalid
	}
	return nil
}

// IsNotFound reports whether err is a missing key or bucket.
func IsNotFound(err error) bool { return errors.Is(Class(err), errdefs.ErrNotFound) }

// Ping checks that the bucket exists and the keys are accepted
// (errdefs.ErrNotFound for a missing bucket, ErrPermissionDenied for
// refused keys, ErrUnavailable when the server does not answer).
func Ping(ctx context.Context, c *minio.Client, cfg Config) error {
	ok, err := c.BucketExists(ctx, cfg.Bucket)
	if err != nil {
		return fmt.Errorf("%s: %w", cfg, Class(err))
	}
	if !ok {
		return fmt.Errorf("%s: no such bucket: %w", cfg, errdefs.ErrNotFound)
	}
	return nil
}

// URI renders c without its keys as s3://bucket/prefix?endpoint=…&region=…
// (&insecure=1), the form a chunk store travels in to an agent; the keys
// travel beside it, as a secret (Secret).
func (c Config) URI() string {
	q := url.Values{}
	q.Set("endpoint", c.Endpoint)
	if c.Region != "" {
		q.Set("region", c.Region)
	}
	if c.InsecureSkipVerify {
		q.Set("insecure", "1")
	}
	return "s3://" + c.Bucket + "/" + strings.Trim(c.Prefix, "/") + "?" + q.Encode()
}

// Secret returns c's keys as the map that travels beside its URI.
func (c Config) Secret() map[string]string {
	return map[string]string{"access_key": c.AccessKey, "secret_key": c.SecretKey}
}

// ParseURI is the inverse of URI and Secret.
func ParseURI(uri string, secret map[string]string) (Config, error) {
	u, err := url.Parse(uri)
	if err != nil || u.Scheme != "s3" || u.Host == "" {
		return Config{}, fmt.Errorf("chunk store %q: want s3://bucket/prefix?endpoint=URL: %w", redact.URL(uri), errdefs.ErrInvalid)
	}
	q := u.Query()
	c := Config{Endpoint: q.Get("endpoint"), Region: q.Get("region"), Bucket: u.Host, Prefix: strings.Trim(u.Path, "/"),
		AccessKey: secret["access_key"], SecretKey: secret["secret_key"], InsecureSkipVerify: q.Get("insecure") == "1"}
	if err := c.Validate(); err != nil {
		return Config{}, err
	}
	return c, nil
}
