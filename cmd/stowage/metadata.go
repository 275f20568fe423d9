package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/stowage/stowage/controller/api"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/datapath/durable"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
	"github.com/stowage/stowage/trust"
)

// metadataService serves MetadataService from the controller's DB.
type metadataService struct{ db *meta.DB }

var _ api.MetadataService = metadataService{}

func (m metadataService) Backup(ctx context.Context, w io.Writer) (*stowagev1.BackupSummary, error) {
	info, err := m.db.Backup(ctx, w)
	if err != nil {
		return nil, err
	}
	return backupSummary(info), nil
}

func backupSummary(info meta.BackupInfo) *stowagev1.BackupSummary {
	return &stowagev1.BackupSummary{
		FormatVersion: uint32(info.FormatVersion),
		SchemaVersion: uint32(info.SchemaVersion),
		Records:       uint64(info.Records),
		Bytes:         uint64(info.Bytes),
		Sha256:        info.Checksum(),
		TakenAt:       timestamppb.New(info.TakenAt),
	}
}

// newMetadataCmd is `stowage metadata`: backups of the controller's
// metadata (records, indexes, token hashes; not its CA, see
// docs/operations.md).
func newMetadataCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "metadata",
		Short: "Back up the controller's metadata (admin only), verify a backup, restore one (controller stopped)",
		Long: "A backup holds every record of the metadata store from one consistent snapshot, the hashes of\n" +
			"API tokens and join tokens included: keep it as secret as the controller's data directory.\n" +
			"It does not hold the controller's CA and CHAP key (DATA/pki/) or its admin token file: back those up too.",
	}
	cmd.AddCommand(newMetadataBackupCmd(), newMetadataVerifyCmd(), newMetadataRestoreCmd())
	return cmd
}

func newMetadataBackupCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "backup FILE",
		Short: "Take a backup of the running controller's metadata into FILE (mode 0600, replaced atomically)",
		Args:  exactArgs(1, "the file to write the backup to"),
		RunE: func(cmd *cobra.Command, args []string) error {
			asJSON, err := outputJSON(cmd)
			if err != nil {
				return err
			}
			conn, err := connectionOf(cmd)
			if err != nil {
				return err
			}
			// No overall timeout: a backup lasts as long as the store is big.
			hc := &http.Client{Transport: conn.client.Transport}
			mc := stowagev1connect.NewMetadataServiceClient(hc, conn.url, conn.credentials(cmd))
			sum, err := backupToFile(cmd.Context(), mc, args[0])
			if err != nil {
				var ce *connect.Error
				if errors.As(err, &ce) {
					return (&clients{url: conn.url}).rpcErr(err)
				}
				return err
			}
			return emit(cmd, asJSON, sum, func(w io.Writer) {
				fmt.Fprintf(w, "backup written to %s\n", args[0])
				printBackupSummary(w, sum)
			})
		},
	}
}

// backupToFile streams a backup into a temporary file beside path (0600,
// O_EXCL), checks it whole against the summary the controller sent,
// fsyncs it, renames it over path and fsyncs the directory: path holds
// the previous backup or the new one, never a part.
func backupToFile(ctx context.Context, mc stowagev1connect.MetadataServiceClient, path string) (*stowagev1.BackupSummary, error) {
	dir := filepath.Dir(path)
	var rnd [8]byte
	_, _ = rand.Read(rnd[:])
	tmp := filepath.Join(dir, ".tmp-"+filepath.Base(path)+"-"+hex.EncodeToString(rnd[:]))
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("backup: %w", err)
	}
	done := false
	defer func() {
		if !done {
			f.Close()
			os.Remove(tmp)
		}
	}()
	stream, err := mc.Backup(ctx, connect.NewRequest(&stowagev1.BackupRequest{}))
	if err != nil {
		return nil, err
	}
	defer stream.Close()
	var sum *stowagev1.BackupSummary
	for stream.Receive() {
		msg := stream.Msg()
		if _, err := f.Write(msg.GetData()); err != nil {
			return nil, fmt.Errorf("backup: write %s: %w", tmp, err)
		}
		if msg.GetSummary() != nil {
			sum = msg.GetSummary()
		}
	}
	if err := stream.Err(); err != nil {
		return nil, err
	}
	if sum == nil {
		return nil, fmt.Errorf("backup: the stream ended without its summary: %w", errdefs.ErrDataLoss)
	}
	if err := f.Sync(); err != nil {
		return nil, fmt.Errorf("backup: sync %s: %w", tmp, err)
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return nil, fmt.Errorf("backup: %w", err)
	}
	info, err := meta.VerifyBackup(ctx, f)
	if err != nil {
		return nil, fmt.Errorf("backup: the file received does not verify: %w", err)
	}
	if info.Checksum() != sum.GetSha256() || uint64(info.Records) != sum.GetRecords() {
		return nil, fmt.Errorf("backup: the file received (sha256 %s, %d records) is not what the controller sent (sha256 %s, %d records): %w",
			info.Checksum(), info.Records, sum.GetSha256(), sum.GetRecords(), errdefs.ErrDataLoss)
	}
	if err := f.Close(); err != nil {
		return nil, fmt.Errorf("backup: %w", err)
	}
	done = true
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return nil, fmt.Errorf("backup: %w", err)
	}
	if err := durable.SyncDir(dir); err != nil {
		return nil, fmt.Errorf("backup: sync %s: %w", dir, err)
	}
	return sum, nil
}

