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
//     (base:allocation). STARTTLS is refused with NBD_REP_ERR_UNSUP: there
//     is no TLS; serve on a unix socket or a trusted network.
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
// # Client
//
// Dial opens one or more connections to an export (nbd://host:port/name or
// nbd+unix:///name?socket=path) and offers ReadAt, WriteAt, Zero, Trim,
// Flush and BlockStatus, several requests in flight per connection.
// OpenSource and OpenSink adapt it to datapath/stream, and Register wires
// the nbd and nbd+unix URL schemes into stream.OpenSource/OpenSink.
//
// The package imports nothing of the control plane; errors carry errdefs
// classes.
package nbd
