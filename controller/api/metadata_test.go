package api

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http/httptest"
	"testing"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
	"github.com/stowage/stowage/rpclimit"
)

// fakeBackup writes data, then fails with err or returns its summary.
type fakeBackup struct {
	data []byte
	err  error
}

func (f fakeBackup) Backup(_ context.Context, w io.Writer) (*stowagev1.BackupSummary, error) {
	if _, err := w.Write(f.data); err != nil {
		return nil, err
	}
	if f.err != nil {
		return nil, f.err
	}
	return &stowagev1.BackupSummary{Bytes: uint64(len(f.data)), Sha256: "x"}, nil
}

// Backup streams the bytes in chunks of at most backupChunk, then the
// summary alone; a failure after some data reaches the client as its
// class's code, so the CLI never takes a part for the whole.
func TestBackupStreamsChunksThenSummary(t *testing.T) {
	data := bytes.Repeat([]byte("0123456789abcdef"), (2*backupChunk+1000)/16)
	for _, c := range []struct {
		name string
		svc  fakeBackup
		code connect.Code
	}{
		{"whole", fakeBackup{data: data}, 0},
		{"fails midway", fakeBackup{data: data, err: fmt.Errorf("meta: backup: %w", errdefs.ErrFailedPrecondition)}, connect.CodeFailedPrecondition},
	} {
		t.Run(c.name, func(t *testing.T) {
			srv := httptest.NewServer(NewHandler(Services{Metadata: c.svc}, prometheus.NewRegistry(), rpclimit.Limits{}))
			defer srv.Close()
			mc := stowagev1connect.NewMetadataServiceClient(srv.Client(), srv.URL)
			stream, err := mc.Backup(context.Background(), connect.NewRequest(&stowagev1.BackupRequest{}))
			if err != nil {
				t.Fatal(err)
			}
			var got bytes.Buffer
			var msgs int
			var sum *stowagev1.BackupSummary
			for stream.Receive() {
				msgs++
				m := stream.Msg()
				if len(m.GetData()) > backupChunk {
					t.Fatalf("a message of %d bytes", len(m.GetData()))
				}
				if sum != nil {
					t.Fatal("a message after the summary")
				}
				if m.GetSummary() != nil && len(m.GetData()) != 0 {
					t.Fatal("summary and data in one message")
				}
				got.Write(m.GetData())
				sum = m.GetSummary()
			}
			if c.code != 0 {
				if connect.CodeOf(stream.Err()) != c.code || sum != nil {
					t.Fatalf("err %v, summary %v; want %v and none", stream.Err(), sum, c.code)
				}
				return
			}
			if err := stream.Err(); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got.Bytes(), data) || sum.GetBytes() != uint64(len(data)) || msgs != 4 {
				t.Fatalf("%d messages, %d bytes, summary %v", msgs, got.Len(), sum)
			}
		})
	}
}
