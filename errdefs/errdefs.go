// Package errdefs holds Stowage's error classes. Domain code wraps one of the
// sentinel errors with context (fmt.Errorf("store %s: %w", id, errdefs.ErrNotFound));
// the API edge maps the class to a transport code exactly once
// (controller/api for Connect) and RPC clients map codes back with FromCode.
//
// A class answers "what can the caller do about it", not "what went wrong":
// fix the input (Invalid), pick another name (AlreadyExists), wait or change
// the object's state (FailedPrecondition), retry (Unavailable, Aborted).
package errdefs

import (
	"context"
	"errors"
)

// The error classes. Wrap them; never compare error strings.
var (
	ErrInvalid            = errors.New("invalid argument")
	ErrNotFound           = errors.New("not found")
	ErrAlreadyExists      = errors.New("already exists")
	ErrFailedPrecondition = errors.New("failed precondition")
	ErrConflict           = errors.New("conflict")
	ErrAborted            = errors.New("aborted")
	ErrUnavailable        = errors.New("unavailable")
	ErrNotImplemented     = errors.New("not implemented")
	ErrPermissionDenied   = errors.New("permission denied")
	// ErrUnauthenticated: the caller could not be identified (no, malformed,
	// unknown, expired or revoked credentials). ErrPermissionDenied is for
	// an identified caller who may not do this.
	ErrUnauthenticated   = errors.New("unauthenticated")
	ErrDataLoss          = errors.New("data loss")
	ErrResourceExhausted = errors.New("resource exhausted")
	ErrInternal          = errors.New("internal")
)

// classes lists every class in the order Class checks them.
var classes = []error{
	ErrInvalid, ErrNotFound, ErrAlreadyExists, ErrFailedPrecondition, ErrConflict,
	ErrAborted, ErrUnavailable, ErrNotImplemented, ErrPermissionDenied, ErrUnauthenticated, ErrDataLoss,
	ErrResourceExhausted, ErrInternal,
}

// Class returns the class sentinel err wraps, context.Canceled or
// context.DeadlineExceeded, or nil when err carries no class.
func Class(err error) error {
	if err == nil {
		return nil
	}
	for _, c := range classes {
		if errors.Is(err, c) {
			return c
		}
	}
	if errors.Is(err, context.Canceled) {
		return context.Canceled
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return context.DeadlineExceeded
	}
	return nil
}

// ClassName is the stable name of err's class ("not found", ...), or "" when
// it has none. It travels in task results between agent and controller.
func ClassName(err error) string {
	if c := Class(err); c != nil {
		return c.Error()
	}
	return ""
}

// FromClassName returns the sentinel whose ClassName is name, or ErrInternal.
func FromClassName(name string) error {
	for _, c := range classes {
		if c.Error() == name {
			return c
		}
	}
	switch name {
	case context.Canceled.Error():
		return context.Canceled
	case context.DeadlineExceeded.Error():
		return context.DeadlineExceeded
	}
	return ErrInternal
}

// Wrapped is an error that keeps a remote message but carries a local class.
type Wrapped struct {
	Msg   string
	Class error
}

func (e *Wrapped) Error() string { return e.Msg }
func (e *Wrapped) Unwrap() error { return e.Class }

// New returns an error with message msg and class class.
func New(class error, msg string) error { return &Wrapped{Msg: msg, Class: class} }

// Is helpers, for readability at call sites.
func IsNotFound(err error) bool           { return errors.Is(err, ErrNotFound) }
func IsAlreadyExists(err error) bool      { return errors.Is(err, ErrAlreadyExists) }
func IsInvalid(err error) bool            { return errors.Is(err, ErrInvalid) }
func IsFailedPrecondition(err error) bool { return errors.Is(err, ErrFailedPrecondition) }
func IsUnavailable(err error) bool        { return errors.Is(err, ErrUnavailable) }
func IsConflict(err error) bool           { return errors.Is(err, ErrConflict) }
