package api

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"buf.build/go/protovalidate"
	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	"github.com/stowage/stowage/errdefs"
)

// requestValidator checks every request message against the rules its
// .proto declares (buf.validate: required ids, non-negative sizes and
// page sizes, defined enum values, tag and name patterns, at most one
// source of a volume), before the handler runs: a violation is
// errdefs.ErrInvalid (invalid_argument) naming each field, and nothing is
// done. The services keep the checks that need state (a name taken, a
// store in the wrong state); the ones the proto now declares were removed
// from the handlers.
type requestValidator struct{ v protovalidate.Validator }

var _ connect.Interceptor = requestValidator{}

func newRequestValidator() (requestValidator, error) {
	v, err := protovalidate.New()
	if err != nil {
		return requestValidator{}, fmt.Errorf("protovalidate: %w", err)
	}
	return requestValidator{v}, nil
}

// check validates m.
func (rv requestValidator) check(m any) error {
	msg, ok := m.(proto.Message)
	if !ok {
		return nil
	}
	err := rv.v.Validate(msg)
	var ve *protovalidate.ValidationError
	if errors.As(err, &ve) {
		parts := make([]string, 0, len(ve.Violations))
		for _, v := range ve.Violations {
			parts = append(parts, v.String())
		}
		return fmt.Errorf("invalid %s: %s: %w", msg.ProtoReflect().Descriptor().Name(), strings.Join(parts, "; "), errdefs.ErrInvalid)
	}
	if err != nil {
		return fmt.Errorf("validate %s: %w", msg.ProtoReflect().Descriptor().Name(), errors.Join(err, errdefs.ErrInternal))
	}
	return nil
}

func (rv requestValidator) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if req.Spec().IsClient {
			return next(ctx, req)
		}
		if err := rv.check(req.Any()); err != nil {
			return nil, err
		}
		return next(ctx, req)
	}
}

func (rv requestValidator) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (rv requestValidator) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		return next(ctx, validatingConn{conn, rv})
	}
}

// validatingConn validates each message a stream receives.
type validatingConn struct {
	connect.StreamingHandlerConn
	rv requestValidator
}

func (c validatingConn) Receive(m any) error {
	if err := c.StreamingHandlerConn.Receive(m); err != nil {
		return err
	}
	return c.rv.check(m)
}
