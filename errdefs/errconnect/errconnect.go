// Package errconnect maps Stowage's error classes (package errdefs) to
// Connect codes and back. It is the only place where that mapping lives:
// servers install Interceptor, clients call FromConnect on what they get.
package errconnect

import (
	"context"
	"errors"

	"connectrpc.com/connect"

	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/redact"
)

var classToCode = map[error]connect.Code{
	errdefs.ErrInvalid:            connect.CodeInvalidArgument,
	errdefs.ErrNotFound:           connect.CodeNotFound,
	errdefs.ErrAlreadyExists:      connect.CodeAlreadyExists,
	errdefs.ErrFailedPrecondition: connect.CodeFailedPrecondition,
	errdefs.ErrConflict:           connect.CodeAborted,
	errdefs.ErrAborted:            connect.CodeAborted,
	errdefs.ErrUnavailable:        connect.CodeUnavailable,
	errdefs.ErrNotImplemented:     connect.CodeUnimplemented,
	errdefs.ErrPermissionDenied:   connect.CodePermissionDenied,
	errdefs.ErrUnauthenticated:    connect.CodeUnauthenticated,
	errdefs.ErrDataLoss:           connect.CodeDataLoss,
	errdefs.ErrResourceExhausted:  connect.CodeResourceExhausted,
	errdefs.ErrInternal:           connect.CodeInternal,
	context.Canceled:              connect.CodeCanceled,
	context.DeadlineExceeded:      connect.CodeDeadlineExceeded,
}

var codeToClass = map[connect.Code]error{
	connect.CodeInvalidArgument:    errdefs.ErrInvalid,
	connect.CodeOutOfRange:         errdefs.ErrInvalid,
	connect.CodeNotFound:           errdefs.ErrNotFound,
	connect.CodeAlreadyExists:      errdefs.ErrAlreadyExists,
	connect.CodeFailedPrecondition: errdefs.ErrFailedPrecondition,
	connect.CodeAborted:            errdefs.ErrAborted,
	connect.CodeUnavailable:        errdefs.ErrUnavailable,
	connect.CodeUnimplemented:      errdefs.ErrNotImplemented,
	connect.CodePermissionDenied:   errdefs.ErrPermissionDenied,
	connect.CodeUnauthenticated:    errdefs.ErrUnauthenticated,
	connect.CodeDataLoss:           errdefs.ErrDataLoss,
	connect.CodeResourceExhausted:  errdefs.ErrResourceExhausted,
	connect.CodeCanceled:           context.Canceled,
	connect.CodeDeadlineExceeded:   context.DeadlineExceeded,
}

// Code returns the Connect code for err's class (CodeInternal when unclassed).
func Code(err error) connect.Code {
	if c, ok := classToCode[errdefs.Class(err)]; ok {
		return c
	}
	return connect.CodeInternal
}

// ToConnect turns a domain error into a *connect.Error carrying its class's
// code and the full message, its URLs redacted (package redact): what a
// server answers never carries a password or a presigned signature. Errors
// that already are *connect.Error pass through (with a new message when it
// has something to hide).
func ToConnect(err error) error {
	if err == nil {
		return nil
	}
	var ce *connect.Error
	if errors.As(err, &ce) {
		if msg := redact.Text(ce.Message()); msg != ce.Message() {
			return connect.NewError(ce.Code(), errors.New(msg))
		}
		return err
	}
	return connect.NewError(Code(err), redact.Error(err))
}

// FromConnect turns an error returned by a Connect client into a domain
// error with the class matching its code; the message is the server's.
func FromConnect(err error) error {
	if err == nil {
		return nil
	}
	code := connect.CodeOf(err)
	class, ok := codeToClass[code]
	if !ok {
		class = errdefs.ErrInternal
		if code == connect.CodeUnknown {
			// Transport failures (connection refused, reset) arrive as Unknown
			// or Unavailable; a caller can retry them.
			class = errdefs.ErrUnavailable
		}
	}
	msg := err.Error()
	var ce *connect.Error
	if errors.As(err, &ce) {
		msg = ce.Message()
	}
	return errdefs.New(class, msg)
}

// Interceptor maps handler errors to Connect codes, for unary and streaming
// handlers alike. Install it on every handler of a server.
func Interceptor() connect.Interceptor { return interceptor{} }

type interceptor struct{}

func (interceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		resp, err := next(ctx, req)
		return resp, ToConnect(err)
	}
}

func (interceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (interceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		return ToConnect(next(ctx, conn))
	}
}
