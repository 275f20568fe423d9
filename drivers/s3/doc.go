// Package s3 is the "s3" storage provider: image stores on an S3 bucket
// under a prefix, reached with minio-go. Templates and ISOs are objects
// (templates/<id>.<raw|qcow2|iso>), snapshot backups are content-addressed
// chunk objects and one manifest object each (backups/chunks/<hh>/<sha256>,
// backups/manifests/<id>.json, datapath/chunkstore's S3 backend), and the
// prefix carries a marker object naming the store that owns it.
//
//   - Import (drivers.Importer) streams a template from its URL into the
//     bucket in this process: multipart, checksum and format checked
//     in-stream, nothing left on failure; no local copy anywhere.
//   - GrantAccess hands hosts presigned GET URLs (read, attach): a volume is
//     made from an S3 template by an agent reading that URL, and a host's
//     template mount fetches it by presigned Range GETs; no host holds the
//     bucket's keys for that. Writing through a host is refused.
//   - CanCopy/Copy: a server-side copy inside one store.
//   - ChunkTarget: backups are written and read by the agent of the host
//     that reads the snapshot, which gets the chunk store's URI and keys
//     for that task (see BackupAccess); DeleteBackup runs here.
//
// The pieces it is built from:
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
