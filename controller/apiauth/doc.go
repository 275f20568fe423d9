// Package apiauth authenticates and authorizes calls to the controller's
// API with bearer tokens that carry a role, the way kube-apiserver's static
// and bootstrap tokens do.
//
// # Tokens
//
// A token reads "stw_<id>.<secret>": id is 12 random hex digits that name
// the token (in logs, `stowage token list`, job records), secret is 32
// random bytes (crypto/rand) in unpadded base64url. The controller stores
// (controller/meta, kind Tokens) only the id, a name, the role, the
// SHA-256 of the secret, created_at, an optional expires_at and a revoked
// flag; the secret is shown once, by CreateToken, and cannot be recovered.
// A presented secret is hashed and compared in constant time
// (crypto/subtle). Secrets are 256-bit random values, so a plain hash
// (no salt, no slow KDF) is the right tool, as for GitHub's and
// kube-apiserver's bearer tokens.
//
// # Roles
//
// Roles are ordered: Reader < Operator < Admin. A reader may call Get, List
// and Watch procedures; an operator may also create, change and delete
// templates, volumes, snapshots and jobs; an admin may do everything
// (stores, hosts, tokens). The table in roles.go names the minimum role of
// every procedure of every controller service; a test fails when a
// procedure of stowage/v1 is missing from it, and a procedure missing at
// run time needs Admin (fail closed). AgentControlService is Exempt: agents
// authenticate with their mutual-TLS client certificate, not a token.
//
// # Enforcement
//
// Guard is a connect.Interceptor (unary and streaming handlers): it reads
// "Authorization: Bearer …", classifies a missing, malformed, unknown,
// wrong, expired or revoked token as errdefs.ErrUnauthenticated and a
// too-weak role as errdefs.ErrPermissionDenied (errdefs/errconnect turns
// them into Connect codes), logs both at Warn with the token's id and name
// when known, the procedure and the peer address (never the token), and
// puts the Caller into the context (CallerFrom). Guard.RequireRole does the
// same for plain HTTP handlers such as /metrics.
//
// # First admin and a lost admin token
//
// Tokens.Bootstrap, at controller start, creates an admin token named
// "bootstrap-admin" when no usable admin token exists and writes it to a
// file (mode 0600, temporary file + fsync + rename); once an admin token
// exists it does nothing, so the file is never rewritten or printed again.
// To recover from a lost admin token, stop the controller (Badger locks
// its directory) and run `stowage token reset-admin --data-dir DIR`
// (Tokens.ResetAdmin): it revokes every admin token and writes a new one,
// mode 0600, to DIR/admin-recovery.token (or --out). Nothing else needs
// the old token: operator and reader tokens keep working.
//
// # Jobs in flight
//
// The Caller travels to the domain in the context; controller/jobs records
// it on every job it submits (created_by) and caps the unfinished jobs per
// caller. Work the controller starts itself carries no caller and is not
// capped.
package apiauth
