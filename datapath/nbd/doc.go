// Package nbd is Stowage's Network Block Device export server and userspace
// client (NetworkBlockDevice/nbd doc/proto.md). It needs no kernel module on
// either side.
//
// # Server
//
//	srv := nbd.NewServer(nbd.ServerOptions{Logger: log})
//	if err := srv.AddExport("v1", "/srv/primary/v1.raw", nbd.ExportOptions{}); err != nil { ... }
//	l, _ := net.Listen("unix", "/run/stowage/v1.sock")
//	err := srv.Serve(ctx, l) // until ctx ends
//
// What it speaks:
//
//   - Fixed newstyle handshake with NBD_OPT_EXPORT_NAME, GO, INFO, LIST,
//     ABORT, STRUCTURED_REPLY, LIST_META_CONTEXT and SET_META_CONTEXT
//     (base:allocation), and STARTTLS when ServerOptions.TLS is set (see
//     TLS below); without it STARTTLS is refused with NBD_REP_ERR_UNSUP.
//   - READ, WRITE, FLUSH, TRIM, WRITE_ZEROES (NO_HOLE, FAST_ZERO), CACHE,
//     BLOCK_STATUS and DISC, the FUA flag (fdatasync before the reply) and
//     DF. With structured replies, reads of holes are sent as
//     NBD_REPLY_TYPE_OFFSET_HOLE chunks and errors carry a message.
//   - Transmission flags: HAS_FLAGS, READ_ONLY or SEND_FUA/TRIM/
//     WRITE_ZEROES/FAST_ZERO, SEND_FLUSH, SEND_CACHE, SEND_DF (structured
//     only) and CAN_MULTI_CONN: every connection to an export shares its one
//     Backend (one file descriptor), so a FLUSH covers writes made through
//     all of them.
//   - Block size constraints: minimum 1, preferred 4096, maximum payload
//     32 MiB (MaxPayload).
//
// Each connection has a reader goroutine that decodes requests and hands
// them to a bounded pool of workers (ServerOptions.Workers); replies are
// written whole under one mutex in completion order, matched by cookie.
// Payload bytes in flight are bounded over the whole server
// (ServerOptions.MaxInFlight). A read is complete in memory before its reply
// starts, so a read error is an error reply, never a success followed by a
// disconnect.
//
// Malformed input: a bad request magic ends that connection (the stream
// cannot be resynchronised). Unknown commands or flags get EINVAL; requests
// beyond the end get EINVAL (ENOSPC for writes and zeroes, as the
// specification asks); reads over 32 MiB get EINVAL (EOVERFLOW with
// structured replies); writes over 32 MiB are skipped and answered EINVAL,
// and over 64 MiB the connection is closed. A client that disconnects
// mid-request just ends its connection; other connections keep serving.
//
// # TLS
//
// With ServerOptions.TLS a client may send NBD_OPT_STARTTLS (what nbds://
// URIs of libnbd, qemu's tls-creds and nbdkit --tls do): the server ACKs,
// both sides run a TLS handshake on the same connection, and option
// negotiation starts again inside TLS, with what was negotiated before
// forgotten. Plaintext bytes a client pipelines behind STARTTLS close the
// connection (they could be an attacker's injection); a second STARTTLS is
// NBD_REP_ERR_INVALID. With ServerOptions.TLSRequired every option other
// than STARTTLS and ABORT gets NBD_REP_ERR_TLS_REQD before TLS is up, and
// NBD_OPT_EXPORT_NAME (which has no error reply) closes the connection.
// The tls.Config is used as given: certificates, client authentication
// (ClientAuth, ClientCAs) and rotation (GetCertificate) are the caller's.
// Under TLS replies are written through crypto/tls (one record per 16 KiB)
// instead of writev on the socket; the plaintext path is unchanged.
//
// # Client
//
// Dial opens one or more connections to an export (nbd://host:port/name or
// nbd+unix:///name?socket=path; nbds:// and nbds+unix:// with
// ClientOptions.TLS start TLS first, and a server that requires TLS
// answering a plaintext client is errdefs.ErrPermissionDenied) and offers ReadAt, WriteAt, Zero, Trim,
// Flush and BlockStatus, several requests in flight per connection.
// OpenSource and OpenSink adapt it to datapath/stream, and Register wires
// the nbd and nbd+unix URL schemes into stream.OpenSource/OpenSink
// (RegisterTLS nbds and nbds+unix, with the binary's TLS config).
//
// The package imports nothing of the control plane; errors carry errdefs
// classes.
package nbd