func printBackupSummary(w io.Writer, s *stowagev1.BackupSummary) {
	keyValues(w, [][2]string{
		{"Taken", s.GetTakenAt().AsTime().Local().Format("2006-01-02T15:04:05Z07:00")},
		{"Schema version", fmt.Sprint(s.GetSchemaVersion())},
		{"Format version", fmt.Sprint(s.GetFormatVersion())},
		{"Keys", fmt.Sprint(s.GetRecords())},
		{"Bytes", fmt.Sprint(s.GetBytes())},
		{"SHA-256", s.GetSha256()},
	})
}

func newMetadataVerifyCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "verify FILE",
		Short: "Check a backup file whole (format, order, count, SHA-256) without restoring it",
		Args:  exactArgs(1, "a backup file"),
		RunE: func(cmd *cobra.Command, args []string) error {
			asJSON, err := outputJSON(cmd)
			if err != nil {
				return err
			}
			f, err := os.Open(args[0])
			if err != nil {
				return fmt.Errorf("verify: %w", err)
			}
			defer f.Close()
			info, err := meta.VerifyBackup(cmd.Context(), f)
			if err != nil {
				return fmt.Errorf("verify %s: %w", args[0], err)
			}
			sum := backupSummary(info)
			return emit(cmd, asJSON, sum, func(w io.Writer) {
				fmt.Fprintf(w, "%s is a complete backup\n", args[0])
				printBackupSummary(w, sum)
			})
		},
	}
}

// newMetadataRestoreCmd restores offline: into the data directory of a
// stopped controller that holds no metadata yet, or into an empty etcd
// prefix no controller uses.
func newMetadataRestoreCmd() *cobra.Command {
	var dataDir, spec string
	var etcd meta.EtcdOptions
	cmd := &cobra.Command{
		Use:   "restore (--data-dir DIR | --metadata etcd://HOST:PORT/PREFIX) FILE",
		Short: "Restore a backup into an empty metadata store (controllers stopped)",
		Long: "Restore loads a backup into an empty metadata store: the Badger database in --data-dir (or in the\n" +
			"directory --metadata names) of a controller that is stopped and holds no metadata yet (a new\n" +
			"directory, or one with only pki/ and admin.token copied in), or an etcd prefix that holds nothing.\n" +
			"It checks the whole file first, refuses a store in use or with records, then writes, migrates an\n" +
			"older schema and checks every index. A restore that fails is undone; one cut short by a crash\n" +
			"leaves a store the controller refuses to open: empty it and restore again.",
		Args: exactArgs(1, "a backup file (from `stowage metadata backup`)"),
		RunE: func(cmd *cobra.Command, args []string) error {
			asJSON, err := outputJSON(cmd)
			if err != nil {
				return err
			}
			target := spec
			if target == "" {
				target = dataDir
			}
			if target == "" {
				return usageError{fmt.Errorf("--data-dir or --metadata: where to restore to: %w", errdefs.ErrInvalid)}
			}
			f, err := os.Open(args[0])
			if err != nil {
				return fmt.Errorf("restore: %w", err)
			}
			defer f.Close()
			// A damaged or unknown file is refused before the store is
			// created or touched.
			if _, err := meta.VerifyBackup(cmd.Context(), f); err != nil {
				return fmt.Errorf("restore: %s: %w", args[0], err)
			}
			if _, err := f.Seek(0, io.SeekStart); err != nil {
				return fmt.Errorf("restore: %w", err)
			}
			if !strings.HasPrefix(target, "etcd:") {
				if err := os.MkdirAll(target, 0o700); err != nil {
					return fmt.Errorf("restore: %w", err)
				}
			}
			db, err := meta.Open(target, meta.WithEtcd(etcd))
			if errors.Is(err, errdefs.ErrUnavailable) && !strings.HasPrefix(target, "etcd:") {
				return fmt.Errorf("restore: %w (is a controller running on it? stop it first: it locks the database)", err)
			}
			if err != nil {
				return fmt.Errorf("restore: %w", err)
			}
			info, err := meta.Restore(cmd.Context(), db, f)
			where := db.Location()
			if cerr := db.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return fmt.Errorf("restore into %s: %w", where, err)
			}
			sum := backupSummary(info)
			return emit(cmd, asJSON, sum, func(w io.Writer) {
				fmt.Fprintf(w, "restored into %s\n", where)
				printBackupSummary(w, sum)
				if dataDir == "" {
					return
				}
				if _, err := os.Stat(filepath.Join(pkiDir(dataDir), trust.CAKeyFile)); errors.Is(err, fs.ErrNotExist) {
					fmt.Fprintf(cmd.ErrOrStderr(), "warning: %s has no CA (%s): copy the old controller's pki/ directory in before starting it,\n"+
						"or it makes a new CA and CHAP key, and every agent must join again and iSCSI secrets change\n",
						dataDir, filepath.Join(pkiDir(dataDir), trust.CAKeyFile))
				}
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&dataDir, "data-dir", "", "the stopped controller's data directory (its metadata unless --metadata is given)")
	f.StringVar(&spec, "metadata", "", "the metadata store to restore into, as the controller's --metadata: a directory or etcd://host:port[,host:port...]/prefix")
	// The controller's etcd flags (cmd/stowage/controller.go), for --metadata etcd://.
	f.StringVar(&etcd.CACert, "etcd-cacert", "", "CA bundle of the etcd members' certificates (enables TLS to etcd)")
	f.StringVar(&etcd.Cert, "etcd-cert", "", "client certificate for etcd (mutual TLS)")
	f.StringVar(&etcd.Key, "etcd-key", "", "client key for etcd")
	f.StringVar(&etcd.Username, "etcd-user", "", "etcd user (when the cluster has auth enabled)")
	f.StringVar(&etcd.PasswordFile, "etcd-password-file", "", "file holding the etcd user's password")
	f.IntVar(&etcd.MaxTxnOps, "etcd-max-txn-ops", 128, "the etcd cluster's --max-txn-ops")
	return cmd
}
