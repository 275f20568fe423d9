package s3

import (
	"bufio"
	"bytes"
	"fmt"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/stowage/stowage/datapath/s3conn"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/redact"
)

// The details a store takes.
const (
	DetailEndpoint        = "endpoint"             // "http://127.0.0.1:9000"; default https://s3.<region>.amazonaws.com
	DetailRegion          = "region"               // default us-east-1
	DetailCredentialsFile = "credentials_file"     // a file: two lines (access key, secret key) or access_key=… and secret_key=… lines
	DetailCredentialsEnv  = "credentials_env"      // PREFIX: the keys are in $PREFIX_ACCESS_KEY and $PREFIX_SECRET_KEY
	DetailInsecureTLS     = "insecure_skip_verify" // "true": do not verify the endpoint's TLS certificate
)

var knownDetails = []string{DetailEndpoint, DetailRegion, DetailCredentialsFile, DetailCredentialsEnv, DetailInsecureTLS}

// ParseStoreURL splits "s3://bucket/prefix" (the prefix may be empty or
// hold several segments).
func ParseStoreURL(storeURL string) (bucket, prefix string, err error) {
	u, err := url.Parse(storeURL)
	if err != nil || u.Scheme != "s3" || u.Host == "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" || u.Opaque != "" {
		return "", "", fmt.Errorf("store URL %q: want s3://bucket/prefix: %w", redact.URL(storeURL), errdefs.ErrInvalid)
	}
	if err := s3conn.ValidateBucket(u.Host); err != nil {
		return "", "", err
	}
	prefix = strings.Trim(u.Path, "/")
	if prefix != "" {
		if err := checkKey(prefix); err != nil {
			return "", "", fmt.Errorf("store URL %q: prefix: %w", storeURL, err)
		}
	}
	return u.Host, prefix, nil
}

var envPrefix = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// LoadConfig makes the connection settings of a store from its URL and
// details, reading the keys from the credentials file or the environment
// they name. Keys placed directly in the details (access_key, secret_key,
// ...) are refused: details are stored and shown, keys must not be. With
// neither credentials_file nor credentials_env the store is anonymous.
func LoadConfig(storeURL string, details map[string]string) (s3conn.Config, error) {
	bucket, prefix, err := ParseStoreURL(storeURL)
	if err != nil {
		return s3conn.Config{}, err
	}
	for k := range details {
		if !slices.Contains(knownDetails, k) {
			if sensitiveKey(k) {
				return s3conn.Config{}, fmt.Errorf("detail %q: keys do not belong in the details (they are stored and shown); use %s or %s: %w", k, DetailCredentialsFile, DetailCredentialsEnv, errdefs.ErrInvalid)
			}
			return s3conn.Config{}, fmt.Errorf("detail %q: unknown; known: %s: %w", k, strings.Join(knownDetails, ", "), errdefs.ErrInvalid)
		}
	}
	cfg := s3conn.Config{Bucket: bucket, Prefix: prefix, Region: details[DetailRegion], Endpoint: details[DetailEndpoint]}
	if cfg.Endpoint == "" {
		cfg.Endpoint = "https://s3." + cfg.RegionOrDefault() + ".amazonaws.com"
	}
	if v, ok := details[DetailInsecureTLS]; ok {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return s3conn.Config{}, fmt.Errorf("detail %s=%q: want true or false: %w", DetailInsecureTLS, v, errdefs.ErrInvalid)
		}
		cfg.InsecureSkipVerify = b
	}
	file, env := details[DetailCredentialsFile], details[DetailCredentialsEnv]
	switch {
	case file != "" && env != "":
		return s3conn.Config{}, fmt.Errorf("details: give %s or %s, not both: %w", DetailCredentialsFile, DetailCredentialsEnv, errdefs.ErrInvalid)
	case file != "":
		if cfg.AccessKey, cfg.SecretKey, err = readCredentialsFile(file); err != nil {
			return s3conn.Config{}, err
		}
	case env != "":
		if !envPrefix.MatchString(env) {
			return s3conn.Config{}, fmt.Errorf("detail %s=%q: want an environment variable prefix (letters, digits, _): %w", DetailCredentialsEnv, env, errdefs.ErrInvalid)
		}
		cfg.AccessKey, cfg.SecretKey = os.Getenv(env+"_ACCESS_KEY"), os.Getenv(env+"_SECRET_KEY")
		if cfg.AccessKey == "" || cfg.SecretKey == "" {
			return s3conn.Config{}, fmt.Errorf("%s_ACCESS_KEY and %s_SECRET_KEY must both be set: %w", env, env, errdefs.ErrFailedPrecondition)
		}
	}
	if err := cfg.Validate(); err != nil {
		return s3conn.Config{}, err
	}
	return cfg, nil
}

// readCredentialsFile reads two non-empty lines (access key, then secret
// key) or KEY=VALUE lines with access_key and secret_key (also the AWS
// names aws_access_key_id and aws_secret_access_key). Blank lines and lines
// starting with '#' are skipped. A file others can read is refused. Errors
// never quote the file's content.
func readCredentialsFile(path string) (access, secret string, err error) {
	fi, err := os.Stat(path)
	if err != nil {
		return "", "", fmt.Errorf("credentials file %s: %w", path, classOS(err))
	}
	if fi.Mode().Perm()&0o004 != 0 {
		return "", "", fmt.Errorf("credentials file %s is readable by everyone (mode %v); chmod o-r it: %w", path, fi.Mode().Perm(), errdefs.ErrFailedPrecondition)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", "", fmt.Errorf("credentials file %s: %w", path, classOS(err))
	}
	var lines []string
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if l != "" && !strings.HasPrefix(l, "#") {
			lines = append(lines, l)
		}
	}
	bad := fmt.Errorf("credentials file %s: want two lines (access key, secret key) or access_key=... and secret_key=... lines: %w", path, errdefs.ErrInvalid)
	if len(lines) == 2 && !strings.Contains(lines[0], "=") && !strings.Contains(lines[1], "=") {
		return lines[0], lines[1], nil
	}
	for _, l := range lines {
		k, v, ok := strings.Cut(l, "=")
		if !ok {
			return "", "", bad
		}
		v = strings.Trim(strings.TrimSpace(v), `"'`)
		switch strings.ToLower(strings.TrimSpace(k)) {
		case "access_key", "aws_access_key_id":
			access = v
		case "secret_key", "aws_secret_access_key":
			secret = v
		}
	}
	if access == "" || secret == "" {
		return "", "", bad
	}
	return access, secret, nil
}

// Redacted replaces a sensitive value in RedactDetails' result.
const Redacted = redact.Marker

// sensitiveKey reports whether a detail's name says it holds a secret.
func sensitiveKey(k string) bool {
	k = strings.ToLower(k)
	for _, s := range []string{"secret", "password", "passwd", "token", "access_key", "accesskey", "private", "credential_value", "session"} {
		if strings.Contains(k, s) {
			return true
		}
	}
	return false
}

// RedactDetails returns a copy of details safe to show or log: values of
// keys that name a secret (secret_key, password, token, access_key, ...)
// become Redacted, and URLs lose their user information and query. The
// names of a credentials file or environment prefix are kept: they are
// where the keys are, not the keys.
func RedactDetails(details map[string]string) map[string]string {
	if details == nil {
		return nil
	}
	out := make(map[string]string, len(details))
	for k, v := range details {
		switch {
		case sensitiveKey(k):
			out[k] = Redacted
		case strings.Contains(v, "://"):
			out[k] = redact.URL(v)
		default:
			out[k] = v
		}
	}
	return out
}
