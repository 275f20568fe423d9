package api

import (
	"context"
	"io"

	"connectrpc.com/connect"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
)

// MetadataService is what the metadata handlers need: a backup of the
// whole metadata store written to w (controller/meta's DB.Backup, through
// an adapter in cmd/stowage).
type MetadataService interface {
	Backup(ctx context.Context, w io.Writer) (*stowagev1.BackupSummary, error)
}

// backupChunk bounds the data of one BackupResponse.
const backupChunk = 256 << 10

type metadataHandler struct{ svc MetadataService }

var _ stowagev1connect.MetadataServiceHandler = (*metadataHandler)(nil)

// Backup streams the backup in chunks of at most backupChunk bytes; the
// summary follows in a last message of its own. The stream is what the
// store holds, token hashes included: it is not passed through
// redactReply, and the procedure is admin only (apiauth's role table).
func (h *metadataHandler) Backup(ctx context.Context, _ *connect.Request[stowagev1.BackupRequest], stream *connect.ServerStream[stowagev1.BackupResponse]) error {
	sum, err := h.svc.Backup(ctx, chunkSender{stream})
	if err != nil {
		return err
	}
	return stream.Send(&stowagev1.BackupResponse{Summary: sum})
}

// chunkSender sends what is written to it as BackupResponse data.
type chunkSender struct {
	stream *connect.ServerStream[stowagev1.BackupResponse]
}

func (c chunkSender) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		k := min(len(p), backupChunk)
		if err := c.stream.Send(&stowagev1.BackupResponse{Data: p[:k]}); err != nil {
			return n, err
		}
		n += k
		p = p[k:]
	}
	return n, nil
}
