// Package s3 holds the pieces of an S3 image store (issue 11): objects in a
// bucket under a prefix, reached with minio-go. The Provider, LifeCycle and
// Driver that make it a Stowage driver are not here yet; this package is
// what they will be built from.
//
//   - Config: a store URL "s3://bucket/prefix" and a details map (endpoint,
//     region, credentials_file or credentials_env) become an s3conn.Config
//     (LoadConfig); RedactDetails makes a details map safe to echo.
//   - Store: one bucket and prefix. Import streams a template from an
//     http(s) URL into an object, checking the checksum and the format
//     in-stream, so that a failed import leaves nothing in the bucket.
//     Stat, List, Delete (idempotent), Copy (server side) and PresignGet
//     cover the rest.
//
// Keys given to a Store are relative to its prefix ("templates/t1.qcow2"):
// segments of printable characters other than '\' separated by single
// slashes, no "." or ".." segment. Errors carry errdefs classes
// (s3conn.Class) and never a key pair or the query of a source URL.
//
//	cfg, err := s3.LoadConfig("s3://images/zone1", map[string]string{
//		"endpoint": "http://127.0.0.1:9000", "credentials_file": "/etc/stowage/s3.cred"})
//	st, err := s3.Open(ctx, cfg)
//	res, err := st.Import(ctx, s3.ImportRequest{URL: "https://example.org/t.qcow2",
//		Key: "templates/t1.qcow2", Format: s3.FormatQCOW2, Checksum: "sha256:…"})
//	u, err := st.PresignGet(ctx, "templates/t1.qcow2", time.Hour)
//
// Tests run against a real S3 server (drivers/s3/s3test: versitygw).
package s3
