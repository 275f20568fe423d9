package connector

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/redact"
)

// iscsiadm exit codes, from open-iscsi include/iscsi_err.h (the messages
// are those of usr/iscsi_err.c).
const (
	exitOK             = 0  // ISCSI_SUCCESS
	exitSessNotFound   = 2  // ISCSI_ERR_SESS_NOT_FOUND "session not found"
	exitTrans          = 4  // ISCSI_ERR_TRANS "encountered connection failure"
	exitLogin          = 5  // ISCSI_ERR_LOGIN "encountered iSCSI login failure"
	exitInval          = 7  // ISCSI_ERR_INVAL "invalid parameter"
	exitTransTimeout   = 8  // ISCSI_ERR_TRANS_TIMEOUT "connection timed out"
	exitPDUTimeout     = 11 // ISCSI_ERR_PDU_TIMEOUT "iSCSI PDU timed out"
	exitTransNotFound  = 12 // ISCSI_ERR_TRANS_NOT_FOUND "iSCSI driver not found"
	exitAccess         = 13 // ISCSI_ERR_ACCESS "daemon access denied"
	exitSessExists     = 15 // ISCSI_ERR_SESS_EXISTS "session exists"
	exitISCSIDComm     = 18 // ISCSI_ERR_ISCSID_COMM_ERR "could not communicate to iscsid"
	exitFatalLogin     = 19 // ISCSI_ERR_FATAL_LOGIN "encountered non-retryable iSCSI login failure"
	exitISCSIDNotConn  = 20 // ISCSI_ERR_ISCSID_NOTCONN "could not connect to iscsid"
	exitNoObjsFound    = 21 // ISCSI_ERR_NO_OBJS_FOUND "no objects found"
	exitLoginAuthFaild = 24 // ISCSI_ERR_LOGIN_AUTH_FAILED "iSCSI login failed due to authorization failure"
)

// ExitError is a failed iscsiadm run: its exit code and its stderr, with
// every CHAP secret of the call replaced by redact's marker. It unwraps to
// its errdefs class.
type ExitError struct {
	Args   []string // redacted argv after the binary
	Code   int      // -1 when the command did not exit (not found, killed)
	Stderr string   // redacted, trimmed
	Class  error
	Reason string // what the class means here, for people
}

func (e *ExitError) Error() string {
	msg := "iscsiadm " + strings.Join(e.Args, " ")
	if e.Code >= 0 {
		msg += fmt.Sprintf(": exit %d", e.Code)
	}
	if e.Reason != "" {
		msg += ": " + e.Reason
	}
	if e.Stderr != "" {
		msg += ": " + e.Stderr
	}
	return msg + ": " + e.Class.Error()
}

func (e *ExitError) Unwrap() error { return e.Class }

// exitCode is err's iscsiadm exit code, or -1.
func exitCode(err error) int {
	var ee *ExitError
	if errors.As(err, &ee) {
		return ee.Code
	}
	return -1
}

// noInitiator names what is missing when the kernel path cannot work.
const noInitiator = "the kernel iSCSI initiator is not usable on this host (iscsid not running or no iscsi_tcp module / NETLINK_ISCSI socket): use the userspace (libiscsi) path"

// classify maps an iscsiadm exit code and its stderr to a class and a
// reason. Exit 15 and 21 are classed too; callers for whom they mean
// success check the code first.
func classify(code int, stderr string) (error, string) {
	switch {
	case strings.Contains(stderr, "NETLINK_ISCSI"),
		strings.Contains(stderr, "can not connect to iSCSI daemon") && code != exitOK:
		return errdefs.ErrUnavailable, noInitiator
	}
	switch code {
	case exitSessNotFound:
		return errdefs.ErrNotFound, "session not found"
	case exitNoObjsFound:
		return errdefs.ErrNotFound, "no records, targets, sessions or portals found"
	case exitTrans, exitTransTimeout, exitPDUTimeout:
		return errdefs.ErrUnavailable, "cannot reach the iSCSI portal (connection refused or timed out)"
	case exitLogin:
		return errdefs.ErrUnavailable, "iSCSI login failed (retryable)"
	case exitTransNotFound, exitISCSIDComm, exitISCSIDNotConn:
		return errdefs.ErrUnavailable, noInitiator
	case exitAccess:
		return errdefs.ErrPermissionDenied, "iscsid refused the request (the agent must run as root)"
	case exitSessExists:
		return errdefs.ErrAlreadyExists, "session exists"
	case exitFatalLogin:
		return errdefs.ErrFailedPrecondition, "the target refused the login (non-retryable: target missing or initiator not allowed)"
	case exitLoginAuthFaild:
		return errdefs.ErrUnauthenticated, "iSCSI CHAP authentication failed"
	case exitInval:
		return errdefs.ErrInvalid, "invalid parameter"
	}
	return errdefs.ErrInternal, ""
}

// runner runs iscsiadm. It is the only place that starts it.
type runner struct {
	bin     string
	timeout time.Duration
	log     *slog.Logger
}

// run runs iscsiadm with args and returns its stdout. secrets are
// redacted from the logged argv and from stderr in errors.
func (r *runner) run(ctx context.Context, secrets []string, args ...string) (string, error) {
	shown := redactArgs(args, secrets)
	cctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	cmd := exec.CommandContext(cctx, r.bin, args...)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	cmd.WaitDelay = 2 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Run()
	errText := strings.TrimSpace(redactText(stderr.String(), secrets))
	r.log.DebugContext(ctx, "iscsiadm", "args", shown, "took", time.Since(start), "err", err)
	if err == nil {
		return stdout.String(), nil
	}
	if ctx.Err() != nil {
		return "", fmt.Errorf("iscsiadm %s: %w", strings.Join(shown, " "), ctx.Err())
	}
	var xe *exec.ExitError
	switch {
	case errors.Is(err, exec.ErrNotFound) || errors.Is(err, os.ErrNotExist):
		return "", &ExitError{Args: shown, Code: -1, Class: errdefs.ErrUnavailable,
			Reason: fmt.Sprintf("%s not found: install open-iscsi for the kernel initiator", r.bin)}
	case cctx.Err() != nil:
		return "", &ExitError{Args: shown, Code: -1, Stderr: errText, Class: errdefs.ErrUnavailable,
			Reason: fmt.Sprintf("did not finish within %s", r.timeout)}
	case errors.As(err, &xe) && xe.ExitCode() >= 0:
		class, reason := classify(xe.ExitCode(), errText)
		return stdout.String(), &ExitError{Args: shown, Code: xe.ExitCode(), Stderr: errText, Class: class, Reason: reason}
	}
	return "", &ExitError{Args: shown, Code: -1, Stderr: errText, Class: errdefs.ErrInternal, Reason: err.Error()}
}

// redactArgs copies args with each secret replaced by the marker.
func redactArgs(args, secrets []string) []string {
	out := make([]string, len(args))
	for i, a := range args {
		out[i] = redactText(a, secrets)
	}
	return out
}

func redactText(s string, secrets []string) string {
	for _, sec := range secrets {
		if sec != "" {
			s = strings.ReplaceAll(s, sec, redact.Marker)
		}
	}
	return s
}
